"""What the export commands print (onnx, torchscript, aoti, trt, openvino, int8; demo too): the
artefact and its parity table, the verdict, an IR's weights file, INT8's calibration and attempts."""

from pathlib import Path

from unet_export.api import ExportResult
from unet_export.cli.common import console
from unet_export.cli.render import dims, parity_table
from unet_export.runtimes.tensorrt.plan import entry_profiles
from unet_export.text import counted


def _mb(n_bytes: int) -> str:
    return f"{n_bytes / 1e6:.1f} MB"


def export_report(result: ExportResult, workdir) -> None:
    entry = result.entry
    shape = "static" if not entry["dynamic_axes"] else "dynamic batch/height/width"
    if profiles := entry_profiles(entry):  # a TensorRT engine: what built it, for which GPU, for which shapes
        listed = "; ".join(f"min {dims(p.min)} opt {dims(p.opt)} max {dims(p.max)}" for p in profiles)
        shape = (f"TensorRT {entry['tensorrt_version']}, {entry['gpu']} (sm {entry['compute_capability']}), "
                 f"{'profile' if len(profiles) == 1 else f'{len(profiles)} profiles:'} {listed}")  # fmt: skip
    opset = f", opset {entry['opset']}" if "opset" in entry else ""
    label = f"{entry['format']} {entry['precision']}"
    console.print(f"[bold]{label}[/] {result.path} ({_mb(entry['bytes'])}{opset}, {shape})")
    if entry.get("traced"):  # TorchScript that could not be scripted: the trace fixed its shape
        fixed = dims(entry["inputs"][0]["shape"])
        console.print(f"torch.jit.script failed ({entry['traced']}): traced at {fixed}, "
                      "the TorchScript model takes only that shape", markup=False)  # fmt: skip
    if entry.get("fp32_nodes"):
        nodes = entry["fp32_nodes"]
        console.print(f"kept in FP32: {counted(len(nodes), 'node')} ({', '.join(nodes[:6])})")
    if result.dropped:
        dropped = counted(result.dropped, "entry", "entries")
        console.print(f"manifest: new checkpoint, {dropped} of the previous one dropped")
    if result.parity.cases:
        console.print(parity_table(result))
    envelope_lines(entry.get("envelope"), result.parity.cases)
    if result.passed:
        console.print(f"[green]verified[/] in {result.seconds:.1f} s, recorded in {workdir / 'manifest.json'}")
    else:
        for failure in result.parity.failures():
            console.print(f"[red]parity failed[/] {failure}")
        console.print(f"[red]FAILED[/]: {result.path} recorded as failed in {workdir / 'manifest.json'}")


def envelope_lines(record: dict | None, cases) -> None:
    """The envelope the artefact declares, whether the gate proved it, each batch against its
    images run alone, and the shapes just outside that it refuses."""
    if not record:
        return
    for case in cases:
        alone = getattr(case, "alone", None)
        if alone and "max_abs_diff" in alone:
            bound = f" (allowed {alone['allowed']:.2g})" if alone.get("allowed") is not None else \
                f", {alone['class_change']:.4%} of pixels change class"
            verdict = "[green]same[/]" if alone["passed"] else "[red]DIFFERENT[/]"
            console.print(f"batch {dims(case.shape)} vs each image alone: max |diff| {alone['max_abs_diff']:.2g}"
                          f"{bound}: {verdict}")  # fmt: skip
    verdict = "[green]proven[/]" if record["proven"] else "[red]not proven[/]"
    console.print(f"envelope: {record['describe']}: {verdict} at {counted(len(record['checked']), 'shape')}")
    for refusal in record.get("refused", []):
        console.print(f"  refuses {dims(refusal['shape'])} ({refusal['probe']})")


def shower(workdir: Path):
    """What `int8` (and `demo`) print as each artefact lands: the export report, an IR's .bin,
    and for INT8 the calibration, the attempts, the layers left in FP32 and Dice vs ground truth."""

    def show(result: ExportResult) -> None:
        export_report(result, workdir)
        weights_line(result)
        if result.entry["precision"] == "int8":
            int8_report(result)

    return show


def weights_line(result: ExportResult) -> None:
    """An IR is two files: export_report shows the .xml, this the .bin the manifest records with it."""
    weights = result.entry.get("weights")
    if weights:
        console.print(f"weights {result.path.with_name(weights['path'])} ({weights['bytes'] / 1e6:.1f} MB, sha256 "
                      f"{weights['sha256'][:12]}), OpenVINO {result.entry['openvino_version']}")  # fmt: skip


def int8_report(result: ExportResult) -> None:
    """What was calibrated on, what was tried, which layers stayed FP32, Dice vs ground truth."""
    q, accuracy = result.entry["quantization"], result.entry.get("accuracy")
    calib = q["calibration"]
    console.print(f"calibration: {counted(calib['count'], 'image')} of {calib['path']} "
                  f"({calib['first']} .. {calib['last']}, "
                  f"sha256 {calib['sha256'][:12]}); gate on {q['gate_images']}")  # fmt: skip
    for attempt in q["attempts"]:
        verdict = "[green]passed[/]" if attempt["passed"] else f"[red]failed[/] ({'; '.join(attempt['failures'][:2])})"
        console.print(
            f"  attempt {attempt['name']}: preset {attempt['preset']}, {attempt['fp32_nodes']} layers in FP32 -> {verdict}"
        )
    if q.get("search"):
        search_report(q["search"])
    worked = f"[green]{q['worked']}[/]" if q["worked"] else "[red]none passed[/] (the last one is recorded as failed)"
    control = ", with NNCF accuracy control on Dice" if q["accuracy_control"] else ""
    console.print(
        f"INT8: {q['int8_layers']} of {q['layers']} convolutions, preset {q['preset']}{control}; worked: {worked}"
    )
    fp32 = result.entry["fp32_nodes"]
    console.print(f"stayed FP32: {', '.join(fp32) if fp32 else 'none'}")
    if accuracy:
        console.print(f"Dice vs ground truth on {accuracy['images']} held-out images: eager {accuracy['eager_dice']:.4f}, "
                      f"int8 {accuracy['dice']:.4f} ({-accuracy['drop']:+.4f}; allowed drop {accuracy['max_drop']})")  # fmt: skip


def _gate_numbers(step: dict) -> str:
    numbers = []
    if step.get("class_change") is not None:
        numbers.append(f"class change {step['class_change']:.4%}, Dice vs eager {step['dice_vs_eager']:.5f}")
    if step.get("dice") is not None:
        numbers.append(f"Dice vs ground truth {step['dice']:.4f}")
    if step.get("latency_ms") is not None:
        numbers.append(f"{step['latency_ms']:.1f} ms/batch")
    return ", ".join(numbers)


def search_report(search: dict) -> None:
    """--fallback auto: the ranking, each step with the gate's numbers, the set found (both names),
    the flag that re-applies it and the measured cost of each layer kept in FP32."""
    if search.get("note"):
        console.print(f"[yellow]note[/]: {search['note']}")
    ranked = ", ".join(f"{r['layer']} {r['score']:.3g}" for r in search["ranked"][:4])
    console.print(f"fallback auto: layers ranked by their own error alone on real images: {ranked}")
    if search.get("base"):
        console.print(f"  without FP32 layers: {_gate_numbers(search['base'])} -> [red]failed[/]")
    before: set = set()
    for i, step in enumerate(search["steps"], 1):
        verdict = "[green]passed[/]" if step["passed"] else "[red]failed[/]"
        now = set(step["layers"])
        change = [f"+{layer}" for layer in step["layers"] if layer not in before] + [f"-{layer}" for layer in sorted(before - now)]
        console.print(f"  step {i} ({step['seconds']:.1f} s): {' '.join(change) or 'the set found again'} -> "
                      f"{len(now)} in FP32: {_gate_numbers(step)} -> {verdict}")  # fmt: skip
        before = now
    if search["found"] is None:
        console.print(f"[red]fallback auto found no FP32 set that passes[/] in {search['seconds']:.0f} s "
                      f"(budget {search['budget_s']:g} s, {len(search['steps'])} sets tried)")  # fmt: skip
        return
    costs = "; ".join(f"{layer}: {'not timed' if ms is None else f'{ms:+.1f} ms/batch'}"
                      for layer, ms in search["cost_ms"].items())  # fmt: skip
    console.print(f"fallback auto kept {len(search['found'])} layer(s) in FP32 in {search['seconds']:.0f} s: "
                  f"{', '.join(search['found'])}")  # fmt: skip
    console.print(f"  speed cost (CPU, latency with the layer in FP32 minus without): {costs}")
    console.print(f"  re-apply with: {search['flag']}")
