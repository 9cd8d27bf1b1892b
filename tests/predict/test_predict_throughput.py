"""predict's throughput mode (issue 29): the runner set up for a stream (Runner.for_throughput)
and every batch's calls fed through stream(), several in flight. It writes the masks the
one-batch-at-a-time mode writes, byte for byte and for the right images (two sizes, batches
finishing out of order), resumes, and says in the report what ran. No timing is asserted."""

import hashlib
import json
import re
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from unet_export.cli.main import app
from unet_export.data.dataset import Preprocess
from unet_export.flows.demo import DEMO_VAL, DEMO_WEIGHTS
from unet_export.models.sizes import SizeRule
from unet_export.predict.batch import PredictOptions, run_predict
from unet_export.predict.probe import ThroughputProbe
from unet_export.predict.stages import Loaded, infer_stream
from unet_export.runtimes import Runner

VAL_IMAGES = sorted((DEMO_VAL / "imgs").iterdir())


def sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def workdir(exports, tmp_path_factory):
    """The demo model's verified ONNX model and OpenVINO IR, exported at 128x128."""
    return exports.copy(tmp_path_factory.mktemp("thr") / "exports", DEMO_WEIGHTS, ("openvino",), 128, 128)


@pytest.fixture
def mixed(tmp_path):
    """Eight images in two sizes, interleaved: 128x128 and 160x144 (both inside the envelope)."""
    root = tmp_path / "in"
    root.mkdir()
    for i in range(8):
        size = (128, 128) if i % 2 else (144, 160)
        Image.open(VAL_IMAGES[i % len(VAL_IMAGES)]).convert("RGB").resize(size).save(root / f"im{i}.png")
    return root


def masks(report) -> dict[str, str]:
    return {o.job.rel: o.sha256 for o in report.written}


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_throughput_writes_the_masks_latency_writes(runtime, workdir, mixed, tmp_path):
    """Batches of 2 over images of two sizes: the same mask bytes for every image in both modes,
    and the report says which mode ran with which setting."""
    def run(mode: str):
        options = PredictOptions(batch_size=2, workers=2, mode=mode)
        return run_predict(workdir, [mixed], tmp_path / mode, options, device="cpu", runtime=runtime)

    latency, throughput = run("latency"), run("throughput")
    assert len(latency.written) == len(throughput.written) == 8 and not throughput.failed
    assert masks(throughput) == masks(latency)
    assert len(set(masks(latency).values())) > 2  # the images' masks differ: a swap would show
    for outcome in throughput.written:
        assert outcome.sha256 == sha(outcome.mask)
    assert (latency.to_dict()["mode"], latency.to_dict()["setting"]) == ("latency", "one batch at a time")
    data = throughput.to_dict()
    assert data["mode"] == "throughput" and data["setting"]
    if runtime == "openvino":
        assert data["setting"].startswith("THROUGHPUT hint, ")
    else:
        assert data["setting"] == throughput_setting_of_ort()


def throughput_setting_of_ort() -> str:
    """Four calls (eight images in batches of two): on more than one core too few to measure the
    settings (ThroughputProbe: 1 + 4 calls each), so the first setting ran them all and says so."""
    from unet_export.device import physical_cores

    cores = physical_cores()
    if cores == 1:
        return "1 run at a time, 1 intra-op thread(s)"
    return f"1 run at a time, {cores} intra-op thread(s) (not measured: 8 image(s), too few to compare settings)"


def test_the_cli_takes_mode_and_the_report_records_it(workdir, mixed, tmp_path):
    report = tmp_path / "r.json"
    result = CliRunner().invoke(app, ["predict", str(workdir), str(mixed), "--out", str(tmp_path / "o"), "--runtime",
                                      "openvino", "--mode", "latency", "--report", str(report)])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads(report.read_text())["mode"] == "latency" and "\nlatency mode: one batch at a time\n" in result.stdout
    streamed = CliRunner().invoke(app, ["predict", str(workdir), str(mixed), "--out", str(tmp_path / "t"), "--runtime",
                                        "openvino"])  # fmt: skip
    assert streamed.exit_code == 0 and "\nthroughput mode: THROUGHPUT hint, " in streamed.stdout, streamed.output
    # every mask already done: the runtime never ran, so no setting is claimed
    done = CliRunner().invoke(app, ["predict", str(workdir), str(mixed), "--out", str(tmp_path / "t"), "--runtime",
                                    "openvino", "--resume", "--report", str(report)])  # fmt: skip
    assert done.exit_code == 0 and " mode:" not in done.stdout, done.output
    assert (json.loads(report.read_text())["mode"], json.loads(report.read_text())["setting"]) == ("throughput", "")
    bad = CliRunner().invoke(app, ["predict", str(workdir), str(mixed), "--out", str(tmp_path / "x"), "--mode", "fast"])
    assert bad.exit_code == 2 and bad.stderr.strip() == "error: --mode 'fast': choose one of throughput, latency"
    assert not (tmp_path / "x").exists()


def test_resume_in_throughput_mode_writes_exactly_what_is_missing(workdir, mixed, tmp_path):
    out, options = tmp_path / "o", PredictOptions(batch_size=3, mode="throughput")
    first = run_predict(workdir, [mixed], out, options, device="cpu", runtime="onnxruntime")
    before = masks(first)
    for rel in ("im2", "im5"):
        (out / f"{rel}_mask.png").unlink()
    again = run_predict(workdir, [mixed], out, PredictOptions(batch_size=3, resume=True), device="cpu", runtime="onnxruntime")
    assert sorted(o.job.rel for o in again.written) == ["im2", "im5"] and len(again.skipped) == 6
    assert again.to_dict()["mode"] == "throughput"
    assert {p.name[: -len("_mask.png")]: sha(p) for p in out.glob("*_mask.png")} == before


class OutOfOrder(Runner):
    """Three calls in flight, the earlier ones finishing last; each output says which call it was."""

    name = "out-of-order"

    def __init__(self):
        super().__init__(torch.device("cpu"))
        self.streams, self.calls, self.lock = 3, 0, threading.Lock()

    def _activate_impl(self) -> None:
        pass

    def _deactivate_impl(self) -> None:
        pass

    def _infer_impl(self, x: torch.Tensor) -> torch.Tensor:
        with self.lock:
            self.calls += 1
            delay = 0.03 * (3 - self.calls % 3)
        time.sleep(delay)
        return x[:, :1] - 0.5  # the first channel's value: each image's own


def test_infer_stream_keeps_batch_order_and_sends_refused_batches_aside():
    """Outputs finishing out of order come back in order, every image with its own; a batch the
    model cannot take (a static size it does not fit) is refused without stopping the stream."""
    from unet_export.inference.predictor import Predictor

    runner = OutOfOrder()
    predictor = Predictor(runner, [0, 255], Preprocess(), SizeRule(), n_channels=3)

    def item(value: float, side: int) -> Loaded:
        return Loaded(value, np.full((3, side, side), value, np.float32), (side, side))

    batches = [[item(v, 16 + 16 * (i % 2)) for v in (i / 10, i / 10 + 0.05)] for i in range(1, 8)]
    predictor.fixed = (32, 32)
    batches.insert(3, [item(0.9, 48)])  # larger than the static 32x32: refused
    refused = []
    with runner:
        seen = [(batch, classes) for batch, classes in infer_stream(predictor, iter(batches), lambda b, e: refused.append((b, e)))]
    assert [b for b, _ in seen] == batches[:3] + batches[4:]
    for batch, classes in seen:
        for loaded, mask in zip(batch, classes):
            assert mask.shape == loaded.x.shape[1:] and (mask == int(loaded.job > 0.5)).all()
    assert [b for b, _ in refused] == [batches[3]] and "static at 32x32" in str(refused[0][1])


# --- ONNX Runtime's setting chosen by measuring the first calls (predict/probe.py) ----------------


def test_throughput_measures_both_ort_settings_and_writes_the_masks_latency_writes(workdir, tmp_path, monkeypatch):
    """Sixteen images in batches of one on (at least) two cores: the first ten calls measure both
    settings (1 + 4 each), the rest run the faster; the report names both, the masks are
    latency mode's byte for byte (outputs across the switches stay with their images)."""
    monkeypatch.setattr("unet_export.runtimes.onnx.runner.physical_cores", lambda: 2)
    root = tmp_path / "in"
    root.mkdir()
    for i in range(16):
        Image.open(VAL_IMAGES[i % len(VAL_IMAGES)]).convert("RGB").resize((128, 128)).save(root / f"im{i:02d}.png")

    def run(mode: str):
        options = PredictOptions(batch_size=1, workers=2, mode=mode)
        return run_predict(workdir, [root], tmp_path / mode, options, device="cpu", runtime="onnxruntime")

    latency, throughput = run("latency"), run("throughput")
    assert len(throughput.written) == 16 and masks(throughput) == masks(latency)
    assert len(set(masks(latency).values())) > 2
    one, many = "1 run at a time, 2 intra-op thread(s)", "2 concurrent runs of one session, 1 intra-op thread(s) each"
    setting = throughput.to_dict()["setting"]
    kept, other = (one, many) if setting.startswith(one) else (many, one)
    rate = r"[0-9]+\.[0-9] img/s"
    assert re.fullmatch(rf"{re.escape(kept)} \(measured on the first 10 images: {rate}, faster than {re.escape(other)}: {rate}\)",
                        setting), setting  # fmt: skip


class TwoSettings(Runner):
    """Two throughput settings (1 and 2 streams), each call costing its setting's seconds per image
    on a clock of the test's own (no real time is measured), a fresh session's first call a second
    more (the warm-up the probe leaves out); records the setting of every call and session built."""

    name = "two-settings"

    def __init__(self, cost: dict[int, float]):
        super().__init__(torch.device("cpu"))
        self.cost, self.clock, self.ran, self.built, self.lock = cost, 0.0, [], [], threading.Lock()
        self.fresh = False

    def throughput_choices(self) -> list[int | None]:
        return [1, 2]

    def for_throughput(self, streams: int | None = None) -> "TwoSettings":
        self.streams = streams or 2
        return super().for_throughput(streams)

    def throughput_setting(self) -> str:
        return f"{self.streams} stream(s)"

    def _activate_impl(self) -> None:
        self.built.append(self.streams)
        self.fresh = True

    def _infer_impl(self, x: torch.Tensor) -> torch.Tensor:
        with self.lock:
            self.clock += self.cost[self.streams] * x.shape[0] + (1.0 if self.fresh else 0.0)
            self.fresh = False
            self.ran.append(self.streams)
        return x * 2


@pytest.mark.parametrize("faster", [1, 2])
def test_the_probe_keeps_the_faster_setting_for_the_rest_of_the_stream(faster, monkeypatch):
    """Calls 1-5 run one stream (the first untimed), 6-10 two, the rest the faster of the two,
    whichever it is; every output comes back in order and the setting names both measurements."""
    import unet_export.predict.probe as probe_module

    other = 3 - faster
    runner = TwoSettings({faster: 0.01, other: 0.05})
    monkeypatch.setattr(probe_module, "perf_counter", lambda: runner.clock)
    probe = probe_module.ThroughputProbe(runner)
    calls = [torch.full((2, 1, 2, 2), float(i)) for i in range(16)]
    with runner:
        outs = [out for out, _ in probe.stream(iter(calls))]
    assert [float(out[0, 0, 0, 0]) for out in outs] == [2.0 * i for i in range(16)]
    assert runner.ran == [1] * 5 + [2] * 5 + [faster] * 6
    assert runner.built == [1, 2] + ([1] if faster == 1 else [])  # no session built to stay where it is
    assert probe.setting() == (f"{faster} stream(s) (measured on the first 20 images: 100.0 img/s, "
                               f"faster than {other} stream(s): 20.0 img/s)")  # fmt: skip


@pytest.mark.parametrize(
    ("n", "ran", "setting"),
    [
        (0, [], "1 stream(s) (not measured: 0 image(s), too few to compare settings)"),
        (3, [1] * 3, "1 stream(s) (not measured: 3 image(s), too few to compare settings)"),
        (5, [1] * 5, "1 stream(s) (not measured: 5 image(s), too few to compare settings)"),
        (7, [1] * 5 + [2] * 2, "1 stream(s), then 2 stream(s) (not measured: 7 image(s), too few to compare settings)"),
        (10, [1] * 5 + [2] * 5, "1 stream(s) (measured on the first 10 images: 100.0 img/s, faster than 2 stream(s): 20.0 img/s)"),
    ],
)
def test_a_stream_too_short_to_probe_says_so_and_builds_no_setting_it_does_not_run(n, ran, setting, monkeypatch):
    import unet_export.predict.probe as probe_module

    runner = TwoSettings({1: 0.01, 2: 0.05})
    monkeypatch.setattr(probe_module, "perf_counter", lambda: runner.clock)
    probe = probe_module.ThroughputProbe(runner)
    with runner:
        outs = list(probe.stream(torch.full((1, 1, 2, 2), float(i)) for i in range(n)))
    assert len(outs) == n and runner.ran == ran and probe.setting() == setting
    assert runner.built == (sorted(set(ran)) or [1])  # built for the first setting only when it runs nothing


def test_a_runtime_with_one_setting_streams_as_it_is():
    runner = OutOfOrder()
    probe = ThroughputProbe(runner)
    with runner:
        outs = [float(out[0, 0, 0, 0]) for out, _ in probe.stream(torch.full((1, 1, 2, 2), float(i)) for i in range(7))]
    assert outs == [i - 0.5 for i in range(7)] and probe.setting() == "3 streams, one batch each"
