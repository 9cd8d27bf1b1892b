"""The README and docs/*.md are executable. Every fenced block has a kind, named by its info string
(docs/README.md, "How to read the command blocks", is the table):

- ```bash``` and ```python``` blocks run, in page order, in a fresh folder laid out like a clone
  (`.venv` is the suite's venv, `unet_export/assets` the shipped demo model, `examples/` the
  repository's). The README's blocks run in a shell as a new terminal has it (no venv on PATH),
  so its first block must work exactly as pasted after `make demo`/`make test`. The docs pages
  start where that block left a reader: its `exports/`, the venv activated. A line must exit 0
  unless its comment says `(exit N ...)`, and then print one line on stderr.
- ```bash cpp``` / ```bash ray``` blocks run the same way in tests marked `cpp` / `ray`.
- ```bash setup``` and ```bash on-a-...``` blocks cannot run here (they build the venv, or need a
  GPU, a cluster, a container): each `unet-export` / `unet-bench` in them is parsed by the real
  command's parser (names and options), `make` targets must exist, `python FILE` files too.
- ```synopsis``` blocks: every option named must be an option of that command.
- ```text``` blocks are output; after `<!-- output: CMD -->` scripts/readme_outputs.py writes them.
"""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import typer

from tests.conftest import REPO
from unet_export.flows.demo import ASSETS

ROOT = REPO
README = ROOT / "README.md"
DOCS = ROOT / "docs"
sys.path.insert(0, str(ROOT / "scripts"))
import readme_outputs  # noqa: E402

FILES = readme_outputs.doc_files(ROOT)
EXPECTED_EXIT = re.compile(r"#.*\(exit (\d+)")
RUN_KINDS = {"bash": None, "python": None, "bash cpp": "cpp", "bash ray": "ray"}  # kind -> pytest marker
PARSE_KINDS = {"bash setup", "bash on-a-gpu-host", "bash on-a-ray-cluster", "bash on-a-triton-host"}
OTHER_KINDS = {"synopsis", "text", "json"}  # json: example documents, checked by test_json_results
# Typer (0.2x) vendors its own click: take click's classes from Typer. UsageError is the base of
# BadParameter in both.
UsageError = typer.BadParameter.__base__
NOT_YET_WRITTEN: set[Path] = set()  # pages the index may link before they land

# The commands as printed; only unet-bench's timing loop is shortened (its documented env defaults
# for --warmup/--iters): every row is still built, parity-gated and timed.
QUICK_BENCH = {"UNET_BENCH_WARMUP": "1", "UNET_BENCH_ITERS": "2"}
VENV = Path(sys.executable).parent.parent
IS_VENV = sys.prefix != sys.base_prefix and (VENV / "pyvenv.cfg").is_file() and (VENV / "bin" / "activate").is_file()


@dataclass
class Block:
    path: Path
    line: int  # of the opening fence
    kind: str
    body: str

    def commands(self) -> list[str]:
        """The command lines as pasted (a line ending in a backslash continues on the next)."""
        found, current = [], ""
        for line in self.body.splitlines():
            current += line + "\n"
            if not line.endswith("\\"):
                if current.strip() and not current.lstrip().startswith("#"):
                    found.append(current.rstrip("\n"))
                current = ""
        return found

    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def fenced_blocks(path: Path) -> list[Block]:
    blocks, opened = [], None
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.startswith("```"):
            if opened is None:
                opened, body = (n, line[3:].strip()), []
            else:
                blocks.append(Block(path, opened[0], opened[1], "".join(body)))
                opened = None
        elif opened is not None:
            body.append(line + "\n")
    return blocks


def fences(text: str) -> list[tuple[int, str]]:
    """(line number, info string) of every opening fence."""
    opened, found = False, []
    for n, line in enumerate(text.splitlines(), 1):
        if line.startswith("```"):
            if not opened:
                found.append((n, line[3:].strip()))
            opened = not opened
    return found


ALL_BLOCKS = [block for path in FILES for block in fenced_blocks(path)]


def test_the_extractor_keeps_lines_as_pasted(tmp_path):
    page = tmp_path / "p.md"
    page.write_text("```bash\na --x \\\n  y\n# a comment\nb  # (exit 2 here)\n```\n```text\nout\n```\n")
    blocks = fenced_blocks(page)
    assert [(b.kind, b.line) for b in blocks] == [("bash", 1), ("text", 7)]
    assert blocks[0].commands() == ["a --x \\\n  y", "b  # (exit 2 here)"]
    assert EXPECTED_EXIT.search("b  # (exit 2 here)").group(1) == "2"


def test_fences_are_paired_and_named():
    assert fences("```bash\nx\n```\ntext\n```\ny\n```\n") == [(1, "bash"), (5, "")]


def test_every_block_has_a_kind_the_tests_check():
    known = RUN_KINDS.keys() | PARSE_KINDS | OTHER_KINDS
    unknown = [f"{b.where()} ```{b.kind}" for b in ALL_BLOCKS if b.kind not in known]
    assert unknown == [], f"blocks no test runs or checks: {unknown}; kinds: {sorted(known)}"
    assert {b.kind for b in ALL_BLOCKS} >= {"bash", "bash cpp", "bash ray", "python", "synopsis", "bash on-a-gpu-host"}


# --- the README is short, and the docs are all reachable -------------------------------------------


def test_the_readme_fits_the_first_ten_minutes():
    text = README.read_text()
    assert len(text.splitlines()) <= 250
    assert "unet-export demo" not in readme_outputs.markers(text), "the demo's output dump belongs in docs/"
    kinds = [b.kind for b in fenced_blocks(README) if b.kind != "text"]
    assert kinds[:2] == ["bash setup", "bash"], "set-up, then the release-CI commands"


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    return {slug(m) for m in re.findall(r"^#+ (.+)$", path.read_text(), flags=re.M)}


def test_slug_matches_github():
    assert slug('What "verified" means') == "what-verified-means"
    assert slug("C++ (libtorch): TorchScript and AOTI") == "c-libtorch-torchscript-and-aoti"


def test_every_link_between_the_pages_leads_somewhere():
    broken = []
    for path in FILES:
        for target, anchor in re.findall(r"\]\(([^)#\s:]*\.md)?(?:#([\w-]+))?\)", path.read_text()):
            dest = (path.parent / target).resolve() if target else path
            if dest in NOT_YET_WRITTEN:
                continue
            if not dest.is_file() or (anchor and anchor not in anchors(dest)):
                broken.append(f"{path.relative_to(ROOT)}: {target}#{anchor}")
    assert broken == []


def test_the_index_links_every_page():
    linked = set(re.findall(r"\]\(([\w.-]+\.md)\)", (DOCS / "README.md").read_text()))
    pages = {p.name for p in DOCS.glob("*.md")} - {"README.md"}
    assert pages <= linked
    assert "json.md" in linked and "[Machine-readable results (--json)](json.md)" in (DOCS / "README.md").read_text()


# --- blocks that cannot run here are still checked against the real commands ---------------------


def cli_commands() -> dict:
    from unet_export.cli import bench, main

    return {"unet-export": typer.main.get_command(main.app), "unet-bench": typer.main.get_command(bench.app)}


def invocations(command: str) -> list[list[str]]:
    """The simple commands of a shell line (split at ;, &&, ||, |, &), each as its words."""
    lexer = shlex.shlex(command.replace("\\\n", " "), posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    found, words = [], []
    for token in lexer:
        if token and set(token) <= set("();<>|&"):
            found, words = found + [words] if words else found, []
        else:
            words.append(token)
    return found + [words] if words else found


def subcommand(group, name: str):
    return group.get_command(typer.Context(group), name) if hasattr(group, "get_command") else None


def check_invocation(words: list[str], commands: dict) -> None:
    """Parse ``words`` with the real command's parser, as the shell would hand them over; raises
    click's UsageError for an unknown command or option, or too many arguments."""
    cmd, args, name = commands[Path(words[0]).name], list(words[1:]), Path(words[0]).name
    while hasattr(cmd, "get_command"):
        if not args or subcommand(cmd, args[0]) is None:
            raise UsageError(f"{name}: no command {args[:1]}")
        name, cmd, args = args[0], subcommand(cmd, args[0]), args[1:]
    _, rest, _ = cmd.make_parser(typer.Context(cmd, info_name=name)).parse_args(args)
    if rest and not cmd.allow_extra_args:  # the parser consumed the declared arguments
        raise UsageError(f"{name}: unexpected arguments {rest}")


def test_the_invocation_checker_catches_what_it_should():
    commands = cli_commands()
    assert invocations("a x && b --y 'z w' | c; d") == [["a", "x"], ["b", "--y", "z w"], ["c"], ["d"]]
    check_invocation(["unet-export", "trt", "--fp32", "--max-shape", "16x3x512x512"], commands)
    check_invocation([".venv/bin/unet-bench", "--batch", "8"], commands)
    for bad in (["unet-export", "trtx"], ["unet-export", "trt", "--fp64"], ["unet-bench", "--batch"],
                ["unet-export", "onnx", "a.pth", "b.pth"]):  # fmt: skip
        with pytest.raises(UsageError):
            check_invocation(bad, commands)


@pytest.mark.parametrize("block", [b for b in ALL_BLOCKS if b.kind in PARSE_KINDS], ids=Block.where)
def test_blocks_that_cannot_run_here_name_real_commands(block):
    commands, checked = cli_commands(), 0
    targets = set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), flags=re.M))
    for command in block.commands():
        for words in invocations(command):
            if Path(words[0]).name in commands:
                check_invocation(words, commands)
            elif words[0] == "make":
                assert set(words[1:]) <= targets, command
            elif words[0] == "python" and words[1:2] and words[1].endswith(".py"):
                assert (ROOT / words[1]).is_file(), command
            else:
                continue
            checked += 1
    assert checked, f"{block.where()}: nothing in it names unet-export, unet-bench, make or a script"


@pytest.mark.parametrize("block", [b for b in ALL_BLOCKS if b.kind == "synopsis"], ids=Block.where)
def test_synopsis_blocks_name_real_options(block):
    commands = cli_commands()
    usages = re.split(r"\n(?=\S)", block.body.strip())
    for usage in usages:
        words = usage.split()
        cmd, name = commands[words[0]], words[0]
        if hasattr(cmd, "get_command"):
            name, cmd = words[1], subcommand(cmd, words[1])
            assert cmd is not None, usage
        options = {opt for p in cmd.params for opt in [*p.opts, *p.secondary_opts]}
        named = set(re.findall(r"(?<![\w-])--[a-z0-9][a-z0-9-]*", usage))
        assert named and named <= options, f"{block.where()} {name}: not options: {sorted(named - options)}"


# --- blocks that run ------------------------------------------------------------------------------


def fresh_clone(dest: Path) -> Path:
    """A folder laid out as a clone after `make demo`/`make test`, for what the blocks touch."""
    (dest / "unet_export").mkdir(parents=True)
    (dest / ".venv").symlink_to(VENV)
    (dest / "unet_export" / "assets").symlink_to(ASSETS)
    (dest / "examples").symlink_to(ROOT / "examples")
    return dest


def new_terminal_env() -> dict:
    """The environment of a new terminal: the venv neither on PATH nor active."""
    env = dict(os.environ) | QUICK_BENCH
    env.pop("VIRTUAL_ENV", None)
    bin_dir = str(VENV / "bin")
    env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep) if p and Path(p) != Path(bin_dir))
    return env


@dataclass
class LineResult:
    block: Block
    command: str
    expected: int
    rc: int | None  # None: not reached
    out: str
    err: str

    def report(self) -> str:
        head = f"{self.block.where()}: {self.command}\nexit {self.rc}, expected {self.expected}"
        return f"{head}\n{self.out[-1500:]}\n{self.err[-1500:]}"


def run_blocks(blocks: list[Block], clone: Path, log: Path, activate: bool) -> list[LineResult]:
    """Run the blocks' lines in one bash session in ``clone``, as a reader pasting them into one
    terminal; stops at the first line whose exit code is not the expected one."""
    log.mkdir(parents=True)
    script, lines = ["source .venv/bin/activate"] if activate else [], []
    for block in blocks:
        if block.kind == "python":
            code = log / f"block{block.line}.py"
            code.write_text(block.body)
            commands = [f"python {code}"]
        else:
            commands = block.commands()
        for command in commands:
            n, match = len(lines), EXPECTED_EXIT.search(command.splitlines()[-1])
            lines.append((block, command, int(match.group(1)) if match else 0))
            script += [f"{{ {command}\n}} >{log}/{n}.out 2>{log}/{n}.err", f"echo $? >{log}/{n}.rc",
                       f'[ "$(cat {log}/{n}.rc)" = {lines[-1][2]} ] || exit 0']  # fmt: skip
    (log / "script.sh").write_text("\n".join(script) + "\n")
    subprocess.run(["bash", str(log / "script.sh")], cwd=clone, env=new_terminal_env(), timeout=1800,
                   stdin=subprocess.DEVNULL, capture_output=True)  # fmt: skip
    read = lambda n, ext: (log / f"{n}.{ext}").read_text() if (log / f"{n}.{ext}").exists() else ""  # noqa: E731
    return [LineResult(b, c, e, int(read(n, "rc")) if read(n, "rc") else None, read(n, "out"), read(n, "err"))
            for n, (b, c, e) in enumerate(lines)]  # fmt: skip


def assert_ran_as_documented(results: list[LineResult]) -> None:
    assert results, "no lines to run"
    for result in results:
        assert result.rc == result.expected, result.report()
        if result.expected:
            assert len(result.err.strip().splitlines()) == 1, result.report()


def runnable(path: Path, kinds: set[str]) -> list[Block]:
    return [b for b in fenced_blocks(path) if b.kind in kinds]


needs_venv = pytest.mark.skipif(not IS_VENV, reason=f"the suite does not run in a venv ({VENV}): no .venv to link")


@pytest.fixture(scope="session")
def readme_run(tmp_path_factory):
    """The README's command blocks, pasted into a new terminal on a fresh clone."""
    clone = fresh_clone(tmp_path_factory.mktemp("readme") / "clone")
    return clone, run_blocks(runnable(README, {"bash"}), clone, clone.parent / "log", activate=False)


def test_the_new_terminal_has_no_unet_export_of_the_venv():
    found = shutil.which("unet-export", path=new_terminal_env()["PATH"])
    assert found is None or not Path(found).resolve().is_relative_to(VENV.resolve())


@needs_venv
def test_readme_first_block_runs_as_pasted_on_a_fresh_clone(readme_run):
    clone, results = readme_run
    assert_ran_as_documented(results)
    first = results[0].block
    assert first.commands()[0].startswith("source .venv/bin/activate") or ".venv/bin/unet-export" in first.body
    promised = [p for r in results for p in re.findall(r"-> (exports/[\w./-]+\w)", r.command)]
    assert promised, "the block's comments name the files it writes"
    manifest = json.loads((clone / "exports" / "manifest.json").read_text())
    verified = {a["path"] for a in manifest["artifacts"] if a["status"] == "verified"}
    for path in promised:
        assert (clone / path).is_file() and Path(path).name in verified, path
    assert not list((clone / "exports").glob("*.engine")), "a refused trt writes nothing"
    bench = next(r for r in results if r.command.startswith("unet-bench"))
    assert re.search(r"^.*\bok\b.*\bonnxruntime\b", bench.out, flags=re.M), bench.out[-2000:]


CPP_TOOLS = pytest.mark.skipif(shutil.which("cmake") is None or shutil.which("c++") is None,
                               reason="cmake or a C++ compiler is absent")  # fmt: skip


def page_runs() -> list:
    """One run per page with runnable blocks; a page with cpp or ray blocks runs again, whole,
    under that marker (its blocks may use what the page's earlier blocks wrote; cpp under slow too)."""
    default, runs = {"bash", "python"}, []
    for page in (p for p in FILES if p != README):
        if runnable(page, default):
            runs.append(pytest.param(page, default, id=page.name))
        if runnable(page, {"bash cpp"}):
            # slow: it builds the C++ example again (160 s), which tests/runtimes/test_cpp.py
            # builds and checks against Python in make test; make test-all runs the page too
            marks = [pytest.mark.cpp, pytest.mark.slow, CPP_TOOLS]
            runs.append(pytest.param(page, default | {"bash cpp"}, id=f"{page.name}-cpp", marks=marks))
        if runnable(page, {"bash ray"}):
            runs.append(pytest.param(page, default | {"bash ray"}, id=f"{page.name}-ray", marks=pytest.mark.ray))
    return runs


@needs_venv
@pytest.mark.parametrize(("page", "kinds"), page_runs())
def test_docs_page_runs(page, kinds, readme_run, tmp_path):
    readme_clone, readme_results = readme_run
    if any(r.rc != r.expected for r in readme_results):
        pytest.fail("the README's first block failed, and the pages start where it ends: see its test")
    clone = fresh_clone(tmp_path / "clone")
    shutil.copytree(readme_clone / "exports", clone / "exports")
    assert_ran_as_documented(run_blocks(runnable(page, kinds), clone, tmp_path / "log", activate=True))


# --- outputs: written by scripts/readme_outputs.py, never pasted ---------------------------------


def test_every_output_block_is_owned_by_a_command():
    commands = []
    for path in FILES:
        text = path.read_text()
        bare = [n for n, info in fences(text) if info == ""]
        assert bare == [], f"{path.name}: blocks with no kind at {bare}: mark output (<!-- output: CMD -->) or name it"
        commands += readme_outputs.markers(text)
        for match in readme_outputs.BLOCK.finditer(text):
            assert match.group("body").startswith(f"$ {match.group('cmd')}\n"), match.group("cmd")
    assert "unet-export demo" in commands and len(commands) >= 10


def test_the_output_writer_replaces_only_its_block():
    text = "a\n<!-- output: echo 1 -->\n```text\nold\n```\nb\n<!-- output: echo 2 -->\n```text\nold 2\n```\n"
    assert readme_outputs.markers(text) == ["echo 1", "echo 2"]
    out = readme_outputs.replace_output(text, 1, "new\n\n")
    assert out == "a\n<!-- output: echo 1 -->\n```text\nold\n```\nb\n<!-- output: echo 2 -->\n```text\n$ echo 2\nnew\n```\n"
    assert readme_outputs.run("echo hi; echo err >&2; exit 3") == "hi\nerr\n(exit 3)\n"
    assert readme_outputs.run("printf '\\033[1mbold\\033[0m'") == "bold"


def test_the_output_writer_reads_the_pages_in_the_index_order(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "README.md").write_text("<!-- output: echo r -->\n```text\n```\n")
    (tmp_path / "docs" / "README.md").write_text("[b](b.md) then [a](a.md#x)\n")
    for name in ("a", "b", "c"):
        (tmp_path / "docs" / f"{name}.md").write_text(f"<!-- output: echo {name} -->\n```text\n```\n")
    files = readme_outputs.doc_files(tmp_path)
    names = [p.relative_to(tmp_path).as_posix() for p in files]
    assert names == ["README.md", "docs/README.md", "docs/b.md", "docs/a.md", "docs/c.md"]
    assert [cmd for _, _, cmd in readme_outputs.targets(files)] == ["echo r", "echo b", "echo a", "echo c"]
    readme_outputs.rewrite(files[3], 0, readme_outputs.run("echo a"))
    assert (tmp_path / "docs" / "a.md").read_text() == "<!-- output: echo a -->\n```text\n$ echo a\na\n```\n"
