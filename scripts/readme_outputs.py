"""Regenerate the outputs shown in README.md: every fenced block right after a line

    <!-- output: COMMAND -->

is replaced by `$ COMMAND` and what the command prints (stdout and stderr as they came), run with bash from
the repository root with the venv first on PATH, in README order (a later command may use what
an earlier one wrote, as a reader following the README would). Nothing is pasted by hand, so the
README cannot show output from an older version or another machine.

    python scripts/readme_outputs.py            # run every marked command, rewrite README.md
    python scripts/readme_outputs.py --list     # the marked commands, numbered
    python scripts/readme_outputs.py --only 3   # just one (0-based)
"""

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
# A marker, then the fenced block it owns (any info string, e.g. ```text).
BLOCK = re.compile(r"^<!-- output: (?P<cmd>.+?) -->\n(?P<fence>```[^\n]*)\n(?P<body>.*?)^```$", re.M | re.S)
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def markers(text: str) -> list[str]:
    return [m.group("cmd") for m in BLOCK.finditer(text)]


def replace_output(text: str, index: int, output: str) -> str:
    """``text`` with the ``index``-th marked block's body replaced by ``output``."""
    match = list(BLOCK.finditer(text))[index]
    body = f"$ {match.group('cmd')}\n{output.rstrip()}\n"
    start, end = match.span("body")
    return text[:start] + body + text[end:]


def run(command: str, timeout: int = 1800) -> str:
    env = os.environ | {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(["bash", "-c", command], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=timeout)  # fmt: skip
    output = ANSI.sub("", proc.stdout)
    return output + (f"(exit {proc.returncode})\n" if proc.returncode else "")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--list", action="store_true", help="print the marked commands and stop")
    parser.add_argument("--only", type=int, action="append", help="regenerate only this block (repeatable)")
    args = parser.parse_args()
    commands = markers(README.read_text())
    if args.list:
        for i, command in enumerate(commands):
            print(f"{i:2d} {command}")
        return 0
    for i in args.only or range(len(commands)):
        print(f"[{i}] $ {commands[i]}", flush=True)
        output = run(commands[i])
        text = replace_output(README.read_text(), i, output)
        tmp = README.with_name(f".{README.name}.tmp")
        tmp.write_text(text)
        os.replace(tmp, README)  # one block at a time: an interrupted run keeps every block it finished
    return 0


if __name__ == "__main__":
    sys.exit(main())
