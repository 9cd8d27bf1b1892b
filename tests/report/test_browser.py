"""Issue 30: the HTML report read back in a real headless browser (Debian's Chromium, driven by
Playwright; `make test` installs it with scripts/chromium.sh): the page renders, is not blank,
every picture decodes, and the verdict is what the command said.

With UNET_EXPORT_DOCS_REPORT=PATH (the demo's report), the same checks run on that page and its
screenshots are written to docs/images/: that is how the ones docs/reports.md shows were made.
"""

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from tests.conftest import REPO
from unet_export.cli.main import app
from unet_export.flows.demo import DEMO_VAL
from unet_export.workdir.manifest import load_manifest

CHROMIUM = Path("/usr/bin/chromium")
# As root in a sandboxed machine with no network: no sandbox, no GPU, nothing that phones home.
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]  # fmt: skip
DOCS_IMAGES = REPO / "docs" / "images"


@pytest.fixture(scope="module")
def browser():
    """Chromium, started by Playwright for this module and closed after it (by Playwright, which
    owns the process; every wait below is bounded)."""
    if not CHROMIUM.is_file():
        pytest.fail(f"{CHROMIUM} is missing: run `make browser` (scripts/chromium.sh) or `make test`, which installs it")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=str(CHROMIUM), args=FLAGS, timeout=60_000)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture(scope="module")
def report_page(int8_demo, tmp_path_factory):
    """`unet-export report` of the INT8 demo workdir (FP32 ONNX, INT8 IR, INT8 ONNX) on the demo's images."""
    root = tmp_path_factory.mktemp("browser")
    workdir = Path(shutil.copytree(int8_demo.workdir, root / "exports"))
    html = root / "report.html"
    result = CliRunner().invoke(app, ["report", "-w", str(workdir), "--data", str(DEMO_VAL), "-o", str(html)])
    assert result.exit_code == 0, result.output
    return html, workdir


def test_the_report_renders_with_every_picture_and_the_verdict(browser, report_page, tmp_path):
    html, workdir = report_page
    read_back(browser, html, len(load_manifest(workdir)["artifacts"]), tmp_path)


@pytest.mark.skipif(not os.environ.get("UNET_EXPORT_DOCS_REPORT"), reason="only when making the docs' screenshots")
def test_the_docs_screenshots_of_the_demo_report(browser, tmp_path):
    """UNET_EXPORT_DOCS_REPORT=report.html (what `unet-export report -w exports/demo --data
    unet_export/assets/demo_val -o report.html` wrote after `make demo`): the same checks on that
    page, and its screenshots written to docs/images/ for docs/reports.md."""
    html = Path(os.environ["UNET_EXPORT_DOCS_REPORT"]).resolve()
    artefacts = html.read_text().count('<section class="artefact"')
    shot, section = read_back(browser, html, artefacts, tmp_path)
    DOCS_IMAGES.mkdir(exist_ok=True)
    for png, name in ((shot, "report.png"), (section, "report-int8.png")):
        # 256 colours: a page of flat colours reads the same at a third of the bytes in the repository
        Image.open(png).convert("RGB").quantize(256).save(DOCS_IMAGES / name, optimize=True)


def read_back(browser, html: Path, artefacts: int, out: Path) -> tuple[Path, Path]:
    """Open ``html`` (a passing report of ``artefacts`` artefacts, one an INT8 IR) in Chromium and
    check what a person sees; the screenshots of its top and of the INT8 section."""
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    page.set_default_timeout(30_000)
    page.goto(html.as_uri(), wait_until="load")
    shot = out / "report.png"
    page.screenshot(path=str(shot))
    assert _not_blank(shot)
    images = page.evaluate("[...document.images].map(i => i.complete && i.naturalWidth > 0)")
    assert images == [True] * (3 * 5 * artefacts)  # 3 images x 5 pictures per artefact, every one decoded
    assert page.inner_text("#verdict").startswith("PASSED (exit code 0)")
    statuses = page.evaluate("[...document.querySelectorAll('section.artefact')].map(s => s.dataset.status)")
    assert statuses == ["verified"] * artefacts
    rechecks = page.evaluate("[...document.querySelectorAll('.recheck')].map(p => p.dataset.passed)")
    assert rechecks == ["true"] * artefacts
    assert "sha256" in page.inner_text("#header") and "milesial" in page.inner_text("#header")
    section = out / "int8.png"
    page.locator("section.artefact[id$='-int8-xml']").screenshot(path=str(section))
    assert _not_blank(section)
    page.close()
    return shot, section


def test_a_failed_verdict_reads_failed_in_the_browser(browser, exports, tmp_path):
    """A page whose artefact failed: the red verdict, the failed section, and the failure's line."""
    from tests.report.test_reports import damaged_workdir

    workdir, images = damaged_workdir(exports, tmp_path)
    html = tmp_path / "v.html"
    result = CliRunner().invoke(app, ["verify", "-w", str(workdir), "--device", "cpu", "--data", str(images),
                                      "--report", str(html)])  # fmt: skip
    assert result.exit_code == 1
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    page.set_default_timeout(30_000)
    page.goto(html.as_uri(), wait_until="load")
    assert page.inner_text("#verdict").startswith("FAILED (exit code 1)")
    assert page.evaluate("document.querySelector('section.artefact').dataset.status") == "failed"
    assert "would pass with --rtol" in page.inner_text("section.artefact")
    colour = page.evaluate("getComputedStyle(document.querySelector('#verdict')).backgroundColor")
    assert colour == "rgb(198, 40, 40)"  # the failing red, not the passing green
    page.close()


def _not_blank(png: Path) -> bool:
    """A screenshot that shows something: many colours, and far from one flat colour."""
    pixels = np.asarray(Image.open(png).convert("RGB"))
    colours = len(np.unique(pixels.reshape(-1, 3), axis=0))
    return pixels.std() > 20 and colours > 50
