"""The layer rule (docs/contributing.md, Architecture), read from the source with ``ast``
(nothing is imported): every import of one of the package's modules, at the top of a file or
inside a function, points down the layer order or stays in its layer, and no modules import each
other in a loop.

Layers, top to bottom: cli > api > serving > predict > bench > report > flows > parity > inference >
workdir > runtimes > base. A new module must be placed in PLACES (test_every_module_is_placed)."""

import ast
from pathlib import Path

import unet_export

ROOT = Path(unet_export.__path__[0])
PACKAGE = ROOT.name

LAYERS = ["base", "runtimes", "workdir", "inference", "parity", "flows", "report", "bench", "predict", "serving", "api",
          "cli"]

# module -> layer. "x.y" places x.y and everything under it; "x.y.*" only what is under x.y;
# "unet_export" is the package's __init__ alone. The most specific name wins.
PLACES = {
    # base: no knowledge of exports, runtimes or workdirs
    "unet_export": "base",  # the package's __init__ (the version)
    "unet_export.data": "base",
    "unet_export.models": "base",
    "unet_export.models.external": "base",  # a user's factory or nn.Module: imported, never by a manifest
    "unet_export.checkpoint": "base",
    "unet_export.checkpoint_archive": "base",
    "unet_export.pickled": "base",
    "unet_export.device": "base",
    "unet_export.assets": "base",
    "unet_export.errors": "base",
    "unet_export.fileio": "base",
    "unet_export.metrics": "base",
    "unet_export.lockcheck": "base",
    "unet_export.text": "base",
    # runtimes: one folder per runtime, writer and runner side by side; paths, never manifest entries
    "unet_export.runtimes": "runtimes",
    # workdir: everything that knows manifest.json (runners.py: a manifest entry -> its Runner)
    "unet_export.workdir": "workdir",
    # inference: one image through any artefact (predictor, tiling, masks)
    "unet_export.inference": "inference",
    # parity: the gate (gate.py), the real images it judges reduced precision on, run_parity
    "unet_export.parity": "parity",
    # flows: one use case each, over a whole workdir (and the --json documents of every command)
    "unet_export.flows": "flows",
    # report: the HTML / JUnit / job-summary writers over a command's result document
    "unet_export.report": "report",
    # bench: the harness (run.py), its row rules (stats.py), its rows (backends.py)
    "unet_export.bench": "bench",
    # predict: batch prediction
    "unet_export.predict": "predict",
    "unet_export.serving": "serving",
    "unet_export.api": "api",
    "unet_export.cli": "cli",
    "unet_export.__main__": "cli",
}

# (module, imported module) pairs that still point up, each waiting for a move of a later slice.
# Every entry must still occur: the list only shrinks.
KNOWN_UPWARD: dict[tuple[str, str], str] = {}


def modules() -> dict[str, Path]:
    found = {}
    for path in ROOT.rglob("*.py"):
        parts = [PACKAGE, *path.relative_to(ROOT).with_suffix("").parts]
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


MODULES = modules()


def layer_of(module: str) -> str | None:
    best, layer = -1, None
    for name, place in PLACES.items():
        if name == PACKAGE:
            hit = module == name
        elif name.endswith(".*"):
            hit = module.startswith(name[:-1])
        else:
            hit = module == name or module.startswith(name + ".")
        if hit and len(name) > best:
            best, layer = len(name), place
    return layer


def imported(module: str, node: ast.Import | ast.ImportFrom, is_package: bool) -> list[str]:
    """The package's modules whose names ``node`` (in ``module``) uses: ``import X.y`` uses X.y;
    ``from X import y`` uses the submodule X.y where there is one (as ``import X.y`` does), else
    X itself (y is a name defined in X)."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        if node.level:
            here = module.split(".") if is_package else module.split(".")[:-1]
            base = ".".join(here[: len(here) - (node.level - 1)] + ([node.module] if node.module else []))
        else:
            base = node.module or ""
        names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
    return sorted({name for name in names if name in MODULES and name != module})


def edges() -> list[tuple[str, int, str]]:
    """(module, line, imported module) for every import of a package module, anywhere in the file."""
    found = []
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                targets = imported(module, node, path.name == "__init__.py")
                found += [(module, node.lineno, target) for target in targets]
    return found


def upward() -> list[tuple[str, int, str]]:
    rank = {layer: i for i, layer in enumerate(LAYERS)}
    return [(m, line, t) for m, line, t in edges() if rank[layer_of(t)] > rank[layer_of(m)]]


def cycles() -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for module, _, target in edges():
        graph[module].add(target)
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start), on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child), on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def where(module: str, line: int) -> str:
    return f"{MODULES[module].relative_to(ROOT.parent)}:{line}"


def test_every_module_is_placed():
    unplaced = sorted(m for m in MODULES if layer_of(m) is None)
    assert not unplaced, f"place these modules in a layer (PLACES in {Path(__file__).name}): {unplaced}"
    assert len(MODULES) > 80  # the walk found the package


def test_no_import_points_up_the_layers():
    found = [(m, line, t) for m, line, t in upward() if (m, t) not in KNOWN_UPWARD]
    lines = [f"{where(m, line)}: {m} ({layer_of(m)}) imports {t} ({layer_of(t)})" for m, line, t in found]
    assert not lines, "imports that point up the layer order:\n" + "\n".join(lines)


def test_known_upward_imports_are_still_needed():
    """An entry of KNOWN_UPWARD that no longer occurs is removed, so the list only shrinks."""
    occurring = {(m, t) for m, _, t in upward()}
    stale = sorted(set(KNOWN_UPWARD) - occurring)
    assert not stale, f"remove these from KNOWN_UPWARD, they no longer occur: {stale}"


def test_no_import_cycles():
    loops = cycles()
    assert not loops, "modules that import each other in a loop:\n" + "\n".join(" <-> ".join(c) for c in loops)


WRITERS = {"export", "fp16", "layers", "build", "plan", "formats", "int8"}  # last part of a runtimes module's name


def test_writers_do_not_import_runners():
    """Within the runtimes layer one direction only: a runner may read its format's writer module
    (metadata, engine plans), a writer never imports a runner."""
    runtimes = [(m, line, t) for m, line, t in edges() if layer_of(m) == "runtimes" == layer_of(t)]
    found = [(m, line, t) for m, line, t in runtimes
             if m.rsplit(".", 1)[-1] in WRITERS and t.rsplit(".", 1)[-1] not in WRITERS]  # fmt: skip
    assert not found, [f"{where(m, line)}: {m} imports {t}" for m, line, t in found]
    assert any(t.endswith(".layers") for m, _, t in runtimes if m.endswith(".fp16"))  # the rule sees writers


def test_the_rule_sees_function_local_and_relative_imports():
    """The parser resolves what the package's code uses: relative imports and imports inside a
    function count like top-level ones."""
    tree = ast.parse("def f():\n    from ...errors import UserError\n    from .. import base, Runner\n")
    nodes = [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert imported("unet_export.runtimes.onnx.runner", nodes[0], False) == ["unet_export.errors"]
    assert imported("unet_export.runtimes.onnx.runner", nodes[1], False) == ["unet_export.runtimes", "unet_export.runtimes.base"]
    found = {(m, t) for m, _, t in edges()}
    assert ("unet_export.bench.run", "unet_export.parity.gate") in found  # a top-level import
    assert ("unet_export.flows.doctor", "unet_export.flows.cpp_check") in found  # one inside a function only
    assert layer_of("unet_export.workdir.runners") == "workdir" and layer_of("unet_export.bench.backends") == "bench" and layer_of("unet_export.runtimes.base") == "runtimes"
    assert layer_of("unet_export.flows.int8") == "flows" and layer_of("unet_export.runtimes.onnx.export") == "runtimes"
