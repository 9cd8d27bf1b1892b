"""`--report PATH.html`: a command's result document (flows/results.py) as one self-contained page
a person judges a release from: the verdict, where it ran, each artefact's gate in words and in
numbers, pictures of where its masks differ from the exact answer (report/pictures.py), and the
benchmark's charts (report/charts.py).

Self-contained: CSS inline, pictures as data URIs, charts as inline SVG, no script and no address
outside the page, so it reads the same attached to a CI run, mailed, or opened years later.
Jinja2 (the report extra) fills the template with autoescaping on: every name that comes from a
workdir or an image folder is text on the page, never markup.
"""

from pathlib import Path

from unet_export.errors import require
from unet_export.parity.realimages import judged_on_images_only
from unet_export.report import charts
from unet_export.report.pictures import CHANGED, TIE, Pictures
from unet_export.text import counted, gate_rule, x_floor

TEMPLATE = Path(__file__).with_name("report.html.j2")
BADGE = {"verified": "pass", "passed": "pass", "ok": "pass", "failed": "fail", "parity_failed": "fail",
         "changed": "error", "missing": "error", "unreferenced": "error", "error": "error"}  # fmt: skip
RUNTIMES = ("torch", "onnx", "onnxruntime", "openvino", "tensorrt")


def render_html(doc: dict, *, model: dict | None = None, entries: dict[str, dict] | None = None,
                pictures: dict[str, Pictures] | None = None, note: str = "") -> str:  # fmt: skip
    """The page for ``doc``. ``model``: the workdir manifest's model record (architecture, config,
    checkpoint); ``entries``: its artefact entries by path (calibration and gate images, which a
    document leaves out); ``pictures``: per artefact path; ``note``: how the page was made."""
    jinja2 = require("jinja2", extra="report")
    env = jinja2.Environment(autoescape=True, trim_blocks=True, lstrip_blocks=True)
    env.filters |= {"sci": _sci, "pct": _pct, "xfloor": lambda r: x_floor(r) if _number(r) else "-", "size": _size,
                    "dims": _dims}
    template = env.from_string(TEMPLATE.read_text())
    model = model or (doc.get("config") or {}).get("model")
    artifacts = [_artifact(a, (entries or {}).get(a.get("path"), {}), (pictures or {}).get(a.get("path")))
                 for a in doc.get("artifacts") or []]  # fmt: skip
    return template.render(
        doc=doc, verdict=_verdict(doc), header=_header(doc, model), artifacts=artifacts, note=note,
        bench=_bench(doc) if doc.get("results") else None, evaluate=_evaluate(doc),
        changed_rgb="rgb{}".format(CHANGED), tie_rgb="rgb{}".format(TIE),
    )  # fmt: skip


def _verdict(doc: dict) -> dict:
    code = doc.get("exit_code")
    word = {0: "PASSED", 1: "FAILED"}.get(code, "ERROR")
    meaning = {0: "every artefact verified", 1: "an artefact failed its gate"}.get(
        code, "bad input, a missing runtime or a bug: see the error")  # fmt: skip
    return {"word": word, "code": code, "meaning": meaning, "css": {0: "pass", 1: "fail"}.get(code, "error"),
            "error": doc.get("error", "")}  # fmt: skip


def _header(doc: dict, model: dict | None) -> list[tuple[str, str]]:
    versions = doc.get("versions") or {}
    host = doc.get("host") or {}
    rows = [("command", doc.get("command", "")), ("workdir", doc.get("workdir", ""))]
    if model:
        config = ", ".join(f"{k} {v}" for k, v in (model.get("config") or {}).items())
        rows.append(("model", f"{model.get('architecture')} ({config})"))
        ckpt = model.get("checkpoint") or {}
        rows.append(("checkpoint", f"{Path(str(ckpt.get('path', ''))).name}  sha256 {ckpt.get('sha256', '-')}"))
    runtimes = ", ".join(f"{name} {versions[name]}" for name in RUNTIMES if versions.get(name))
    rows += [("unet-export", str(versions.get("unet-export", "-"))), ("runtimes", runtimes or "-"),
             ("python", str(versions.get("python", "-"))),
             ("host", " · ".join(str(host[k]) for k in ("hostname", "cpu", "os") if host.get(k))),
             ("date", str(doc.get("time", "-"))), ("git commit", doc.get("git_commit") or "not in a git repository")]  # fmt: skip
    return [(k, v) for k, v in rows if v]


def _artifact(artifact: dict, entry: dict, pictures: Pictures | None) -> dict:
    parity = artifact.get("parity") or {}
    limits = parity.get("limits")
    status = artifact.get("status") or ""
    quantization = entry.get("quantization") or {}
    return {
        "a": artifact, "status": status, "badge": BADGE.get(status, "skip"),
        "rule": gate_rule(limits, parity.get("tolerance") or artifact.get("precision", "")) if limits else "",
        "reduced": judged_on_images_only(artifact.get("precision")),  # no error bound: no x floor
        "cases": [_case(c) for c in parity.get("cases") or []],
        "image_sets": _image_sets(artifact, quantization),
        "quantization": _quantization(quantization),
        "pictures": pictures,
        "envelope": artifact.get("envelope"),
        "fallback": _fallback(artifact.get("fallback")),
        "accuracy": artifact.get("accuracy"),
        "id": "artefact-" + "".join(ch if ch.isalnum() else "-" for ch in str(artifact.get("path"))),
    }


def _case(case: dict) -> dict:
    where = " ".join(str(case[k]) for k in ("label", "probe") if case.get(k))
    return case | {"where": where, "ratio": case.get("floor_ratio")}


def _image_sets(artifact: dict, quantization: dict) -> list[tuple[str, list[str]]]:
    """Reduced precision: the images it was calibrated on and the held-out images it was judged on."""
    sets = []
    calibration = quantization.get("calibration")
    if isinstance(calibration, dict) and calibration.get("count") is not None:  # a folder: counted and hashed
        span = f" ({calibration.get('first')} to {calibration.get('last')})" if calibration.get("first") else ""
        sets.append((f"calibration images: {counted(int(calibration['count']), 'image')} from "
                     f"{calibration.get('path')}{span}", []))  # fmt: skip
    record = artifact.get("real_images")
    if isinstance(record, dict) and isinstance(record.get("images"), list):
        items = [i for i in record["images"] if isinstance(i, dict)]
        names = [Path(str(i.get("path", ""))).name for i in items]
        folders = sorted({str(Path(str(i.get("path", ""))).parent) for i in items})
        sets.append((f"held-out images the gate judged it on: {counted(len(names), 'image')} from "
                     f"{', '.join(folders)}", names))  # fmt: skip
    return sets


def _quantization(quantization: dict) -> dict | None:
    """INT8: how it was quantized and what the fallback tried before the set that passed."""
    if not quantization:
        return None
    keys = ("engine", "preset", "weight_range", "bias_correction", "accuracy_control", "gate_images")
    facts = [(k, quantization[k]) for k in keys if quantization.get(k) is not None]
    if quantization.get("layers") is not None:
        facts.append(("INT8 layers", f"{quantization.get('int8_layers')} of {quantization['layers']}"))
    if quantization.get("ignored_scope"):
        facts.append(("kept in FP32", ", ".join(map(str, quantization["ignored_scope"]))))
    return {"facts": facts, "attempts": quantization.get("attempts") or [], "worked": quantization.get("worked")}


def _fallback(search) -> dict | None:
    """--fallback auto's search for the fewest layers to keep in FP32 (flows/fallback.record)."""
    if not isinstance(search, dict):
        return None
    found = search.get("found")
    facts = [("searched", f"{search.get('seconds')} s of a {search.get('budget_s')} s budget"),
             ("kept in FP32", ", ".join(map(str, found)) if found else "no set found that passes")]  # fmt: skip
    if search.get("flag"):
        facts.append(("to rebuild it", search["flag"]))
    steps = ([search["base"]] if isinstance(search.get("base"), dict) else []) + [
        s for s in search.get("steps") or [] if isinstance(s, dict)]  # fmt: skip
    return {"facts": facts, "steps": steps}


def _bench(doc: dict) -> dict:
    rows = doc["results"]
    config = doc.get("config") or {}
    device = (doc.get("device") or {}).get("name", "")
    what = f"batch {config.get('batch')} at {config.get('height')}x{config.get('width')} on {device}"
    return {"rows": rows, "what": what, "inputs": config.get("inputs", ""),
            "throughput_svg": charts.throughput_chart(rows, f"Images/s, {what}"),
            "latency_svg": charts.latency_chart(rows, f"Latency per batch, {what}"),
            "verdict": charts.VERDICT}  # fmt: skip


def _evaluate(doc: dict) -> dict | None:
    if not str(doc.get("schema", "")).startswith("unet-export.evaluate"):
        return None
    return {"eager": doc.get("eager") or {}, "images": doc.get("images"), "data": doc.get("data"),
            "gate": doc.get("gate") or {}, "rows": doc.get("artifacts") or []}  # fmt: skip


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _sci(value, digits: int = 2) -> str:
    return f"{value:.{digits}e}" if _number(value) else "-"


def _pct(value, digits: int = 4) -> str:
    return f"{value:.{digits}%}" if _number(value) else "-"


def _size(n) -> str:
    if not _number(n):
        return "-"
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _dims(shape) -> str:
    return "x".join(map(str, shape)) if isinstance(shape, (list, tuple)) else "-"
