"""scripts/venv.sh builds the venv quietly. Issue 25, rough edge 10 (a): setuptools' "Editable
installation" box on every venv build (was tests/test_rough_edges.py)."""

import os
import re
import shutil
import subprocess
import sys

from tests.conftest import REPO


def test_the_venv_build_drops_setuptools_editable_installation_box(tmp_path):
    """scripts/venv.sh installs the project editable; setuptools' build prints a 10-line box that
    reached every fresh `make demo`/.ci/run log. The filter venv.sh passes drops that message, and
    only it: the same build without it prints the box (so the check can fail)."""
    root = REPO
    script = (root / "scripts" / "venv.sh").read_text()
    quiet = re.search(r'^QUIET_EDITABLE="([^"]+)"', script, flags=re.M).group(1)
    assert 'PYTHONWARNINGS="$QUIET_EDITABLE"' in script and "-e ." in script
    project = tmp_path / "project"
    (project / "unet_export").mkdir(parents=True)
    shutil.copy(root / "pyproject.toml", project)
    shutil.copy(root / "unet_export" / "__init__.py", project / "unet_export")
    build = "from setuptools import build_meta; build_meta.build_editable(%r)"

    def stderr_of_a_build(extra_env: dict) -> str:
        out = tmp_path / f"wheel{len(extra_env)}"
        out.mkdir()
        env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"} | extra_env
        proc = subprocess.run([sys.executable, "-c", build % str(out)], cwd=project, env=env, capture_output=True,
                              text=True, timeout=120)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-2000:]
        return proc.stderr

    assert "Editable installation" in stderr_of_a_build({})
    assert "Editable installation" not in stderr_of_a_build({"PYTHONWARNINGS": quiet})
