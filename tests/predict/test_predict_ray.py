"""`predict --ray` on a two-node Ray cluster on this machine (issue 18): a head and a worker
node at 127.0.0.1 (ray.cluster_utils.Cluster in a keeper process: `ray start` leaves loopback,
see pipeline/ray_local.py), token auth on, bounded in time, and everything they started
stopped by PID afterwards. 200 images: the masks are byte-identical to the local
pipeline's, none missing or duplicated, and both nodes did work."""

import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from pathlib import Path

import pytest

from unet_export.flows.demo import DEMO_VAL, DEMO_WEIGHTS
from unet_export.predict.ray_local import SOCKET_ROOM, _sessions_dir, free_port, loopback_cluster, ray_env

pytestmark = pytest.mark.ray
N_IMAGES = 200


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """(address, env): a head and one worker node on 127.0.0.1, stopped by PID afterwards."""
    with loopback_cluster(tmp_path_factory.mktemp("ray"), nodes=2) as found:
        yield found


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("many") / "imgs"
    sources = sorted((DEMO_VAL / "imgs").iterdir())
    for i in range(N_IMAGES):
        sub = folder / f"part{i % 3}"
        sub.mkdir(parents=True, exist_ok=True)
        shutil.copy(sources[i % len(sources)], sub / f"im{i:03d}.png")
    return folder


def predict(args, env, timeout=300):
    return subprocess.run([sys.executable, "-m", "unet_export", "predict", *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip


def test_two_node_cluster_writes_the_local_pipelines_masks(cluster, images, tmp_path):
    address, env = cluster
    local = predict([DEMO_WEIGHTS, images, "--out", tmp_path / "local", "--report", tmp_path / "local.json"], env)
    assert local.returncode == 0, local.stderr
    on_ray = predict([DEMO_WEIGHTS, images, "--out", tmp_path / "ray", "--report", tmp_path / "ray.json",
                      "--ray-address", address, "--batch-size", "4"], env)  # fmt: skip
    assert on_ray.returncode == 0, on_ray.stderr
    assert on_ray.stderr == ""  # issue 25: not even Ray's core_worker.cc line about actor restarts
    assert f"wrote {N_IMAGES} masks" in on_ray.stdout and ", ray)" in on_ray.stdout
    report, reference = json.loads((tmp_path / "ray.json").read_text()), json.loads((tmp_path / "local.json").read_text())
    assert report["engine"] == "ray" and report["written"] == N_IMAGES and report["failed"] == 0
    assert report["masks"] == reference["masks"]  # names, order and sha256: byte-identical, none missing or twice
    files = sorted(p.relative_to(tmp_path / "ray").as_posix() for p in (tmp_path / "ray").rglob("*.png"))
    assert files == sorted(m["mask"] for m in reference["masks"]) and len(set(files)) == N_IMAGES
    ray_facts = report["ray"]
    assert ray_facts["nodes"] == 2 and ray_facts["node_addresses"] == ["127.0.0.1"]
    per_node = ray_facts["images_per_node"]
    assert len(per_node) == 2 and all(n > 0 for n in per_node.values()) and sum(per_node.values()) == N_IMAGES


def test_an_unreachable_cluster_is_one_line_and_exit_2(tmp_path):
    env = ray_env(tmp_path)
    result = predict([DEMO_WEIGHTS, sorted((DEMO_VAL / "imgs").iterdir())[0], "--out", tmp_path / "o",
                      "--ray-address", f"127.0.0.1:{free_port()}"], env, timeout=180)  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: cannot join the Ray cluster at 127.0.0.1:")
    assert not (tmp_path / "o").exists()


def test_sigterm_stops_a_ray_run_cleanly_and_resume_finishes_it(cluster, images, tmp_path):
    """ray.init installs its own SIGTERM handler (sys.exit(15)); predict keeps its own: exit 143,
    the report written and marked interrupted, the masks whole, --resume writes the rest."""
    address, env = cluster
    out, report = tmp_path / "o", tmp_path / "r.json"
    args = [DEMO_WEIGHTS, images, "--out", out, "--report", report, "--ray-address", address, "--batch-size", "2"]
    proc = subprocess.Popen([sys.executable, "-m", "unet_export", "predict", *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while len(list(out.rglob("*_mask.png"))) < 4 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 143 and err.strip().endswith("error: terminated (SIGTERM)"), (proc.returncode, err)
    data = json.loads(report.read_text())
    masks = sorted(out.rglob("*_mask.png"))
    # Ray hands rows back a block at a time: masks on disk the driver had not heard of yet are
    # missing from the report's count, never the other way round; --resume finds them all
    assert data["interrupted"] and data["written"] <= len(masks) and 4 <= len(masks) < N_IMAGES
    resumed = predict([*args[:-2], "--resume"], env)
    assert resumed.returncode == 0, resumed.stderr
    assert f"wrote {N_IMAGES - len(masks)} masks" in resumed.stdout and f"{len(masks)} already done" in resumed.stdout
    assert len(list(out.rglob("*_mask.png"))) == N_IMAGES and not list(out.rglob(".*"))


@pytest.fixture
def empty_tmpdir(tmp_path, monkeypatch):
    """A fresh machine: $TMPDIR has no `ray` folder yet (issue 24: a leftover /tmp/ray hid that
    the keeper needed one). Short, so that the keeper uses it (see _sessions_dir); tmp_path is
    made first, so pytest's own folders are not in it."""
    empty = Path(tempfile.mkdtemp(prefix="t", dir="/tmp"))
    monkeypatch.setenv("TMPDIR", str(empty))
    monkeypatch.setattr(tempfile, "tempdir", None)  # gettempdir() reads $TMPDIR again
    yield empty
    shutil.rmtree(empty, ignore_errors=True)


DRIVER = """import sys, ray
ray.init(address=sys.argv[1], log_to_driver=False)
alive = [n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]]
print(len(alive), ",".join(sorted(set(alive))), ray.get(ray.remote(lambda x: x * 7).remote(6)))
"""


def test_the_keeper_starts_a_working_cluster_with_an_empty_tmpdir(empty_tmpdir, tmp_path):
    """Ray's Cluster writes `ray_current_cluster` under Ray's default temp dir: the keeper keeps
    that inside its own folder, so it needs no $TMPDIR/ray, leaves none, and no ray.init()
    elsewhere on the machine finds the test cluster by that file."""
    with loopback_cluster(tmp_path / "ray", nodes=2) as (address, env):
        assert env["TMPDIR"] == str(empty_tmpdir)
        [sessions] = empty_tmpdir.iterdir()  # the keeper's folder, in $TMPDIR
        assert (sessions / "ray" / "ray_current_cluster").read_text().strip() == address
        driver = subprocess.run([sys.executable, "-c", DRIVER, address], env=env, capture_output=True, text=True,
                                timeout=180)  # fmt: skip
        assert driver.returncode == 0, driver.stderr
        assert driver.stdout.split() == ["2", "127.0.0.1", "42"]  # two live nodes, on loopback only, a task ran
        assert not (empty_tmpdir / "ray").exists()
    assert list(empty_tmpdir.iterdir()) == []  # the keeper's folder is gone with it


def test_predict_on_a_local_ray_instance_with_an_empty_tmpdir(empty_tmpdir, tmp_path):
    """`predict --ray` without an address starts its own instance: it works on a fresh machine
    and writes the local pipeline's masks."""
    sources = sorted((DEMO_VAL / "imgs").iterdir())[:3]
    env = ray_env(tmp_path / "home")
    runs = {}
    for engine in ("local", "ray"):
        args = [DEMO_WEIGHTS, *sources, "--out", tmp_path / engine, "--report", tmp_path / f"{engine}.json"]
        runs[engine] = predict(args + (["--ray"] if engine == "ray" else []), env)
        assert runs[engine].returncode == 0, runs[engine].stderr
    assert "wrote 3 masks" in runs["ray"].stdout and ", ray)" in runs["ray"].stdout
    assert runs["ray"].stderr == ""  # issue 25: not even Ray's core_worker.cc line about actor restarts
    report, reference = (json.loads((tmp_path / f"{e}.json").read_text()) for e in ("ray", "local"))
    assert report["engine"] == "ray" and report["masks"] == reference["masks"] and len(report["masks"]) == 3


@pytest.mark.parametrize("length", ["short", "long"])
def test_the_keepers_folder_is_short_enough_for_rays_sockets(length, tmp_path, monkeypatch):
    """Under $TMPDIR when its path leaves room for Ray's socket paths, else under /tmp."""
    tmpdir = Path(tempfile.mkdtemp(prefix="t", dir="/tmp")) if length == "short" else tmp_path / ("x" * 60)
    tmpdir.mkdir(exist_ok=True)
    monkeypatch.setenv("TMPDIR", str(tmpdir))
    monkeypatch.setattr(tempfile, "tempdir", None)
    folder = _sessions_dir()
    try:
        assert folder.is_dir() and len(str(folder)) <= SOCKET_ROOM
        assert folder.parent == (tmpdir if length == "short" else Path("/tmp"))
    finally:
        folder.rmdir()
        if length == "short":
            tmpdir.rmdir()
