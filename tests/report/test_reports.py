"""Issue 30: `--report PATH.html`, `--junit PATH.xml` and the job summary on every command that
judges something, and `unet-export report -w DIR`. The HTML in a real browser: tests/report/test_browser.py."""

import json
import re
import shutil
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
from lxml import etree
from typer.testing import CliRunner

from tests.conftest import REPO
from unet_export.cli.bench import app as bench_app
from unet_export.cli.main import app
from unet_export.errors import UserError
from unet_export.fileio import sha256_file
from unet_export.flows.demo import DEMO_VAL
from unet_export.workdir.manifest import load_manifest

runner = CliRunner()
SCHEMA = etree.XMLSchema(etree.parse(str(REPO / "tests" / "data" / "junit.xsd")))
QUICK_BENCH = {"UNET_BENCH_WARMUP": "1", "UNET_BENCH_ITERS": "2"}


def read_junit(path: Path) -> etree._ElementTree:
    """The JUnit file, valid against the schema CI systems read (tests/data/junit.xsd)."""
    tree = etree.parse(str(path))
    assert SCHEMA.validate(tree), SCHEMA.error_log
    root = tree.getroot()
    suites = root.findall("testsuite")
    for key in ("tests", "failures", "errors"):  # the totals are the suites' sums, the suites' their cases'
        assert int(root.get(key)) == sum(int(s.get(key)) for s in suites)
    for suite in suites:
        cases = suite.findall("testcase")
        assert int(suite.get("tests")) == len(cases)
        assert int(suite.get("failures")) == sum(c.find("failure") is not None for c in cases)
        assert int(suite.get("skipped")) == sum(c.find("skipped") is not None for c in cases)
    return tree


class Page(HTMLParser):
    """What a page holds: its images and inline SVGs, every address it names, whether it has a script."""

    def __init__(self, text: str):
        super().__init__()
        self.images, self.svgs, self.addresses, self.scripts, self.sections = [], 0, [], 0, {}
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs["src"])
        self.svgs += tag == "svg"
        self.scripts += tag == "script"
        self.addresses += [v for k, v in attrs.items() if k in ("src", "href") and v and not v.startswith(("data:", "#"))]
        if tag == "section" and "data-status" in attrs:
            self.sections[attrs["id"]] = attrs["data-status"]


@pytest.fixture(scope="module")
def int8_workdir(int8_demo, tmp_path_factory):
    """A copy of the session's INT8 demo workdir (FP32 ONNX, INT8 IR, INT8 ONNX)."""
    return Path(shutil.copytree(int8_demo.workdir, tmp_path_factory.mktemp("reports") / "exports"))


@pytest.fixture(scope="module")
def verified(int8_workdir, tmp_path_factory):
    """`verify --junit --report --json` on the INT8 demo workdir, once."""
    out = tmp_path_factory.mktemp("verified")
    args = ["verify", "-w", str(int8_workdir), "--data", str(DEMO_VAL), "--device", "cpu", "--json", str(out / "v.json"),
            "--junit", str(out / "v.xml"), "--report", str(out / "v.html")]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return out


def test_verify_junit_has_a_case_per_artefact_check_and_input_as_the_manifest_records(verified, int8_workdir):
    tree = read_junit(verified / "v.xml")
    manifest = load_manifest(int8_workdir)
    suites = {s.find("properties/property[@name='path']").get("value"): s for s in tree.getroot().findall("testsuite")}
    assert set(suites) == {e["path"] for e in manifest["artifacts"]}
    for entry in manifest["artifacts"]:
        cases = entry["verified_on"]["parity"]["cases"]
        suite = suites[entry["path"]]
        # one test case per gate check the manifest says each input was put to
        assert int(suite.get("tests")) == sum(len(c["checks"]) for c in cases) > len(cases)
        assert int(suite.get("failures")) == 0 and int(suite.get("errors")) == 0
        names = [c.get("name") for c in suite.findall("testcase")]
        dice = sum(n.endswith(": Dice") for n in names)  # reduced precision: on its gate's whole images
        assert dice == sum("Dice" in c["checks"] for c in cases) and (dice > 0) == (entry["precision"] == "int8")
        props = {p.get("name"): p.get("value") for p in suite.iter("property")}
        assert props["sha256"] == entry["sha256"] and props["status"] == "verified"
        assert float(props["input 1 max_err_fp64"]) == cases[0]["max_err_fp64"]


def test_verify_html_is_one_self_contained_page_with_pictures_of_every_artefact(verified, int8_workdir):
    text = (verified / "v.html").read_text()
    page = Page(text)
    assert page.scripts == 0 and page.addresses == []  # nothing fetched, nothing run: it reads offline, anywhere
    # 3 real images x 5 pictures (input, eager, artefact, class changes, error) per artefact
    assert len(page.images) == 3 * 5 * len(load_manifest(int8_workdir)["artifacts"])
    assert all(src.startswith("data:image/png;base64,") for src in page.images)
    assert set(page.sections.values()) == {"verified"}
    assert "PASSED (exit code 0)" in text and sha256_file(int8_workdir / "demo_unet.int8.xml") in text
    assert "the 3 of 8 real images with the most pixels changing class" in text
    assert "calibration images: 12 images" in text and "held-out images the gate judged it on" in text
    assert "full bias correction" in text  # the INT8 fallback's steps
    assert "Envelope: batch 1-8" in text


@pytest.fixture
def damaged(exports, tmp_path):
    return damaged_workdir(exports, tmp_path)


def damaged_workdir(exports, tmp_path: Path) -> tuple[Path, Path]:
    """A workdir whose ONNX model is another model's, its hash recorded (only the gate can catch
    it), and a folder of four real images."""
    weights = exports.checkpoint("unet_v3.pth")
    workdir = exports.copy(tmp_path / "exports", weights, ("onnx",), 64, 64)
    other = exports.run(exports.checkpoint("other.pth", seed=1), ("onnx",), 64, 64).workdir
    onnx_file = workdir / "unet_v3.onnx"
    onnx_file.write_bytes((other / "other.onnx").read_bytes())
    manifest = json.loads((workdir / "manifest.json").read_text())
    manifest["artifacts"][0] |= {"sha256": sha256_file(onnx_file), "bytes": onnx_file.stat().st_size}
    (workdir / "manifest.json").write_text(json.dumps(manifest))
    images = tmp_path / "imgs"
    images.mkdir()
    for path in sorted((DEMO_VAL / "imgs").iterdir())[:4]:  # real images for the pictures
        shutil.copy(path, images / path.name)
    return workdir, images


def test_a_failing_artefact_is_a_failing_test_case_with_the_loosest_passing_tolerance(damaged, tmp_path):
    workdir, images = damaged
    xml, html = tmp_path / "v.xml", tmp_path / "v.html"
    result = runner.invoke(app, ["verify", "-w", str(workdir), "--device", "cpu", "--junit", str(xml),
                                 "--report", str(html), "--data", str(images)])  # fmt: skip
    assert result.exit_code == 1, result.output
    tree = read_junit(xml)
    failures = tree.getroot().findall(".//testcase/failure")
    assert int(tree.getroot().get("failures")) == len(failures) > 0
    errors = [f for f in failures if f.getparent().get("name").endswith(": error vs float64")]
    assert errors and all("would pass with --rtol" in f.get("message") for f in errors)
    assert all("\n" not in f.get("message") for f in failures)  # one line each
    statuses = {s.find("properties/property[@name='path']").get("value"): s.find("properties/property[@name='status']").get("value")
                for s in tree.getroot().findall("testsuite")}  # fmt: skip
    assert statuses == {"unet_v3.onnx": "failed"}
    text = html.read_text()
    page = Page(text)
    assert "FAILED (exit code 1)" in text and page.sections == {"artefact-unet-v3-onnx": "failed"}
    assert "would pass with --rtol" in text and len(page.images) == 3 * 5
    assert re.search(r"class change \d+\.\d+% \((\d+) px", text) and "FAIL" in text


def test_report_command_holds_the_recorded_verdict_against_a_re_run(damaged, tmp_path):
    workdir, images = damaged
    html, xml = tmp_path / "r.html", tmp_path / "r.xml"
    # The manifest says verified (its hash was rewritten for the swapped file): the re-run on the
    # images fails the gate, so the page and the exit code say failed, as verify would.
    result = runner.invoke(app, ["report", "-w", str(workdir), "--data", str(images), "-o", str(html), "--junit", str(xml),
                                 "--images", "2"])  # fmt: skip
    assert result.exit_code == 1, result.output
    assert "unet_v3.onnx: failed (onnx fp32, judged at export)" in result.output
    assert "recorded as verified at export, but re-run here on 2 real images it fails its gate" in result.output
    text = html.read_text()
    assert "FAILED (exit code 1)" in text and "the 2 of 2 real images" in text and 'data-passed="false"' in text
    assert read_junit(xml).getroot().get("failures") != "0"
    verify = runner.invoke(app, ["verify", "-w", str(workdir), "--device", "cpu", "--data", str(images)])
    assert verify.exit_code == 1
    again = runner.invoke(app, ["report", "-w", str(workdir), "--data", str(images), "-o", str(html)])
    assert again.exit_code == 1 and "unet_v3.onnx: failed (onnx fp32, judged by verify on" in again.output
    (workdir / "unet_v3.onnx").write_bytes(b"not the file")
    gone = runner.invoke(app, ["report", "-w", str(workdir), "-o", str(html), "--junit", str(xml)])
    assert gone.exit_code == 2 and "changed since it was verified" in gone.stderr
    assert "ERROR (exit code 2)" in html.read_text()
    assert read_junit(xml).getroot().find(".//testcase/error") is not None


def test_report_command_passes_a_verified_workdir_and_agrees_with_verify(verified, int8_workdir, tmp_path):
    html = tmp_path / "r.html"
    result = runner.invoke(app, ["report", "-w", str(int8_workdir), "--data", str(DEMO_VAL), "-o", str(html)])
    assert result.exit_code == 0, result.output
    n = len(load_manifest(int8_workdir)["artifacts"])
    assert result.output.count(": verified (") == n and result.output.count("judged by verify on") == n
    assert html.read_text().count('data-passed="true"') == n


def test_reports_are_the_same_for_the_same_inputs_apart_from_dates_and_timings(int8_workdir, tmp_path):
    pages = []
    for i in range(2):
        html, xml = tmp_path / f"{i}.html", tmp_path / f"{i}.xml"
        result = runner.invoke(app, ["report", "-w", str(int8_workdir), "--data", str(DEMO_VAL), "-o", str(html),
                                     "--junit", str(xml), "--images", "3"])  # fmt: skip
        assert result.exit_code == 0, result.output
        dated = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00|time=\"[0-9.]+\"")
        pages.append((dated.sub("", html.read_text()), dated.sub("", xml.read_text())))
    assert pages[0] == pages[1]


def test_bench_report_draws_images_per_second_with_each_verdict_and_the_latency(exports, tmp_path):
    workdir = exports.copy(tmp_path / "exports", exports.checkpoint("unet_v3.pth"), ("onnx",), 64, 64)
    html, xml = tmp_path / "b.html", tmp_path / "b.xml"
    result = runner.invoke(bench_app, ["-w", str(workdir), "--backends", "eager,onnxruntime", "--batch", "2",
                                       "--device", "cpu", "--report", str(html), "--junit", str(xml)], env=QUICK_BENCH)  # fmt: skip
    assert result.exit_code == 0, result.output
    text = html.read_text()
    page = Page(text)
    assert page.svgs == 2 and page.scripts == 0  # the images/s chart and the latency chart, inline
    charts = text[text.index("<svg"):text.rindex("</svg>")]
    assert charts.count("img/s  passed") == 2 and "p50" in charts and "p99" in charts
    suite = read_junit(xml).getroot().find("testsuite[@name='unet-bench']")
    assert [c.get("name") for c in suite.findall("testcase")] == ["eager fp32", "onnxruntime fp32"]
    assert suite.find("properties/property[@name='onnxruntime fp32 img_per_s']") is not None


def test_the_job_summary_is_appended_where_github_names_one(exports, tmp_path, monkeypatch):
    workdir = exports.copy(tmp_path / "exports", exports.checkpoint("unet_v3.pth"), ("onnx",), 64, 64)
    summary = tmp_path / "summary.md"
    summary.write_text("earlier step\n")
    env = {"GITHUB_STEP_SUMMARY": str(summary)}
    for _ in range(2):
        result = runner.invoke(app, ["verify", "-w", str(workdir), "--device", "cpu", "--junit", str(tmp_path / "v.xml")],
                               env=env)  # fmt: skip
        assert result.exit_code == 0, result.output
    text = summary.read_text()
    assert text.startswith("earlier step\n") and text.count("`unet-export verify` passed (exit code 0)") == 2
    assert f"| `{workdir / 'unet_v3.onnx'}` | onnx | fp32 | ✅ verified |" in text
    assert f"`{tmp_path / 'v.xml'}`" in text


def test_report_paths_are_refused_before_any_work(make_checkpoint, tmp_path):
    (tmp_path / "file").write_text("")
    for option in ("--report", "--junit"):
        for bad in (tmp_path / "file" / "r.out", tmp_path):  # under a file; a folder
            refused = runner.invoke(app, ["torchscript", str(make_checkpoint("v3")), "-w", str(tmp_path / "w"),
                                          option, str(bad)])  # fmt: skip
            assert refused.exit_code == 2 and refused.stderr.count("\n") == 1 and option in refused.stderr
            assert not (tmp_path / "w").exists()


def test_an_empty_workdir_is_one_line_exit_2(tmp_path):
    result = runner.invoke(app, ["report", "-w", str(tmp_path / "none"), "-o", str(tmp_path / "r.html")])
    assert result.exit_code == 2 and "no artefacts" in result.stderr and result.stderr.count("\n") == 1


def test_without_the_report_extra_the_html_names_its_install_line(monkeypatch):
    from unet_export.report import charts

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(UserError, match=r'pip install "unet-export\[report\]"'):
        charts.throughput_chart([], "t")


def test_an_export_writes_its_report_with_pictures_on_the_data_it_was_given(exports, tmp_path):
    images = tmp_path / "imgs"
    images.mkdir()
    for path in sorted((DEMO_VAL / "imgs").iterdir())[:3]:
        shutil.copy(path, images / path.name)
    html, xml = tmp_path / "e.html", tmp_path / "e.xml"
    result = runner.invoke(app, ["onnx", str(exports.checkpoint("unet_v3.pth")), "-w", str(tmp_path / "w"), "--height", "64",
                                 "--width", "64", "--device", "cpu", "--data", str(images), "--report", str(html),
                                 "--junit", str(xml)])  # fmt: skip
    assert result.exit_code == 0, result.output
    page = Page(html.read_text())
    assert page.sections == {"artefact-unet-v3-onnx": "verified"} and len(page.images) == 3 * 5
    assert "the 3 of 3 real images" in html.read_text()
    [suite] = read_junit(xml).getroot().findall("testsuite")
    [entry] = load_manifest(tmp_path / "w")["artifacts"]
    assert int(suite.get("tests")) == sum(len(c["checks"]) for c in entry["parity"]["cases"])


def test_evaluate_junit_fails_each_row_below_the_dice_gate(int8_workdir, tmp_path):
    from unet_export.flows.demo import DEMO_WEIGHTS

    html, xml = tmp_path / "d.html", tmp_path / "d.xml"
    result = runner.invoke(app, ["evaluate", str(DEMO_WEIGHTS), str(DEMO_VAL), "-w", str(int8_workdir), "--device", "cpu",
                                 "--min-dice", "0.9999", "--junit", str(xml), "--report", str(html)])  # fmt: skip
    assert result.exit_code == 1, result.output
    [suite] = read_junit(xml).getroot().findall("testsuite")
    rows = 1 + len(load_manifest(int8_workdir)["artifacts"])  # eager and every artefact
    assert int(suite.get("tests")) == int(suite.get("failures")) == rows
    assert all("--min-dice 0.9999" in f.get("message") for f in suite.iter("failure"))
    text = html.read_text()
    assert "FAILED (exit code 1)" in text and "Accuracy against ground truth" in text and "Mean Dice on 24" in text
