"""``--fallback auto``: when a reduced-precision artefact fails its real-image gate, find a small
set of convolutions to keep in FP32 so that it passes. The layers are ranked by their own error
(runtimes/onnx/sensitivity.py: each one alone, on calibration images, rounded as the precision
rounds it); then the set grows in that order, one layer a step, each candidate built and judged by
the real gate (class change and Dice on real images), until one passes; then each layer but the
last added is dropped in turn to see whether the gate still passes without it. All of it within a
time budget: a step is not started when the time left is less than the slowest step so far.

The engine-specific part is a ``trial``: build the artefact with these ONNX nodes in FP32, judge
it, return a Step. The INT8 flow (flows/int8.py) and the FP16 ONNX/TensorRT exports (search_fp16
below) supply theirs."""

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from unet_export.errors import require
from unet_export.parity.gate import GATE_IMAGES
from unet_export.runtimes.onnx.layers import flag_name, label

DEFAULT_BUDGET_S = 180.0
RANKED_SHOWN = 8  # how many of the ranked layers the report keeps
FP16_ON_CPU = ("judged on the CPU: ONNX Runtime's CPU provider computes most FP16 operators in FP32, so this "
               "proves the FP16 storage rounding only, not a GPU's FP16 arithmetic; run it on the GPU to prove that")  # fmt: skip


@dataclass
class Step:
    """One candidate FP32 set and what the gate said about it."""

    fp32: list[str]  # ONNX node names
    passed: bool
    class_change: float | None = None  # the worst batch's share of pixels that changed class
    dice_vs_eager: float | None = None  # the worst batch's
    dice: float | None = None  # vs ground truth, with --val
    latency_ms: float | None = None  # best of 5, first gate batch, on the CPU
    seconds: float = 0.0
    failures: list[str] = field(default_factory=list)
    layers: list[str] = field(default_factory=list)  # the same set, named both ways


@dataclass
class Search:
    ranked: list[tuple[str, float]]  # (node, score), most sensitive first
    steps: list[Step]
    found: list[str] | None
    budget_s: float
    seconds: float
    base: Step | None = None  # the failing artefact the search started from


def grow(ranked: list[str], trial: Callable[[list[str]], Step], budget_s: float) -> tuple[list[str] | None, list[Step]]:
    """The first prefix of ``ranked`` that passes, then pruned: (the set found or None, every step)."""
    started, steps, found = time.monotonic(), [], None

    def affordable() -> bool:
        slowest = max((s.seconds for s in steps), default=0.0)
        return time.monotonic() - started + slowest <= budget_s

    for k in range(1, len(ranked) + 1):
        if not affordable():
            break
        steps.append(trial(ranked[:k]))
        if steps[-1].passed:
            found = ranked[:k]
            break
    for node in list(found or [])[:-1]:  # the last one added was needed: the prefix before it failed
        if not affordable():
            break
        smaller = [n for n in found if n != node]
        steps.append(trial(smaller))
        if steps[-1].passed:
            found = smaller
    return found, steps


def step_numbers(parity, accuracy: dict | None) -> dict:
    """The gate's numbers for a Step: the worst batch's class change (envelope probes included) and
    Dice vs eager (on the whole images, as the gate judges it), and Dice vs ground truth when
    there are masks."""
    cases = parity.cases
    whole = [c for c in cases if c.probe in ("", GATE_IMAGES)]  # Dice is judged on whole images only
    return {"passed": parity.passed, "failures": parity.failures()[:2],
            "class_change": max((c.argmax_disagreement for c in cases), default=None),
            "dice_vs_eager": min((c.dice_vs_eager for c in whole), default=None),
            "dice": accuracy["dice"] if accuracy else None}  # fmt: skip


def best_ms(run: Callable[[], object], repeats: int = 5) -> float:
    """The fastest of ``repeats`` timed calls of ``run`` after one warm-up, in milliseconds: on a
    shared machine the fastest run is the one least disturbed by others."""
    run()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        run()
        times.append((time.perf_counter() - t) * 1e3)
    return min(times)


def record(search: Search, onnx_path: Path) -> dict:
    """The manifest's (and --json's) account of a search: ranking, steps, set found, the reusable
    flag and the measured cost of each layer kept (latency with it minus latency without it)."""
    graph = require("onnx").load(str(onnx_path), load_external_data=False).graph
    nodes = {n.name: n for n in graph.node}
    name = lambda node: label(nodes[node]) if node in nodes else node  # noqa: E731
    steps = [asdict(s) | {"layers": [name(n) for n in s.fp32]} for s in search.steps]
    base = asdict(search.base) | {"layers": []} if search.base else None
    out = {"budget_s": search.budget_s, "seconds": round(search.seconds, 1), "base": base, "steps": steps,
           "ranked": [{"layer": name(n), "node": n, "score": s} for n, s in search.ranked[:RANKED_SHOWN]],
           "found": [name(n) for n in search.found] if search.found is not None else None,
           "found_nodes": search.found, "flag": None, "cost_ms": {}}  # fmt: skip
    if search.found:
        out["flag"] = " ".join(f"--fp32-layers {flag_name(graph, nodes[n]) if n in nodes else n}" for n in search.found)
        out["cost_ms"] = {name(n): _cost(search, n) for n in search.found}
    return out


def _cost(search: Search, node: str) -> float | None:
    """Latency of the set found minus that of the same set without ``node``, where both were timed."""
    timed = {tuple(sorted(s.fp32)): s.latency_ms for s in [*([search.base] if search.base else []), *search.steps]}
    with_it = timed.get(tuple(sorted(search.found)))
    without = timed.get(tuple(sorted(n for n in search.found if n != node)))
    return None if with_it is None or without is None else round(with_it - without, 3)


def search_fp16(workdir: str | Path, build: Callable[[list[str]], object], failed, budget_s: float,
                data: str | Path | None, on_cpu: bool, time_it: bool):  # fmt: skip
    """--fallback auto for an FP16 artefact that failed its gate (``failed``, an ExportResult):
    rank the FP32 ONNX model's convolutions by their FP16 error on the gate's real images, grow
    the FP32 set with ``build(nodes)`` (export_fp16_onnx or build_trt with those --fp32-layers,
    which publishes and judges) and return the last result, its manifest entry carrying the search
    under ``fallback``. ``on_cpu``: the gate ran on the CPU, which the record says plainly
    (FP16_ON_CPU); ``time_it``: time each artefact on the CPU (ONNX Runtime)."""
    from unet_export.parity.realimages import gate_images
    from unet_export.runtimes.onnx.sensitivity import rank_layers
    from unet_export.workdir.lookup import onnx_entry
    from unet_export.workdir.manifest import checked_path, load_manifest, transaction
    from unet_export.workdir.runners import artifact_runner

    started, workdir = time.perf_counter(), Path(workdir)
    manifest = load_manifest(workdir)
    onnx_path = checked_path(workdir, onnx_entry(manifest, workdir))
    batches, _ = gate_images(manifest, failed.entry, data)
    ranked = rank_layers(onnx_path, [x.numpy() for x in batches[:2]], "fp16")

    def latency(result) -> float | None:
        if not time_it:
            return None
        with artifact_runner(result.entry, workdir, "cpu") as runner:
            return round(best_ms(lambda: runner.infer(batches[0])), 3)

    last = {}

    def trial(nodes: list[str]) -> Step:
        t = time.perf_counter()
        last["result"] = build(list(nodes))  # convert_onnx_fp16 keeps the activations between them FP32 too
        numbers = step_numbers(last["result"].parity, None)
        return Step(list(nodes), latency_ms=latency(last["result"]), seconds=time.perf_counter() - t, **numbers)

    base = Step([], latency_ms=latency(failed), **step_numbers(failed.parity, None))
    found, steps = grow([n for n, _ in ranked], trial, budget_s)
    if found is not None and steps[-1].fp32 != found:
        trial(found)
    result = last.get("result", failed)
    search = Search(ranked, steps, found, budget_s, time.perf_counter() - started, base)
    result.entry["fallback"] = record(search, onnx_path) | {"note": FP16_ON_CPU if on_cpu else None}
    with transaction(workdir) as current:  # the published entry keeps the account of how it was found
        for entry in current["artifacts"]:
            if entry["path"] == result.entry["path"]:
                entry["fallback"] = result.entry["fallback"]
    return result
