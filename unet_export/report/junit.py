"""`--junit PATH.xml`: a command's result document (flows/results.py) as a JUnit report, the
format CI systems show as tests (GitHub Actions test reporters, GitLab, Jenkins).

One test suite per artefact (per bench row table, for unet-bench), one test case per artefact x
gate check x input: the checks the gate recorded for that input (parity.gate.CHECKS), so a
failed class-change check is one red test whose message is the gate's own line, with the loosest
tolerance that would have passed. The numbers are the suite's properties (the Jenkins JUnit
schema, which GitLab and the GitHub reporters also read, allows properties on suites only), and
each case repeats its own in system-out. An artefact that was not judged here is a skipped
case with the reason; a file that changed or is missing is an error.
"""

import xml.etree.ElementTree as ET

from unet_export.parity.gate import ALONE, CLASS_CHANGE, DICE, ERROR, OUTPUT, CaseResult
from unet_export.text import gate_rule

NUMBERS = ("max_err_fp64", "noise_floor", "floor_ratio", "atol", "max_abs_err", "argmax_disagreement", "tie_pixels",
           "dice_vs_eager")  # fmt: skip
# The numbers each check is decided by, in its test case's system-out (all of them: the suite's properties).
CHECK_NUMBERS = {OUTPUT: ("shape",), ERROR: ("max_err_fp64", "noise_floor", "floor_ratio", "atol"),
                 CLASS_CHANGE: ("argmax_disagreement", "differing_pixels", "tie_pixels"), DICE: ("dice_vs_eager",),
                 ALONE: ("max_abs_diff", "allowed", "class_change")}  # fmt: skip
ERRORS = ("changed", "missing", "unreferenced")  # verify: the file is not the verified one, or cannot be judged
SKIPS = ("unavailable", "not_judged")


def junit_xml(doc: dict) -> bytes:
    """The JUnit XML of one result document (export, verify, evaluate or bench)."""
    root = ET.Element("testsuites", name=doc.get("command", "unet-export"))
    suites = [_artifact_suite(a, doc) for a in doc.get("artifacts") or []]
    if doc.get("results"):
        suites.append(_bench_suite(doc))
    if doc.get("schema", "").startswith("unet-export.evaluate"):
        suites = [_evaluate_suite(doc)]
    if not suites:  # a run that ended before judging anything: its error is the one test
        suites = [_error_suite(doc)]
    for suite in suites:
        root.append(suite)
    _count(root, root.findall("testsuite"))
    if doc.get("seconds") is not None:
        root.set("time", f"{doc['seconds']:.3f}")
    ET.indent(root)
    return ET.tostring(root, encoding="utf-8", xml_declaration=True) + b"\n"


def _suite(name: str, doc: dict, properties: dict) -> ET.Element:
    suite = ET.Element("testsuite", name=name, timestamp=str(doc.get("time", "")),
                       hostname=str((doc.get("host") or {}).get("hostname", "")))  # fmt: skip
    props = ET.SubElement(suite, "properties")
    for key, value in properties.items():
        if value not in (None, ""):
            ET.SubElement(props, "property", name=key, value=_text(value))
    return suite


def _case(suite: ET.Element, classname: str, name: str, *, failure: str = "", error: str = "", skipped: str = "",
          out: str = "") -> ET.Element:  # fmt: skip
    case = ET.SubElement(suite, "testcase", classname=classname, name=name)
    if failure:
        ET.SubElement(case, "failure", message=failure.splitlines()[0], type="parity").text = failure
    if error:
        ET.SubElement(case, "error", message=error.splitlines()[0], type="integrity").text = error
    if skipped:
        ET.SubElement(case, "skipped", message=skipped)
    if out:
        ET.SubElement(case, "system-out").text = out
    return case


def _artifact_suite(artifact: dict, doc: dict) -> ET.Element:
    """One artefact: a test case per gate check per input, the accuracy gate, or why it was not judged."""
    parity = artifact.get("parity") or {}
    limits = parity.get("limits")
    props = {"format": artifact.get("format"), "precision": artifact.get("precision"), "path": artifact.get("path"),
             "status": artifact.get("status"), "sha256": artifact.get("sha256"), "bytes": artifact.get("bytes"),
             "runner": parity.get("runner"), "device": parity.get("device"),
             "rule": gate_rule(limits, parity.get("tolerance") or artifact.get("precision", "")) if limits else None}  # fmt: skip
    cases = parity.get("cases") or []
    for i, case in enumerate(cases, 1):
        props |= {f"input {i} {key}": case.get(key) for key in ("shape", "label", "probe", *NUMBERS)}
    suite = _suite(f"{artifact.get('path')} ({artifact.get('format')} {artifact.get('precision')})", doc, props)
    classname = f"unet-export.{artifact.get('format')}.{artifact.get('precision')}"
    status = artifact.get("status")
    if status in ERRORS:
        _case(suite, classname, "integrity", error=artifact.get("reason") or status)
        return suite
    if status in SKIPS:
        _case(suite, classname, "parity", skipped=artifact.get("reason") or status)
        return suite
    # An accuracy gate this run did not re-run (verify: the export's record) is no test of this run.
    accuracy = artifact.get("accuracy") if not doc.get("schema", "").startswith("unet-export.verify") else None
    accuracy_error = accuracy is not None and not accuracy.get("passed", True)
    if parity.get("error") and not (accuracy_error and cases):  # the artefact would not run
        _case(suite, classname, "runs", failure=parity["error"])
    for i, record in enumerate(cases, 1):
        _input_cases(suite, classname, i, record)
    if accuracy is not None:
        _case(suite, classname, "Dice vs ground truth", failure=parity.get("error", "") if accuracy_error else "",
              out=_numbers(accuracy, ("images", "eager_dice", "dice", "drop", "max_drop")))  # fmt: skip
    recheck = artifact.get("recheck")  # unet-export report: the gate re-run on real images
    if recheck:
        _case(suite, classname, f"re-run on {recheck['images']} real images",
              failure="; ".join(recheck["failures"]) if not recheck["passed"] else "")  # fmt: skip
    if not list(suite.iter("testcase")):  # judged on nothing: one case with the verdict
        _case(suite, classname, "parity", failure="" if status == "verified" else f"status {status}")
    return suite


def _input_cases(suite: ET.Element, classname: str, i: int, record: dict) -> None:
    case = CaseResult(shape=record.get("shape") or [], failures=list(record.get("failures") or []),
                      checks=dict(record.get("checks") or {}))  # fmt: skip
    where = "x".join(map(str, case.shape)) + "".join(f" {record[k]}" for k in ("label", "probe") if record.get(k))
    failed = case.failed_checks()
    checks = list(case.checks) or ["parity"]  # a record from before the checks were kept
    for check in checks:
        numbers = record.get("alone") or {} if check == ALONE else record
        _case(suite, classname, f"input {i} ({where}): {check}", failure=failed.get(check, ""),
              out=_numbers(numbers, CHECK_NUMBERS.get(check, NUMBERS)))  # fmt: skip


def _bench_suite(doc: dict) -> ET.Element:
    """unet-bench: a test case per row, its parity verdict; the timings as properties."""
    config = doc.get("config") or {}
    suite = _suite("unet-bench", doc, {"batch": config.get("batch"), "height": config.get("height"),
                                       "width": config.get("width"), "mode": config.get("mode"),
                                       "device": (doc.get("device") or {}).get("name")})  # fmt: skip
    props = suite.find("properties")
    for row in doc["results"]:
        name = f"{row['backend']} {row['precision']}"
        for key in ("img_per_s", "speedup_vs_eager"):
            if row.get(key) is not None:
                ET.SubElement(props, "property", name=f"{name} {key}", value=_text(row[key]))
        for key in ("p50", "p99"):
            if (row.get("latency_ms") or {}).get(key) is not None:
                ET.SubElement(props, "property", name=f"{name} latency_ms {key}", value=_text(row["latency_ms"][key]))
        status, reason = row.get("status"), row.get("reason") or ""
        _case(suite, "unet-bench", name, failure=reason or status if status == "parity_failed" else "",
              error=reason or status if status == "error" else "",
              skipped=reason or status if status in ("unavailable", "not_judged") else "",
              out=_numbers(row.get("parity") or {}, ("max_err_fp64", "noise_floor", "allowed", "argmax_disagreement",
                                                     "dice_vs_eager")))  # fmt: skip
    return suite


def _evaluate_suite(doc: dict) -> ET.Element:
    """evaluate: a test case per artefact (and eager), failed by the --min-dice / --max-delta gate."""
    gate = doc.get("gate") or {}
    suite = _suite("unet-export evaluate", doc, {"data": doc.get("data"), "images": doc.get("images"),
                                                 "eager dice": (doc.get("eager") or {}).get("dice"),
                                                 "min_dice": gate.get("min_dice"), "max_delta": gate.get("max_delta")})  # fmt: skip
    failures = gate.get("failures") or []
    rows = [("eager", "eager", doc.get("eager") or {})] + [
        (f"{a['format']} {a['precision']}", a["path"], a) for a in doc.get("artifacts") or []]  # fmt: skip
    for name, shown, row in rows:  # the gate names a row by format and precision (flows/evaluate.gate)
        mine = [f for f in failures if f.startswith(f"{name}:")]
        _case(suite, "unet-export.evaluate", f"{shown}: Dice vs ground truth", failure="; ".join(mine),
              skipped=row.get("reason", "") if row.get("status") == "unavailable" else "",
              out=_numbers(row, ("dice", "delta_vs_eager")))  # fmt: skip
    return suite


def _error_suite(doc: dict) -> ET.Element:
    suite = _suite(doc.get("command", "unet-export"), doc, {"exit_code": doc.get("exit_code")})
    _case(suite, doc.get("command", "unet-export"), "run", error=doc.get("error", "") or doc.get("verdict", ""))
    return suite


def _count(root: ET.Element, suites: list[ET.Element]) -> None:
    """tests/failures/errors/skipped on every suite and on the root, from the cases themselves."""
    totals = dict.fromkeys(("tests", "failures", "errors", "skipped"), 0)
    for suite in suites:
        cases = suite.findall("testcase")
        counts = {"tests": len(cases), "failures": sum(c.find("failure") is not None for c in cases),
                  "errors": sum(c.find("error") is not None for c in cases),
                  "skipped": sum(c.find("skipped") is not None for c in cases)}  # fmt: skip
        for key, value in counts.items():
            suite.set(key, str(value))
            totals[key] += value
    for key in ("tests", "failures", "errors"):  # the schema Jenkins reads has no "skipped" on <testsuites>
        root.set(key, str(totals[key]))


def _numbers(record: dict, keys) -> str:
    return "\n".join(f"{key} = {_text(record[key])}" for key in keys if record.get(key) is not None)


def _text(value) -> str:
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "x".join(map(str, value))
    return str(value)
