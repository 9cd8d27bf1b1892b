"""Streaming predict (issue 18): inputs and output paths, batching, the stages' results against
the one-image-at-a-time path, failures that skip one image, --resume, interruption, reports and
the runtime choice."""

import hashlib
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from tests.conftest import ignoring_sigint
from unet_export.cli.main import app
from unet_export.flows.demo import DEMO_VAL, DEMO_WEIGHTS
from unet_export.predict import choose
from unet_export.predict.batch import PredictOptions, run_predict
from unet_export.predict.remember import CACHE
from unet_export.predict.inputs import collect_jobs
from unet_export.predict.local import Batcher, prefetch
from unet_export.predict.stages import Loaded
from unet_export.predict import load_predictor, mask_to_image_array, predict_classes

runner = CliRunner()
VAL_IMAGES = sorted((DEMO_VAL / "imgs").iterdir())


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def workdir(exports, tmp_path_factory):
    """The demo model's verified ONNX model and OpenVINO IR (this module's copy of the session's export)."""
    return exports.copy(tmp_path_factory.mktemp("pipe") / "exports", DEMO_WEIGHTS, ("openvino",), 128, 128)


@pytest.fixture
def tree(tmp_path):
    """Images in nested folders, two of them named alike, and one of another size."""
    root = tmp_path / "in"
    for i, rel in enumerate(["a/x.png", "b/x.png", "b/deep/y.png", "z.png"]):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(VAL_IMAGES[i], root / rel)
    Image.open(VAL_IMAGES[4]).resize((96, 80)).save(root / "b" / "small.png")
    return root


# --- inputs -----------------------------------------------------------------------------------------


def test_folders_are_searched_recursively_and_mirrored_under_out(tree, tmp_path):
    jobs = collect_jobs([tree])
    assert [j.rel for j in jobs] == ["a/x", "b/deep/y", "b/small", "b/x", "z"]
    assert jobs[0].mask(tmp_path / "o") == tmp_path / "o" / "a" / "x_mask.png"


def test_two_images_of_one_name_in_two_folders_write_two_masks(tree, tmp_path):
    """The issue's defect: a/x.png and b/x.png overwrote each other's mask ('wrote 2 masks', one file)."""
    out = tmp_path / "o"
    result = cli("predict", DEMO_WEIGHTS, tree / "a" / "x.png", tree / "b" / "x.png", "--out", out, "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "wrote 2 masks" in result.stdout
    masks = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    assert masks == ["a/x_mask.png", "b/x_mask.png"]


def test_a_list_file_names_the_inputs(tree, tmp_path, monkeypatch):
    listing = tmp_path / "list.txt"
    listing.write_text(f"# two images\n{tree / 'z.png'}\n\nin/a/x.png\n")
    monkeypatch.chdir(tmp_path)  # relative paths in a list are from the current folder
    jobs = collect_jobs([listing])
    assert [j.src for j in jobs] == [tree / "z.png", Path("in/a/x.png")] and [j.rel for j in jobs] == ["z", "a/x"]


@pytest.mark.parametrize("case, message", [
    ("missing", "input not found"), ("empty", "no images in"), ("clash", "would both write x_mask.png"),
])  # fmt: skip
def test_bad_inputs_are_refused_before_anything_is_written(tmp_path, case, message):
    folder = tmp_path / "in"
    folder.mkdir()
    if case == "clash":
        shutil.copy(VAL_IMAGES[0], folder / "x.png")
        Image.open(VAL_IMAGES[1]).save(folder / "x.jpg")
    inputs = [tmp_path / "nope.png"] if case == "missing" else [folder]
    result = cli("predict", DEMO_WEIGHTS, *inputs, "--out", tmp_path / "o", "--device", "cpu")
    assert result.exit_code == 2 and message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


# --- results ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["checkpoint", "onnx"])
def test_batched_streaming_masks_equal_one_image_at_a_time(model, workdir, tree, tmp_path):
    """Batches of 3 with 2 threads per stage, images of two sizes: each mask is the one the
    single-image path gives. The single-image path opens the model as predict does: an artefact
    of a manifest carries the envelope it was proven on (128-192 for the ONNX model exported at
    128x128), so the 96x80 image is mirror-padded up to 128 in both paths, not run at 80x96."""
    path = DEMO_WEIGHTS if model == "checkpoint" else workdir / "demo_unet.onnx"
    report = run_predict(path, [tree], tmp_path / "o", PredictOptions(batch_size=3, workers=2, overlay=True), device="cpu")
    assert len(report.written) == 5 and not report.failed
    single, _ = choose.open_model(path, torch.device("cpu"))
    if model == "onnx":
        assert single.envelope is not None and single.envelope.accepts(1, 128, 128)
        assert not single.envelope.accepts(1, 80, 96)  # smaller than proven: padded up, never run as it is
    with single.runner:
        for outcome in report.written:
            classes, _ = predict_classes(single, outcome.job.src)
            assert np.array_equal(np.asarray(Image.open(outcome.mask)), mask_to_image_array(classes, single.mask_values))
            assert outcome.sha256 == sha(outcome.mask)
            assert outcome.job.overlay(tmp_path / "o").is_file()
    assert not [p for p in (tmp_path / "o").rglob(".*")]  # no temp file left


def test_an_unreadable_image_is_reported_and_skipped(tree, tmp_path):
    (tree / "b" / "broken.png").write_bytes(VAL_IMAGES[0].read_bytes()[:300])  # a header, no pixels
    (tree / "text.png").write_text("not an image")
    report_path = tmp_path / "r" / "report.json"
    result = cli("predict", DEMO_WEIGHTS, tree, "--out", tmp_path / "o", "--report", report_path, "--device", "cpu")
    assert result.exit_code == 1, result.output
    assert "wrote 5 masks" in result.stdout and "2 failed:" in result.stderr
    assert "broken.png: cannot read image" in result.stderr and "text.png: cannot read image" in result.stderr
    report = json.loads(report_path.read_text())
    assert (report["inputs"], report["written"], report["failed"], report["skipped"]) == (7, 5, 2, 0)
    assert sorted(Path(f["input"]).name for f in report["failures"]) == ["broken.png", "text.png"]
    for entry in report["masks"]:
        assert sha(tmp_path / "o" / entry["mask"]) == entry["sha256"]


def test_resume_skips_complete_masks_and_redoes_damaged_ones(tree, tmp_path):
    out = tmp_path / "o"
    first = run_predict(DEMO_WEIGHTS, [tree], out, PredictOptions(batch_size=2), device="cpu")
    before = {o.mask: sha(o.mask) for o in first.written}
    (out / "z_mask.png").unlink()
    damaged = out / "b" / "x_mask.png"
    damaged.write_bytes(damaged.read_bytes()[:-20])  # cut short by something other than us
    again = run_predict(DEMO_WEIGHTS, [tree], out, PredictOptions(batch_size=2, resume=True), device="cpu")
    assert sorted(o.job.rel for o in again.written) == ["b/x", "z"]
    assert len(again.skipped) == 3
    assert {o.mask: sha(o.mask) for o in first.written} == before


def test_a_full_disk_ends_the_run_with_one_line_and_whole_files(tree, tmp_path, monkeypatch):
    import unet_export.predict.stages as stages

    real, calls = stages.save_atomic, []

    def fill_up(dest, data):
        calls.append(dest)
        if len(calls) > 2:
            raise OSError(28, "No space left on device", str(dest))
        real(dest, data)

    monkeypatch.setattr(stages, "save_atomic", fill_up)
    result = cli("predict", DEMO_WEIGHTS, tree, "--out", tmp_path / "o", "--batch-size", 1, "--workers", 1, "--device", "cpu")
    assert result.exit_code == 2 and "No space left on device" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    written = sorted((tmp_path / "o").rglob("*.png"))
    assert len(written) == 2 and all(Image.open(p).verify() is None for p in written)


# --- stages -------------------------------------------------------------------------------------------


def test_the_batcher_groups_by_size_and_bounds_what_waits():
    def item(h, w):
        return Loaded(None, np.zeros((3, h, w), np.float32), (w, h))

    batcher = Batcher(size=2, limit=3, alone=200)
    assert batcher.add(item(64, 64)) == [] and batcher.add(item(32, 32)) == []
    (full,) = batcher.add(item(64, 64))
    assert [i.x.shape for i in full] == [(3, 64, 64)] * 2
    assert batcher.add(item(16, 16)) == [] and batcher.add(item(48, 48)) == []
    (forced,) = batcher.add(item(80, 80))  # four waiting in part-filled groups, over the limit of 3
    assert len(forced) == 1
    assert [len(b) for b in batcher.add(item(300, 64))] == [1]  # tiled: alone
    assert sum(len(b) for b in batcher.flush()) == 3 and batcher.flush() == []


def test_prefetch_keeps_order_and_at_most_depth_in_flight():
    from concurrent.futures import ThreadPoolExecutor

    started, done = [], []

    def work(i):
        started.append(i)
        time.sleep(0.001 * (i % 3))
        return i

    with ThreadPoolExecutor(4) as pool:
        for i in prefetch(pool, work, range(50), depth=5):
            done.append(i)
            assert len(started) <= len(done) + 5
    assert done == list(range(50))


def test_the_reported_peak_rss_is_the_run_s_own_not_its_parent_s():
    """benchmarks/predict.py, holding 7 GB after its unet-bench row, started predict, whose report
    said 7.0 GB peak over 1,000 images (4.7 GB when started from a shell): ru_maxrss carries the
    parent's RSS across fork and exec on Linux."""
    if not Path("/proc/self/status").is_file():
        pytest.skip("VmHWM is Linux's")
    ballast = np.ones(1536 * 2**20, dtype=np.uint8)  # 1.5 GB, every page touched
    code = "from unet_export.predict.report import peak_rss_mb; print(peak_rss_mb())"
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert ballast.sum() == ballast.size
    assert float(child.stdout) < 1024, child.stdout


def test_pixel_memory_does_not_grow_with_the_number_of_images(tmp_path):
    """The queues bound what a run holds: four times the images, the same peak of Python-side
    memory (numpy arrays are traced by tracemalloc). Holding every decoded image would add about
    150 x 200 KB here; what does grow per image (its path and checksum for the report) is ~1 KB."""
    import tracemalloc

    image = Image.open(VAL_IMAGES[0]).convert("RGB").resize((128, 128))

    def peak(n: int) -> float:
        folder = tmp_path / f"in{n}"
        folder.mkdir()
        for i in range(n):
            image.save(folder / f"{i:04d}.png")
        tracemalloc.start()
        try:
            report = run_predict(DEMO_WEIGHTS, [folder], tmp_path / f"o{n}", PredictOptions(batch_size=4), device="cpu")
            assert len(report.written) == n
            return tracemalloc.get_traced_memory()[1] / 1e6
        finally:
            tracemalloc.stop()

    few, many = peak(48), peak(192)  # 48: past the point where every queue is full (depth 10)
    assert many < few + 8, (few, many)


# --- the runtime ----------------------------------------------------------------------------------


def test_runtime_auto_times_the_verified_artefacts_and_says_which(workdir, tree, tmp_path):
    copy = tmp_path / "exports"
    shutil.copytree(workdir, copy, ignore=shutil.ignore_patterns(CACHE))  # nothing remembered yet
    result = cli("predict", copy, tree, "--out", tmp_path / "o", "--device", "cpu")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == "predict: timing onnxruntime, openvino to choose the fastest ...", result.stdout
    first = next(line for line in lines if line.startswith("runtime auto: "))
    assert "ms/image at batch 1" in first
    assert "onnxruntime" in first and "openvino" in first
    chosen = first.split()[2]
    assert f", {chosen}, batch 8, local)" in result.stdout


def test_a_named_runtime_runs_that_artefact(workdir, tree, tmp_path):
    ov = cli("predict", workdir, tree, "--out", tmp_path / "ov", "--runtime", "openvino", "--report", tmp_path / "r.json")
    assert ov.exit_code == 0, ov.output
    assert json.loads((tmp_path / "r.json").read_text())["runtime"] == "openvino"
    missing = cli("predict", workdir, tree, "--out", tmp_path / "x", "--runtime", "tensorrt-fp16")
    assert missing.exit_code == 2 and "--runtime tensorrt-fp16: no verified artefact" in missing.stderr
    assert "onnxruntime, openvino" in missing.stderr
    one_file = cli("predict", workdir / "demo_unet.onnx", tree, "--out", tmp_path / "y", "--runtime", "openvino")
    assert one_file.exit_code == 2 and "demo_unet.onnx runs with onnxruntime" in one_file.stderr


def test_a_failed_artefact_is_never_chosen(workdir, tree, tmp_path):
    from unet_export.workdir.manifest import transaction

    copy = tmp_path / "exports"
    shutil.copytree(workdir, copy)
    with transaction(copy) as manifest:
        for entry in manifest["artifacts"]:
            if entry["format"] == "onnx":
                entry["status"] = "failed"
    result = cli("predict", copy, tree, "--out", tmp_path / "o", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "runtime auto: openvino, the only verified artefact for cpu" in result.stdout
    refused = cli("predict", copy / "demo_unet.onnx", tree, "--out", tmp_path / "p")
    assert refused.exit_code == 2 and "failed its parity check" in refused.stderr


# --- check first, time later (issue 25, rough edge 7) ---------------------------------------------------------


@pytest.fixture
def no_timing(monkeypatch):
    """Timing a runtime is an error: the test proves the command got by without it."""

    def timed(*args, **kwargs):
        raise AssertionError("a runtime was timed")

    monkeypatch.setattr(choose, "per_image_ms", timed)


def _own_copy(workdir, tmp_path):
    copy = tmp_path / "exports"
    shutil.copytree(workdir, copy, ignore=shutil.ignore_patterns(CACHE))
    return copy


def test_resume_with_nothing_left_to_do_times_no_runtime(workdir, tree, tmp_path, monkeypatch):
    copy, out = _own_copy(workdir, tmp_path), tmp_path / "o"
    first = cli("predict", copy, tree, "--out", out, "--runtime", "onnxruntime")
    assert first.exit_code == 0, first.output
    masks = {p: sha(p) for p in out.rglob("*_mask.png")}
    monkeypatch.setattr(choose, "per_image_ms", lambda *a, **k: pytest.fail("a runtime was timed"))
    again = cli("predict", copy, tree, "--out", out, "--resume", "--report", tmp_path / "r.json")
    assert again.exit_code == 0, again.output
    assert "runtime auto: onnxruntime, not timed: every mask is already done (--resume)" in again.stdout
    assert f"wrote 0 masks to {out}" in again.stdout and "5 already done (--resume)" in again.stdout
    assert {p: sha(p) for p in out.rglob("*_mask.png")} == masks
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["skipped"] == 5 and report["written"] == 0 and report["not_run"] == 0


def test_an_unreachable_ray_address_is_refused_before_any_runtime_is_timed(workdir, tree, tmp_path, no_timing):
    from unet_export.predict.ray_local import free_port

    address = f"127.0.0.1:{free_port()}"
    result = cli("predict", _own_copy(workdir, tmp_path), tree, "--out", tmp_path / "o", "--ray-address", address)
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith(f"error: cannot join the Ray cluster at {address}: ")
    assert len(result.stderr.strip().splitlines()) == 1 and "timing" not in result.stdout
    assert not (tmp_path / "o").exists()


def test_the_second_predict_on_a_workdir_reuses_the_remembered_runtime(workdir, tree, tmp_path, monkeypatch):
    copy = _own_copy(workdir, tmp_path)
    first = cli("predict", copy, tree, "--out", tmp_path / "a")
    assert first.exit_code == 0, first.output
    chosen = next(line for line in first.stdout.splitlines() if line.startswith("runtime auto: ")).split()[2]
    monkeypatch.setattr(choose, "per_image_ms", lambda *a, **k: pytest.fail("a runtime was timed"))
    second = cli("predict", copy, tree, "--out", tmp_path / "b")
    assert second.exit_code == 0, second.output
    said = [line for line in second.stdout.splitlines() if line.startswith("runtime auto: ")]
    assert len(said) == 1 and said[0].startswith(f"runtime auto: {chosen}, remembered from "), second.stdout
    assert str(copy / CACHE) in said[0] and "timing" not in second.stdout
    assert f", {chosen}, batch 8, local)" in second.stdout


def _tamper_runtime(path: Path) -> None:
    """Name the slower runtime as the choice, its timings left as they are."""
    data = json.loads(path.read_text())
    (record,) = data["records"].values()
    record["runtime"] = max(record["ms"], key=record["ms"].get)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("damage", [_tamper_runtime, lambda path: path.write_bytes(b"\x00{not json"),
                                    lambda path: path.write_text("[" * 100000)], ids=["edited", "garbage", "deep"])  # fmt: skip
def test_a_tampered_runtime_cache_is_ignored_and_timed_again(workdir, tree, tmp_path, monkeypatch, damage):
    copy = _own_copy(workdir, tmp_path)
    assert cli("predict", copy, tree, "--out", tmp_path / "a").exit_code == 0
    damage(copy / CACHE)
    timed = []
    real = choose.per_image_ms
    monkeypatch.setattr(choose, "per_image_ms", lambda manifest, entry, *a, **k: timed.append(entry["format"]) or real(manifest, entry, *a, **k))
    again = cli("predict", copy, tree, "--out", tmp_path / "b")
    assert again.exit_code == 0, again.output
    assert sorted(timed) == ["onnx", "openvino"] and "remembered" not in again.stdout
    assert json.loads((copy / CACHE).read_text())["version"] == 1  # written whole again


def test_a_runtime_cache_that_links_out_of_the_workdir_is_neither_read_nor_written_through(workdir, tree, tmp_path):
    """The workdir is untrusted: a .predict-runtime.json that is a link to a file elsewhere (here a
    valid record, so reading it would be believed) is not read, and the new record replaces the
    link instead of overwriting its target."""
    copy = _own_copy(workdir, tmp_path)
    assert cli("predict", copy, tree, "--out", tmp_path / "a").exit_code == 0
    outside = tmp_path / "outside.json"
    (copy / CACHE).rename(outside)
    before = outside.read_bytes()
    (copy / CACHE).symlink_to(outside)
    again = cli("predict", copy, tree, "--out", tmp_path / "b")
    assert again.exit_code == 0, again.output
    assert "remembered" not in again.stdout
    assert outside.read_bytes() == before and not (copy / CACHE).is_symlink()


def test_a_remembered_choice_belongs_to_its_machine_and_its_artefacts(workdir):
    from unet_export.predict import remember

    candidates = choose.runnable(json.loads((workdir / "manifest.json").read_text()), torch.device("cpu"))
    key = remember.key_of(torch.device("cpu"), candidates)
    assert key["machine"]["name"] and key["artefacts"] == {label: e["sha256"] for label, e in candidates.items()}
    changed = {label: {**entry, "sha256": "0" * 64} for label, entry in candidates.items()}
    assert remember.key_of(torch.device("cpu"), changed) != key  # a re-exported artefact is timed again
    other = {**key, "machine": {**key["machine"], "host": "elsewhere"}}
    assert other != key


# --- interruption -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def many_small(tmp_path_factory):
    """200 small images (the run must still be going when a signal comes) and the masks an
    uninterrupted run writes for them (made once: each killed run is checked against them)."""
    folder = tmp_path_factory.mktemp("many") / "in"
    folder.mkdir()
    small = [Image.open(path).convert("RGB").resize((64, 64)) for path in VAL_IMAGES]
    for i in range(200):
        small[i % len(small)].save(folder / f"im{i:03d}.png")
    reference = run_predict(DEMO_WEIGHTS, [folder], folder.parent / "ref", PredictOptions(), device="cpu")
    return folder, {o.job.rel: o.sha256 for o in reference.written}


# SIGKILL (14 s) in make test-all: SIGINT and SIGTERM cover the same whole-mask and resume promise in make test
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, pytest.param(signal.SIGKILL, marks=pytest.mark.slow)],
                         ids=lambda sig: sig.name)
def test_a_killed_run_leaves_whole_masks_and_resume_finishes_it(sig, many_small, tmp_path):
    """Ctrl-C and SIGTERM stop cleanly (exit 128 + the signal, the report written), also when the
    launcher left SIGINT ignored (the run went on to the end: a flaky test found it); a kill -9
    leaves at most hidden temp files; either way every *_mask.png is whole and --resume writes
    exactly the rest, the masks of an uninterrupted run."""
    (folder, reference), n = many_small, 200
    out, report = tmp_path / "o", tmp_path / "report.json"
    command = [sys.executable, "-m", "unet_export", "predict", str(DEMO_WEIGHTS), str(folder), "--out", str(out),
               "--batch-size", "2", "--workers", "1", "--device", "cpu", "--report", str(report)]  # fmt: skip
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=ignoring_sigint)
    try:
        deadline = time.monotonic() + 120
        while len(list(out.glob("*_mask.png"))) < 4 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    masks = sorted(out.glob("*_mask.png"))
    assert 4 <= len(masks) < n, len(masks)
    for mask in masks:
        with Image.open(mask) as img:
            img.verify()
    if sig != signal.SIGKILL:
        assert proc.returncode == 128 + sig, (proc.returncode, err)
        assert err.strip() == ("error: interrupted" if sig == signal.SIGINT else "error: terminated (SIGTERM)")
        data = json.loads(report.read_text())
        assert data["interrupted"] and data["written"] == len(masks) and not list(out.glob(".*"))
    resumed = run_predict(DEMO_WEIGHTS, [folder], out, PredictOptions(resume=True), device="cpu")
    assert len(resumed.skipped) == len(masks) and len(resumed.written) == n - len(masks)
    assert not list(out.glob(".*"))  # a killed writer's temp files are swept
    assert reference == {p.name[: -len("_mask.png")]: sha(p) for p in out.glob("*_mask.png")}


def test_a_ctrl_c_while_waiting_on_a_write_loses_no_mask_from_the_report(tmp_path, monkeypatch):
    """Ctrl-C lands in the main thread at any bytecode. Here it comes while the main thread waits
    on a write it has already taken off its queue (as a SIGTERM test under load once did: 6 masks
    on disk, 5 in the report): every mask on disk is still in the report, once."""
    from unet_export.predict import local
    from unet_export.predict.batch import prepare, run

    real, calls = local._written, []

    def interrupted_after_the_third(future):
        calls.append(real(future))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return calls[-1]

    monkeypatch.setattr(local, "_written", interrupted_after_the_third)
    out = tmp_path / "o"
    prepared = prepare(DEMO_WEIGHTS, VAL_IMAGES, out, PredictOptions(batch_size=2, workers=1), device="cpu")
    with pytest.raises(KeyboardInterrupt):
        run(prepared)
    on_disk = sorted(p.name for p in out.glob("*_mask.png"))
    recorded = [o.mask.name for o in prepared.report.written]
    assert prepared.report.interrupted and 3 <= len(on_disk) < len(VAL_IMAGES)
    assert sorted(recorded) == on_disk and len(set(recorded)) == len(recorded)


# --- the stages' fast paths answer as the slow ones did ------------------------------------------------


def test_to_classes_is_logits_to_mask_with_ties_and_nan():
    """numpy's argmax replaced torch's in predict (10x faster here): the same first-maximum
    answer on ties, NaN counted as the maximum."""
    from unet_export.data.dataset import Preprocess
    from unet_export.metrics import logits_to_mask
    from unet_export.predict import to_classes

    logits = torch.randint(-2, 3, (1, 4, 40, 50), generator=torch.Generator().manual_seed(0)).float()
    logits[0, 2, 3, 4] = logits[0, 0, 5, 5] = logits[0, 3, 5, 5] = float("nan")
    assert np.array_equal(to_classes(logits, (50, 40), Preprocess()), logits_to_mask(logits)[0].numpy())
    one = torch.randn(1, 1, 8, 8)
    assert np.array_equal(to_classes(one, (8, 8), Preprocess()), logits_to_mask(one)[0].numpy())


@pytest.mark.parametrize("mode", ["RGB", "L", "I;16"])
def test_reader_threads_preprocess_as_image_to_tensor(tmp_path, mode):
    from unet_export.data.dataset import image_to_tensor, Preprocess
    from unet_export.data.images import load_image
    from unet_export.predict.stages import image_array

    rng = np.random.default_rng(0)
    if mode == "I;16":
        Image.fromarray(rng.integers(0, 65535, (30, 40), dtype=np.uint16)).save(tmp_path / "im.png")
    else:
        Image.open(VAL_IMAGES[0]).convert(mode).save(tmp_path / "im.png")
    img = load_image(tmp_path / "im.png", 3)
    imagenet = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}  # an smp encoder's (issue 27)
    for preprocess in (Preprocess(), Preprocess(scale=0.5), Preprocess(square=64), Preprocess(**imagenet),
                       Preprocess(scale=0.5, **imagenet, bgr=True), Preprocess(square=64, bgr=True)):  # fmt: skip
        assert np.array_equal(image_array(img, preprocess, 3), image_to_tensor(img, preprocess, 3).numpy())


# Issue 15: a rough edge a new user hit, reproduced before it was fixed (was tests/test_rough_edges.py).


def test_predict_counts_one_mask_in_the_singular(tmp_path):
    from unet_export.flows.demo import DEMO_VAL, DEMO_WEIGHTS

    image = sorted((DEMO_VAL / "imgs").iterdir())[0]
    result = runner.invoke(app, ["predict", str(DEMO_WEIGHTS), str(image), "--out", str(tmp_path / "m"),
                                 "--device", "cpu"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert f"wrote 1 mask to {tmp_path / 'm'}" in " ".join(result.stdout.split())


def test_a_static_onnx_model_pads_to_its_size_or_says_it_cannot(tmp_path):
    import numpy as np
    import torch
    from PIL import Image

    from unet_export.flows.demo import DEMO_WEIGHTS
    from unet_export.predict import load_predictor, predict_classes
    from unet_export.data.synth import make_synth

    out = tmp_path / "exports"
    exported = runner.invoke(app, ["onnx", str(DEMO_WEIGHTS), "-w", str(out), "--static", "--height", "128",
                                   "--width", "128", "--device", "cpu"])  # fmt: skip
    assert exported.exit_code == 0, exported.output
    onnx_path = out / f"{DEMO_WEIGHTS.stem}.onnx"
    small = tmp_path / "small.png"
    Image.new("RGB", (120, 100), (90, 40, 200)).save(small)  # 100x120: fits in 128x128
    pad = runner.invoke(app, ["predict", str(onnx_path), str(small), "--out", str(tmp_path / "m"), "--device", "cpu"])
    assert pad.exit_code == 0, pad.output
    with Image.open(tmp_path / "m" / "small_mask.png") as mask:
        assert mask.size == (120, 100)
    # the same padding through the eager model gives the same classes
    static, eager = load_predictor(onnx_path, torch.device("cpu")), load_predictor(DEMO_WEIGHTS, torch.device("cpu"))
    assert static.fixed == (128, 128) and eager.fixed is None
    eager.fixed = static.fixed
    with static.runner, eager.runner:
        assert np.array_equal(predict_classes(static, small)[0], predict_classes(eager, small)[0])
    big = tmp_path / "big.png"
    Image.new("RGB", (200, 150), (90, 40, 200)).save(big)
    # streaming predict (issue 18): the image it cannot take is that image's failure, the rest run
    refused = runner.invoke(app, ["predict", str(onnx_path), str(small), str(big), "--out", str(tmp_path / "n"),
                                  "--batch-size", "4", "--device", "cpu"])  # fmt: skip
    assert refused.exit_code == 1 and "wrote 1 mask " in refused.stdout and "batch 1," in refused.stdout
    assert "big.png: the model is static at 128x128 and the image is 150x200" in refused.stderr
    make_synth(tmp_path / "data", n=2, size=(96, 96), classes=3, seed=0)
    evaluated = runner.invoke(app, ["evaluate", str(DEMO_WEIGHTS), str(tmp_path / "data"), "-w", str(out),
                                    "--device", "cpu"])  # fmt: skip
    assert evaluated.exit_code == 0, evaluated.output
    assert "static artefact takes 1x3x128x128, the images are 96x96" in " ".join(evaluated.stdout.split())


def test_predict_on_a_dataset_folder_predicts_its_images_not_its_masks(tmp_path):
    from unet_export.data.synth import make_synth
    from unet_export.flows.demo import DEMO_WEIGHTS

    make_synth(tmp_path / "data", n=3, size=(32, 32), seed=0)
    out = tmp_path / "m"
    result = runner.invoke(app, ["predict", str(DEMO_WEIGHTS), str(tmp_path / "data"), "--out", str(out),
                                 "--device", "cpu"])  # fmt: skip
    assert result.exit_code == 0, result.output
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    assert written == [f"synth_000{i}_mask.png" for i in range(3)]
    assert f"wrote 3 masks to {out}" in " ".join(result.stdout.split())


# Issue 25 (helper i25a): a closed pipe, --version, counts in the singular, failures on stderr
# (was tests/test_rough_edges.py).


def test_predict_lists_failures_on_stderr_and_counts_in_the_singular(tmp_path):
    from unet_export.flows.demo import DEMO_WEIGHTS

    (tmp_path / "in").mkdir()
    good = sorted((DEMO_VAL / "imgs").iterdir())[0]
    (tmp_path / "in" / good.name).write_bytes(good.read_bytes())
    (tmp_path / "in" / "broken.png").write_bytes(b"not a png")
    result = runner.invoke(app, ["predict", str(DEMO_WEIGHTS), str(tmp_path / "in"), "--out", str(tmp_path / "m"),
                                 "--device", "cpu"])  # fmt: skip
    assert result.exit_code == 1, result.output
    assert "1 failed:" in result.stderr and "broken.png" in result.stderr
    assert "failed" not in result.stdout and "broken.png" not in result.stdout
    assert f"wrote 1 mask to {tmp_path / 'm'}" in " ".join(result.stdout.split())


# predict --ray: Ray's actor-restart line held back (ray-project/ray#57733; was tests/test_rough_edges.py).


FILTERED = """import os, sys, time
from unet_export.predict.stderr_filter import RAY_ACTOR_RESTART_WARNING, dropping_stderr_lines
ray_line = (b"[2026-12-06 09:43:19,950 E 11329 11329] core_worker.cc:2465: Actor with class name: "
            b"'MapWorker(MapBatches(_InferActor))' and ID: '748a' has constructor arguments in the object store "
            b"and max_restarts > 0. If the arguments in the object store go out of scope or are lost, the actor "
            b"restart will fail. See https://github.com/ray-project/ray/issues/53727 for more details.\\n")
with dropping_stderr_lines(RAY_ACTOR_RESTART_WARNING):
    os.write(2, b"before\\n" + ray_line)
    print("from python", file=sys.stderr)
    os.write(2, b"[2026-12-06 09:43:20,000 E 1 1] core_worker.cc:99: another Ray error\\n")
    for i in range(20000):  # more than a pipe holds: the copier must keep up, nothing blocks
        os.write(2, b"line %d\\n" % i)
    os.write(2, ray_line[:40])  # a line split across two writes
    os.write(2, ray_line[40:])
    os.write(2, b"no newline")
os.write(2, b"|after\\n")
"""


def test_the_stderr_filter_drops_rays_actor_restart_line_and_keeps_every_other_line():
    """Issue 25, rough edge 10 (b): Ray's C++ core worker writes this line straight to fd 2 on
    every `predict --ray` (ray-project/ray#57733); tests/predict/test_predict_ray.py checks the real run."""
    result = subprocess.run([sys.executable, "-c", FILTERED], capture_output=True, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    expected = (b"before\nfrom python\n[2026-12-06 09:43:20,000 E 1 1] core_worker.cc:99: another Ray error\n"
                + b"".join(b"line %d\n" % i for i in range(20000)) + b"no newline|after\n")  # fmt: skip
    assert result.stderr == expected
