"""The README is executable: every fenced block marked ```bash runnable``` is run, line by line
in order, in a fresh folder where `weights.pth` is the shipped demo model, with the suite's
`unet-export`, `unet-bench` and `python` first on PATH. A line must exit 0 unless its comment
says `(exit N ...)`, as for TensorRT on a machine without it."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from unet_export.demo import DEMO_WEIGHTS

README = Path(__file__).resolve().parent.parent / "README.md"
EXPECTED_EXIT = re.compile(r"#.*\(exit (\d+)")


def runnable_blocks(text: str) -> list[list[str]]:
    """The command lines of each ```bash runnable``` block (continuations joined)."""
    blocks = re.findall(r"^```bash runnable\n(.*?)^```", text, flags=re.S | re.M)
    return [[line for line in block.replace("\\\n", " ").splitlines() if line.strip()] for block in blocks]


def test_the_extractor_finds_the_blocks_and_their_expected_codes():
    text = "```bash runnable\na --x \\\n  y\nb  # (exit 2 here)\n```\n```bash\nnot run\n```\n"
    assert runnable_blocks(text) == [["a --x    y", "b  # (exit 2 here)"]]
    assert EXPECTED_EXIT.search("b  # (exit 2 here)").group(1) == "2"


BLOCKS = runnable_blocks(README.read_text())


def test_the_readme_has_runnable_blocks():
    assert len(BLOCKS) >= 2


# The commands as printed; only unet-bench's timing loop is shortened (its documented env defaults
# for --warmup/--iters): every row is still built, parity-gated and timed.
QUICK_BENCH = {"UNET_BENCH_WARMUP": "1", "UNET_BENCH_ITERS": "2"}


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_block_runs(index, tmp_path):
    # Linked with its sidecar, as a user's trained checkpoint sits beside its own: the sidecar names
    # the held-out images unet-bench judges reduced precision on.
    (tmp_path / "weights.pth").symlink_to(DEMO_WEIGHTS)
    (tmp_path / "weights.json").symlink_to(DEMO_WEIGHTS.with_suffix(".json"))
    env = os.environ | {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"} | QUICK_BENCH
    for line in BLOCKS[index]:
        expected = int(match.group(1)) if (match := EXPECTED_EXIT.search(line)) else 0
        proc = subprocess.run(["bash", "-c", line], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == expected, f"{line}\n{proc.stdout[-1500:]}\n{proc.stderr[-1500:]}"
        if expected:
            assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


# --- outputs: written by scripts/readme_outputs.py, never pasted ---------------------------------

sys.path.insert(0, str(README.parent / "scripts"))
import readme_outputs  # noqa: E402


def fences(text: str) -> list[tuple[int, str]]:
    """(line number, info string) of every opening fence."""
    opened, found = False, []
    for n, line in enumerate(text.splitlines(), 1):
        if line.startswith("```"):
            if not opened:
                found.append((n, line[3:].strip()))
            opened = not opened
    return found


def test_fences_are_paired_and_named():
    assert fences("```bash\nx\n```\ntext\n```\ny\n```\n") == [(1, "bash"), (5, "")]


def test_every_output_block_in_the_readme_is_owned_by_a_command():
    text = README.read_text()
    bare = [n for n, info in fences(text) if info == ""]
    assert bare == [], f"fenced blocks without a language at lines {bare}: mark output (<!-- output: CMD -->) or name it"
    commands = readme_outputs.markers(text)
    assert "unet-export demo" in commands and len(commands) >= 5
    for match in readme_outputs.BLOCK.finditer(text):
        assert match.group("body").startswith(f"$ {match.group('cmd')}\n"), match.group("cmd")


def test_the_output_writer_replaces_only_its_block():
    text = "a\n<!-- output: echo 1 -->\n```text\nold\n```\nb\n<!-- output: echo 2 -->\n```text\nold 2\n```\n"
    assert readme_outputs.markers(text) == ["echo 1", "echo 2"]
    out = readme_outputs.replace_output(text, 1, "new\n\n")
    assert out == "a\n<!-- output: echo 1 -->\n```text\nold\n```\nb\n<!-- output: echo 2 -->\n```text\n$ echo 2\nnew\n```\n"
    assert readme_outputs.run("echo hi; echo err >&2; exit 3") == "hi\nerr\n(exit 3)\n"
    assert readme_outputs.run("printf '\\033[1mbold\\033[0m'") == "bold"
