"""The HTML, JUnit and summary writers on documents made by hand: what a workdir says is text on the
page, never markup; partial and odd documents (an export refused before anything ran, a record
with keys missing) still give a page; the fallback search and the bench's rows are drawn."""

import xml.etree.ElementTree as ET

from tests.report.test_reports import SCHEMA, Page
from lxml import etree

from unet_export.report.html import render_html
from unet_export.report.junit import junit_xml
from unet_export.report.pictures import Pictures
from unet_export.report.summary import summary_markdown

ENVELOPE = {"schema": "unet-export.verify/1", "command": "unet-export verify", "time": "2026-12-07T00:00:00+00:00",
            "seconds": 1.5, "host": {"hostname": "h", "cpu": "c", "os": "o"}, "versions": {"unet-export": "0.1.0"}}  # fmt: skip
HOSTILE = '"><img src=x onerror=alert(1)><script>alert(2)</script>'


def test_names_from_a_workdir_are_text_on_the_page_never_markup():
    artifact = {"path": HOSTILE, "format": "onnx", "precision": "fp32", "status": "failed", "reason": HOSTILE,
                "parity": {"runner": HOSTILE, "limits": {"rtol": 5, "atol": 1e-7}, "tolerance": "fp32",
                           "cases": [{"shape": [1, 3, 8, 8], "label": HOSTILE, "failures": [HOSTILE], "passed": False}]}}  # fmt: skip
    doc = ENVELOPE | {"workdir": HOSTILE, "artifacts": [artifact], "exit_code": 1, "verdict": "failed", "error": HOSTILE}
    text = render_html(doc, pictures={HOSTILE: Pictures(note=HOSTILE)})
    page = Page(text)
    assert page.images == [] and page.scripts == 0 and page.addresses == []
    assert "&lt;script&gt;alert(2)&lt;/script&gt;" in text
    xml = junit_xml(doc)
    assert SCHEMA.validate(etree.fromstring(xml)) and HOSTILE in ET.fromstring(xml).find(".//failure").get("message")


def test_a_run_that_ended_before_judging_anything_is_one_error_everywhere():
    doc = ENVELOPE | {"command": "unet-export trt", "workdir": "exports", "artifacts": [], "exit_code": 2,
                      "verdict": "error", "error": "TensorRT is not installed"}  # fmt: skip
    text = render_html(doc)
    assert "ERROR (exit code 2)" in text and "TensorRT is not installed" in text
    root = etree.fromstring(junit_xml(doc))
    assert SCHEMA.validate(root) and root.get("errors") == "1" and root.get("tests") == "1"
    assert "`unet-export trt` error (exit code 2)" in summary_markdown(doc)


def test_a_record_with_keys_missing_still_renders():
    doc = ENVELOPE | {"workdir": "w", "artifacts": [{"path": "m.onnx", "format": "onnx", "precision": "int8",
                                                     "status": "not_judged"}], "exit_code": 0, "verdict": "passed"}  # fmt: skip
    text = render_html(doc)
    assert 'data-status="not_judged"' in text and "PASSED (exit code 0)" in text
    root = etree.fromstring(junit_xml(doc))
    assert SCHEMA.validate(root) and root.find(".//skipped") is not None


def test_the_fp16_fallback_search_is_drawn_step_by_step():
    search = {"budget_s": 600, "seconds": 12.5, "found": ["up4.conv"], "flag": "--fp32-layers up4.conv",
              "base": {"passed": False, "class_change": 0.004, "dice_vs_eager": 0.998, "layers": [], "failures": ["x"]},
              "steps": [{"passed": True, "class_change": 0.0001, "dice_vs_eager": 0.9999, "latency_ms": 3.5,
                         "layers": ["up4.conv"], "failures": []}]}  # fmt: skip
    doc = ENVELOPE | {"workdir": "w", "artifacts": [{"path": "m.fp16.onnx", "format": "onnx", "precision": "fp16",
                                                     "status": "verified", "fallback": search}],
                      "exit_code": 0, "verdict": "passed"}  # fmt: skip
    text = render_html(doc)
    assert "FP32 fallback search" in text and "12.5 s of a 600 s budget" in text and "--fp32-layers up4.conv" in text
    assert "FP16 alone" in text and "0.4000%" in text and "3.50" in text


def test_bench_rows_that_did_not_run_have_no_bar_but_say_so():
    rows = [{"backend": "eager", "precision": "fp32", "status": "ok", "img_per_s": 10.0,
             "latency_ms": {"min": 90, "p50": 100, "p99": 120, "max": 130}},
            {"backend": "tensorrt-fp16", "precision": "-", "status": "unavailable", "img_per_s": None, "latency_ms": None,
             "reason": "needs a CUDA GPU"},
            {"backend": "openvino-bf16", "precision": "bf16", "status": "parity_failed", "img_per_s": 20.0,
             "reason": "Dice vs eager 0.99 < 0.999", "latency_ms": {"min": 40, "p50": 50, "p99": 60, "max": 61}}]  # fmt: skip
    doc = ENVELOPE | {"schema": "unet-export.bench/1", "command": "unet-bench", "workdir": "w", "results": rows,
                      "config": {"batch": 8, "height": 64, "width": 64}, "exit_code": 1, "verdict": "failed"}  # fmt: skip
    text = render_html(doc)
    svg = text[text.index("<svg"):text.rindex("</svg>")]
    assert "10.0 img/s  passed" in svg and "20.0 img/s  FAILED" in svg and "not run" in svg
    root = etree.fromstring(junit_xml(doc))
    assert SCHEMA.validate(root)
    suite = root.find("testsuite")
    assert (suite.get("tests"), suite.get("failures"), suite.get("skipped")) == ("3", "1", "1")
    assert suite.find("testcase[@name='openvino-bf16 bf16']/failure").get("message") == "Dice vs eager 0.99 < 0.999"
