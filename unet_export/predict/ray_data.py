"""The predict pipeline on Ray Data (`predict --ray`): the same three stages as the local run
(predict.stages), so the masks are byte-identical. load runs as Ray tasks, infer in an actor
pool (one actor per node, spread by Ray Data's default SPREAD scheduling, each loading the
verified artefact once), write as tasks; every node
reads INPUTS and writes --out at the same paths (a shared filesystem on a real cluster), and
unet-export must be installed on every node.

Loopback: a local instance and a cluster at 127.0.0.1 keep to it (predict.ray_local says how
and why); otherwise Ray advertises the machine's other address."""

import importlib.util
import os
import signal
import threading
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from unet_export.data.images import load_image
from unet_export.errors import UserError, require
from unet_export.predict.choose import open_model
from unet_export.predict.inputs import Job
from unet_export.predict.local import stages_of
from unet_export.predict.ray_local import pin_to_loopback
from unet_export.predict.report import Report
from unet_export.predict.stages import Loaded, Outcome, Stages, infer, load, write
from unet_export.predict.stderr_filter import RAY_ACTOR_RESTART_WARNING, dropping_stderr_lines

LOOPBACK = ("127.0.0.1", "localhost")
TASK_CPUS = 0.5  # load and write tasks: an actor pool that takes every CPU would starve them (deadlock)


def run_ray(prepared, address: str | None, tick) -> Report:
    ray = require("ray", extra="ray")
    prepared.report.engine = "ray"
    stages = stages_of(prepared.predictor, prepared.options)
    started_here = _connect(ray, address)
    try:
        with dropping_stderr_lines(RAY_ACTOR_RESTART_WARNING):
            return _stream(ray, prepared, stages, address, tick)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM (the CLI): the report says the run stopped short
        prepared.report.interrupted = True
        raise
    except Exception as exc:
        if type(exc).__module__.startswith("ray"):  # a task's error arrives wrapped: say what it was
            raise UserError(f"the Ray job failed: {' '.join(str(exc).split())[:300]}") from None
        raise
    finally:
        if started_here:
            ray.shutdown()


def _stream(ray, prepared, stages: Stages, address: str | None, tick) -> Report:
    """Load as tasks, infer in an actor pool (one per node), write as tasks; outcomes in order of arrival."""
    report, options = prepared.report, prepared.options
    nodes = [n for n in ray.nodes() if n["Alive"] and n.get("Resources", {}).get("CPU", 0) >= 1]
    report.extra["ray"] = {"address": address or "local", "nodes": len(nodes),
                           "node_addresses": sorted({n["NodeManagerAddress"] for n in nodes})}  # fmt: skip
    rows = [{"src": str(job.src), "rel": job.rel} for job in prepared.jobs]
    ds = ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows), 4 * len(nodes) * report.batch_size)))
    common = {"stages": stages, "out": str(prepared.out)}
    ds = ds.map(_load_row, fn_kwargs={**common, "resume": options.resume}, num_cpus=TASK_CPUS)
    ds = ds.map_batches(_InferActor, batch_size=report.batch_size, batch_format="pandas",
                        fn_constructor_kwargs={"model": prepared.model, "runtime": report.runtime},
                        compute=ray.data.ActorPoolStrategy(size=max(1, len(nodes))), num_cpus=1)  # fmt: skip
    ds = ds.map(_write_row, fn_kwargs=common, num_cpus=TASK_CPUS)
    per_node: dict[str, int] = {}
    for row in ds.iter_rows():
        outcome = _outcome(row, prepared.out)
        if row.get("node"):
            per_node[row["node"]] = per_node.get(row["node"], 0) + 1
        report.add(outcome)
        tick(outcome)
    report.extra["ray"]["images_per_node"] = per_node
    return report


def _connect(ray, address: str | None) -> bool:
    """Join the cluster at ``address``, or start a local instance (True: stop it afterwards).
    A local instance, or a cluster at 127.0.0.1, keeps to loopback (predict.ray_local)."""
    import logging

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # the CLI draws its own bar
    ctx.print_on_execution_start = False
    for name in ("ray", "ray.data"):  # Ray's INFO/WARNING lines are not the user's business here
        logging.getLogger(name).setLevel(logging.ERROR)
    quiet = {"log_to_driver": False, "logging_level": logging.ERROR}
    if ray.is_initialized():
        return False
    if address is None or address.removeprefix("ray://").rsplit(":", 1)[0] in LOOPBACK:
        pin_to_loopback()
    if address:
        _check_listening(address)
        try:
            with _keeping_sigterm():
                ray.init(address=address, **quiet)
        except Exception as exc:  # ConnectionError, a timeout, an auth error: the cluster, not a bug
            raise UserError(f"cannot join the Ray cluster at {address}: {' '.join(str(exc).split())[:200]}") from None
        return True
    with _keeping_sigterm():
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, **quiet)
    return True


@contextmanager
def _keeping_sigterm():
    """ray.init replaces the SIGTERM handler with sys.exit(15); the caller's (the CLI stops a run
    cleanly, exit 143) stays."""
    previous = signal.getsignal(signal.SIGTERM)
    try:
        yield
    finally:
        if previous is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, previous)


def check_cluster(address: str | None) -> None:
    """Before predict opens or times a model: Ray is installed, and a cluster address answers."""
    if importlib.util.find_spec("ray") is None:
        require("ray", extra="ray")  # raises, with the install line
    if address:
        _check_listening(address)


def _check_listening(address: str, timeout: float = 5.0) -> None:
    """Ray retries an address where nothing listens for minutes; a TCP connect answers at once."""
    import socket

    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise UserError(f"cannot join the Ray cluster at {address}: {reason}") from None


def _load_row(row: dict, stages: Stages, out: str, resume: bool) -> dict:
    result = load(Job(Path(row["src"]), row["rel"]), stages, Path(out), resume)
    base = {"src": row["src"], "rel": row["rel"], "skipped": False, "reason": "", "x": b"", "shape": [], "size": []}
    if isinstance(result, Outcome):
        return base | {"skipped": result.skipped, "reason": result.reason or ""}
    return base | {"x": result.x.tobytes(), "shape": list(result.x.shape), "size": list(result.size)}


class _InferActor:
    """One per node: loads the verified artefact once (checked against its sha256), then runs
    batches; rows of several preprocessed sizes run as one call per size."""

    def __init__(self, model: str, runtime: str):
        import ray

        self.predictor, _ = open_model(model, "cpu", runtime)
        self.predictor.runner.activate()
        self.node = ray.get_runtime_context().get_node_id()

    def __call__(self, batch):
        classes = [b""] * len(batch)
        shapes = [[] for _ in range(len(batch))]
        reasons = list(batch["reason"])
        todo = [i for i in range(len(batch)) if batch["x"].iloc[i]]
        for shape in {_ints(batch["shape"].iloc[i]) for i in todo}:
            group = [i for i in todo if _ints(batch["shape"].iloc[i]) == shape]
            items = [Loaded(Job(Path(batch["src"].iloc[i]), batch["rel"].iloc[i]),
                            np.frombuffer(batch["x"].iloc[i], np.float32).reshape(shape), _ints(batch["size"].iloc[i]))
                     for i in group]  # fmt: skip
            try:
                results = infer(self.predictor, items)
            except UserError as exc:
                for i in group:
                    reasons[i] = str(exc)
                continue
            for i, mask in zip(group, results):
                classes[i], shapes[i] = mask.astype(np.int64).tobytes(), list(mask.shape)
        return batch.drop(columns=["x", "shape"]).assign(classes=classes, mask_shape=shapes, reason=reasons,
                                                         node=self.node)  # fmt: skip


def _write_row(row: dict, stages: Stages, out: str) -> dict:
    result = {"src": row["src"], "rel": row["rel"], "skipped": row["skipped"], "reason": row["reason"],
              "node": row["node"], "mask": "", "sha256": ""}  # fmt: skip
    if not row["classes"]:
        return result
    job = Job(Path(row["src"]), row["rel"])
    classes = np.frombuffer(row["classes"], np.int64).reshape(_ints(row["mask_shape"]))
    image = load_image(job.src, stages.n_channels, stages.max_pixels) if stages.overlay else None
    done = write(Loaded(job, np.empty(0), _ints(row["size"]), image), classes, stages, Path(out))
    return result | {"mask": str(done.mask), "sha256": done.sha256}


def _ints(values) -> tuple[int, ...]:
    """A list column comes back as a list or a numpy array, depending on the batch format."""
    return tuple(int(v) for v in values)


def _outcome(row: dict, out: Path) -> Outcome:
    job = Job(Path(row["src"]), row["rel"])
    if row["sha256"]:
        return Outcome(job, Path(row["mask"]), row["sha256"])
    if row["skipped"]:
        return Outcome(job, job.mask(out), skipped=True)
    return Outcome(job, reason=row["reason"] or "not written")
