"""What the system commands print: doctor's table of checks, and inspect's plain-text description
of one artefact (demo prints with the export, verify and bench renderers)."""

import json

from rich.markup import escape
from rich.table import Table

from unet_export.cli.render import gate_rule
from unet_export.flows.inspect import ArtifactInfo
from unet_export.text import counted

DOCTOR_STYLE = {"ok": "green", "warn": "yellow", "missing": "yellow"}


def doctor_table(rows) -> Table:
    """`doctor`: one row per check; a value when ok, else why not and the fix."""
    counts = {status: sum(r.status == status for r in rows) for status in DOCTOR_STYLE}
    caption = ", ".join(f"{n} {status}" for status, n in counts.items())
    table = Table(title="unet-export doctor: what this machine can run", title_justify="left", caption=caption,
                  caption_justify="left")  # fmt: skip
    for column in ("check", "status", "detail"):
        table.add_column(column, overflow="fold")
    for row in rows:
        # escape: install hints such as pip install "unet-export[trt]" would read as Rich markup
        table.add_row(escape(row.name), f"[{DOCTOR_STYLE.get(row.status, 'red')}]{row.status}[/]", escape(row.detail))
    return table


KIND = {"onnx": "ONNX", "torchscript": "TorchScript", "aoti": "AOTInductor package", "openvino": "OpenVINO IR",
        "tensorrt": "TensorRT engine"}  # fmt: skip


def report_lines(info: ArtifactInfo) -> list[str]:
    head = [KIND[info.format], info.precision or "precision unknown"]
    head += [f"opset {info.opset}"] if info.opset is not None else []
    head += [counted(info.nodes, "op" if info.format == "openvino" else "node")] if info.nodes is not None else []
    lines = [f"{info.path.name}: {', '.join(head)}",
             f"file     {info.path} ({info.bytes / 1e6:.1f} MB), sha256 {info.sha256}"]  # fmt: skip
    weights = (info.entry or {}).get("weights")
    if weights:
        lines.append(f"weights  {weights['path']} ({weights['bytes'] / 1e6:.1f} MB), sha256 {weights['sha256']}")
    lines += [f"{role:<8} {t.name} {t.dtype} [{', '.join(map(str, t.shape))}]"
              for role, tensors in (("input", info.inputs), ("output", info.outputs)) for t in tensors]  # fmt: skip
    lines.append(f"dynamic  {_dynamic(info)}")
    lines += _model_lines(info)
    lines.append(f"verdict  {_verdict(info)}")
    lines += [f"note     {note}" for note in info.notes]
    return lines


def _dynamic(info: ArtifactInfo) -> str:
    axes = [f"{dim} (axis {i})" for t in info.inputs for i, dim in enumerate(t.shape) if isinstance(dim, str)]
    return ", ".join(dict.fromkeys(axes)) or "none: static shapes"


def _model_lines(info: ArtifactInfo) -> list[str]:
    model, lines = info.model, []
    if model.get("architecture"):
        config = json.dumps(model.get("config", {}), separators=(", ", ": "))
        size = model.get("export_size")
        at = f", exported at {size[0]}x{size[1]}" if isinstance(size, list) and len(size) == 2 else ""
        lines.append(f"model    {model['architecture']} {config}{at}")
    pixels = _pixels(model.get("preprocess"))
    if pixels:
        lines.append(f"pixels   {pixels}")
    rule = info.size_rule
    if rule:
        if rule.get("static"):
            lines.append("sizes    static: the export size only")
        else:
            form = f"{rule['offset']} + {rule['multiple']}k" if rule.get("offset") else \
                f"multiples of {rule['multiple']}" if rule.get("multiple", 1) > 1 else "any"  # fmt: skip
            shrink = f"; output {rule['shrink']} smaller" if rule.get("shrink") else ""
            lines.append(f"sizes    H and W: {form}, at least {rule['min']}{shrink}")
    return lines


def _pixels(pp) -> str | None:
    """The encoder normalisation a record adds to milesial's /255 (smp models), else None: an old
    record's lines stay as they were."""
    if not isinstance(pp, dict) or (pp.get("mean") is None and not pp.get("bgr")):
        return None
    steps = ["/255 when above 1"] + (["channels reversed (BGR)"] if pp.get("bgr") else [])
    if pp.get("mean") is not None:
        steps.append(f"(x - mean) / std, mean {json.dumps(pp['mean'])}, std {json.dumps(pp.get('std'))}")
    return ", then ".join(steps) + (f" ({pp['source']})" if pp.get("source") else "")


def _verdict(info: ArtifactInfo) -> str:
    entry = info.entry
    if entry is None:
        return "none recorded"
    parity = entry.get("parity") or {}
    runner, device = str(parity.get("runner") or ""), str(parity.get("device") or "")
    where = f"checked with {runner}" if runner else ""
    where += f" on {device}" if device and device not in runner else ""
    rule = gate_rule(parity.get("limits"), parity.get("tolerance") or entry.get("precision", ""))
    when = f", {entry['created']}" if entry.get("created") else ""
    which = "" if info.verified_file else " (for another file: this one changed since)"
    return f"{entry['status']}{which}: {rule}" + (f"; {where}" if where else "") + when
