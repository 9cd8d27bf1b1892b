"""Regenerate the examples in docs/json.md: run each command with --json on the shipped demo
checkpoint in a temporary folder and paste the documents it wrote between the markers
``<!-- example: SCHEMA -->`` and the end of the ```json block after them.

    PYTHONPATH=. .venv/bin/python scripts/json_examples.py        # about two minutes on 2 cores

tests/cli/test_json_results.py checks that each example has the keys the code writes now.
"""

import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "json.md"


def run(app, args: list[str], codes=(0,), env=None) -> None:
    from typer.testing import CliRunner

    result = CliRunner().invoke(app, args, env=env)
    if result.exit_code not in codes:
        sys.exit(f"{' '.join(args)} exited {result.exit_code}: {result.output}")


def documents(tmp: Path) -> dict[str, str]:
    """Run from the checkout (so the documents carry its git commit) into a workdir under
    exports/ (git-ignored, removed afterwards), with relative paths as a user would type them."""
    from unet_export.cli.bench import app as bench_app
    from unet_export.cli.main import app
    from unet_export.flows.demo import DEMO_SIZE, DEMO_VAL, DEMO_WEIGHTS

    os.chdir(ROOT)
    weights, work = str(DEMO_WEIGHTS.relative_to(ROOT)), "exports/json-examples"
    size = ["--height", str(DEMO_SIZE[0]), "--width", str(DEMO_SIZE[1]), "--device", "cpu"]
    shutil.rmtree(work, ignore_errors=True)
    made_exports = not Path("exports").exists()
    try:
        run(app, ["onnx", weights, "-w", work, *size, "--json", str(tmp / "export.json")])
        run(app, ["verify", "-w", work, "--device", "cpu", "--json", str(tmp / "verify.json")])
        run(app, ["evaluate", weights, str(DEMO_VAL.relative_to(ROOT)), "-w", work, "--device", "cpu", "--json",
                  str(tmp / "evaluate.json")])  # fmt: skip
        run(app, ["doctor", "--json", str(tmp / "doctor.json")])
        run(bench_app, [weights, "-w", work, "--backends", "eager,onnxruntime,torchscript", *size, "--json",
                        str(tmp / "bench.json")], env={"UNET_BENCH_WARMUP": "1", "UNET_BENCH_ITERS": "5"})  # fmt: skip
        run(app, ["report", "-w", work, "-o", str(tmp / "report.html"), "--images", "2", "--json",
                  str(tmp / "report.json")])  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if made_exports:
            shutil.rmtree("exports", ignore_errors=True)
    names = ("export", "verify", "evaluate", "doctor", "bench", "report")
    return {name: (tmp / f"{name}.json").read_text() for name in names}


def main() -> None:
    text = DOCS.read_text()
    with tempfile.TemporaryDirectory() as tmp:
        docs = documents(Path(tmp))
    for name, doc in docs.items():
        pattern = re.compile(rf"(<!-- example: {name} -->\n```json\n).*?(```)", re.S)
        text, found = pattern.subn(lambda m: m.group(1) + doc + m.group(2), text)
        if found != 1:
            sys.exit(f"{DOCS}: no '<!-- example: {name} -->' marker followed by a ```json block")
    DOCS.write_text(text)
    print(f"wrote {len(docs)} examples into {DOCS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
