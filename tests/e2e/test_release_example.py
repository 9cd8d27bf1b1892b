"""examples/ci/release.yml, run for real: every `run:` step of the workflow, in order, on the CPU
with the shipped demo model, so the example cannot rot. The install step is replaced by the
suite's own environment (the workflow installs from git, which these machines cannot reach);
`uses:` steps are GitHub's own. Without TensorRT the engine step must exit 2 with the
documented message; every other step must exit 0."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO
from unet_export.flows.demo import DEMO_WEIGHTS

WORKFLOW = REPO / "examples" / "ci" / "release.yml"
TRT_MISSING = 'TensorRT is not installed: on a machine with an NVIDIA GPU, pip install "unet-export[trt]"'


def workflow_steps() -> tuple[dict, list[dict]]:
    job = yaml.safe_load(WORKFLOW.read_text())["jobs"]["export-and-bench"]
    return job["env"], [s for s in job["steps"] if "run" in s]


@pytest.mark.slow  # ~80 s, the same exports and unet-bench run as README block 0 (make test runs that): make test-all
def test_release_workflow_runs_green_on_cpu(tmp_path):
    env, steps = workflow_steps()
    checkout = tmp_path / "repo"
    (checkout / "weights").mkdir(parents=True)
    shutil.copy(DEMO_WEIGHTS, checkout / "weights" / "unet.pth")
    # Beside its training sidecar, as a trained checkpoint sits: the sidecar names the held-out
    # images unet-bench judges reduced precision on (noise would be a false alarm for bf16).
    (checkout / "weights" / "unet.json").symlink_to(DEMO_WEIGHTS.with_suffix(".json"))
    shell_env = os.environ | {
        "WEIGHTS": "weights/unet.pth",  # the workflow's default input
        "DEVICE": "cpu",
        "UNET_BENCH_WARMUP": "1",  # unet-bench's env defaults: every row still gated and timed, briefly
        "UNET_BENCH_ITERS": "2",
        "GITHUB_STEP_SUMMARY": str(tmp_path / "summary.md"),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    assert env["DEVICE"] == "cuda" and "weights/unet.pth" in env["WEIGHTS"]
    ran = []
    for step in steps:
        if step["name"].startswith("Install"):
            continue
        proc = subprocess.run(["bash", "-e", "-c", step["run"]], cwd=checkout, env=shell_env, capture_output=True,
                              text=True, timeout=900)  # fmt: skip
        ran.append(step["name"])
        if "TensorRT" in step["name"]:
            assert proc.returncode == 2 and proc.stderr.strip() == f"error: {TRT_MISSING}", proc.stderr
        else:
            assert proc.returncode == 0, f"{step['name']}: {proc.stderr[-2000:]}"
    assert ran == ["Export ONNX and TorchScript (parity-gated on CUDA)", "Build the TensorRT FP16 engine (parity-gated)",
                   "Benchmark every runtime, parity-gated", "The page the release is signed off from", "Job summary"]  # fmt: skip
    bench = json.loads((checkout / "reports" / "bench.json").read_text())
    # the held-out images the checkpoint's sidecar names, recorded in the manifest (the demo's 24)
    assert bench["config"]["inputs"] == "24 held-out images (recorded)" and {r["status"] for r in bench["results"]} <= {"ok", "unavailable"}
    summary = (tmp_path / "summary.md").read_text()
    assert "| backend |" in summary and "`unet-export report` passed (exit code 0)" in summary
    for name in ("onnx", "torchscript", "trt", "bench", "report"):  # every step's JUnit, the TRT step's too (exit 2)
        assert (checkout / "reports" / f"{name}.xml").is_file(), name
    assert "PASSED (exit code 0)" in (checkout / "reports" / "report.html").read_text()
    assert (checkout / "exports" / "manifest.json").is_file()
