"""Regenerate the outputs shown in README.md and docs/*.md: every fenced block right after a line

    <!-- output: COMMAND -->

is replaced by `$ COMMAND` and what the command prints (stdout and stderr as they came), run with bash from
the repository root with the venv first on PATH. The files are done in reading order: README.md,
then the pages in the order docs/README.md links them (any page it does not link last, by
name), each top to bottom, so a later command may use what an earlier one wrote, as a reader
following the docs would (the demo in docs/export-and-gate.md writes the exports/demo the later
pages show). Nothing is pasted by hand, so no page can show output from an older version or
another machine.

    python scripts/readme_outputs.py                                # every marked command, every file
    python scripts/readme_outputs.py --list                         # the marked commands, numbered
    python scripts/readme_outputs.py --only 3                       # just one (the number --list shows)
    python scripts/readme_outputs.py --file docs/serving.md         # every marked command of one file
"""

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
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


def doc_files(root: Path = ROOT) -> list[Path]:
    """README.md, then docs/*.md in the order the index (docs/README.md) links them."""
    docs = root / "docs"
    pages = sorted(docs.glob("*.md")) if docs.is_dir() else []
    index = docs / "README.md"
    linked = re.findall(r"\]\(([\w.-]+\.md)(?:#[\w-]*)?\)", index.read_text()) if index.exists() else []
    ordered = [index] if index.exists() else []
    for name in linked:
        if (docs / name) in pages and (docs / name) not in ordered:
            ordered.append(docs / name)
    return [root / "README.md", *ordered, *[p for p in pages if p not in ordered]]


def targets(files: list[Path]) -> list[tuple[Path, int, str]]:
    """(file, index of the marker within the file, command) for every marker, in reading order."""
    return [(path, i, cmd) for path in files for i, cmd in enumerate(markers(path.read_text()))]


def rewrite(path: Path, index: int, output: str) -> None:
    text = replace_output(path.read_text(), index, output)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)  # one block at a time: an interrupted run keeps every block it finished


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--list", action="store_true", help="print the marked commands and stop")
    parser.add_argument("--only", type=int, action="append", help="regenerate only this block (repeatable)")
    parser.add_argument("--file", type=Path, action="append", help="only the blocks of this file (repeatable)")
    args = parser.parse_args()
    files = doc_files()
    if args.file:
        wanted = {p.resolve() for p in args.file}
        files = [p for p in files if p.resolve() in wanted]
        if len(files) != len(wanted):
            parser.error(f"--file: not one of {', '.join(str(p.relative_to(ROOT)) for p in doc_files())}")
    found = targets(files)
    if args.list:
        for n, (path, _, command) in enumerate(found):
            print(f"{n:2d} {path.relative_to(ROOT)}: {command}")
        return 0
    for n in args.only or range(len(found)):
        path, index, command = found[n]
        print(f"[{n}] {path.relative_to(ROOT)}: $ {command}", flush=True)
        rewrite(path, index, run(command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
