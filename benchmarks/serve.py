"""Served against in-process throughput (issue 29), and where a served request's time goes.

    python benchmarks/serve.py                   # the demo workdir (exports/demo), batch 1 and 8
    python benchmarks/serve.py --seconds 2 --concurrency 1,4

The Python-backend model `unet-export triton` writes for the workdir (the runtime it measures
fastest), served by the bundled tritonserver on 127.0.0.1, and loaded by the project's own bounded
load test (unet_export.serving.loadtest: tritonclient clients, every answer compared with eager's
afterwards, a deadline). Per batch size (the requests' batch):

1. in-process: the same artefact with the same runtime in unet-bench's throughput mode (each
   setting the runtime offers, the fastest kept), at that batch, on seeded inputs;
2. the repository as written, and as it was written before issue 29 (dynamic batching waiting up
   to 2 ms to fill a batch), measured alternately, HTTP and gRPC apart, at each --concurrency:
   images/s, p50/p99 latency, the batch sizes dynamic batching formed, and the server's own split
   of a request's time (queue, input hand-off, execute, output hand-off); served / in-process
   >= 0.8 is the target. A reduced-precision model's requests are real images (the record's
   held-out ones), judged as `triton --check` judges them;
3. one cause at a time, each a change to the "before" repository or to the client, at
   --cause-concurrency over gRPC (HTTP for the tensor encoding), each measured alternately with
   "before": HTTP tensors as JSON, the instance count, the runtime's threads, dynamic batching's
   queue delay and preferred sizes. (Splitting a batch across OpenVINO THROUGHPUT streams inside
   the model was tried and measured slower at batch 1 and 8: not kept.)

The numbers are ratios measured in one run on a busy or quiet machine: run it alone.
Results: benchmarks/results/<date>-serve-<runtime>-<precision>[-<N>-instances]-<cpu>.json and .md.
"""

import argparse
import contextlib
import datetime
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from unet_export.api import write_repository  # noqa: E402
from unet_export.workdir.lookup import manifest_checkpoint  # noqa: E402
from unet_export.bench.stats import BenchConfig  # noqa: E402
from unet_export.bench.throughput import time_stream  # noqa: E402
from unet_export.checkpoint import build_model  # noqa: E402
from unet_export.device import device_info  # noqa: E402
from unet_export.models import mask_threshold  # noqa: E402
from unet_export.parity.gate import seeded_inputs  # noqa: E402
from unet_export.serving import configs  # noqa: E402
from unet_export.serving.client import SERVER_PARTS  # noqa: E402
from unet_export.serving.check import real_images  # noqa: E402
from unet_export.serving.selection import cpu_runner  # noqa: E402
from unet_export.serving.loadtest import load_test  # noqa: E402
from unet_export.parity.realimages import judged_on_images_only  # noqa: E402
from unet_export.data.dataset import Preprocess, image_to_tensor  # noqa: E402
from unet_export.data.images import load_image  # noqa: E402
from unet_export.serving.server import repository_server  # noqa: E402
from unet_export.serving.validate import read_record  # noqa: E402
from unet_export.workdir.manifest import load_manifest  # noqa: E402

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=HERE.parent / "exports" / "demo")
    parser.add_argument("--runtime", default="auto", choices=("auto", "onnxruntime", "openvino"))
    parser.add_argument("--precision", default="fp32", help="the served artefact's (python:PRECISION)")
    parser.add_argument("--instances", type=int, default=1, help="unet-export triton --instances")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--concurrency", default="1,2,4,8")
    parser.add_argument("--cause-concurrency", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=5.0, help="about how long each measurement runs")
    parser.add_argument("--rounds", type=int, default=2, help="each pair measured alternately this many times")
    parser.add_argument("--causes", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--only", help="causes whose label holds this text")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    concurrency = [int(c) for c in args.concurrency.split(",")]
    load = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory() as tmp:
        written = write_repository(args.workdir, Path(tmp) / "written", formats=f"python:{args.precision}",
                                   python_runtime=args.runtime, instances=args.instances)  # fmt: skip
        name = next(iter(read_record(written.repo)["models"]))
        record = read_record(written.repo)
        net = build_model(manifest_checkpoint(record))  # the eager reference, as --check builds it
        served = record["models"][name]
        print(f"{name}: {served['artifact']['path']} with {served['runtime']}", flush=True)
        result = {"model": name, "artifact": served["artifact"]["path"], "runtime": served["runtime"],
                  "written": settings_of(written.repo, name), "batches": {}}  # fmt: skip
        before = variant(written.repo, Path(tmp), "before", name, BEFORE)
        with served_by(before) as old, served_by(written.repo) as new:
            for batch in batches:
                inproc = in_process(args.workdir, served, batch, args.seconds)
                print(f"batch {batch}: in-process {inproc['img_per_s']:.1f} img/s ({inproc['setting']})", flush=True)
                bench = Bench(name, net, record, batch, inproc, args.seconds, args.rounds)
                part = result["batches"][batch] = {"in_process": inproc, "before": [], "as_written": []}
                for protocol in ("http", "grpc"):
                    for clients in concurrency:
                        a, b = bench.paired(old, new, clients, (protocol,))
                        part["before"].append(a)
                        part["as_written"].append(b)
                if args.causes:
                    part["causes"] = causes(bench, old, Path(tmp), args.cause_concurrency, args.only)
    load.append(os.getloadavg()[0])
    result["config"] = {"workdir": str(args.workdir), "runtime": args.runtime, "precision": args.precision,
                        "instances": args.instances, "concurrency": concurrency, "seconds": args.seconds,
                        "device": device_info(torch.device("cpu")), "load_avg": load, "commit": commit(),
                        "date": datetime.date.today().isoformat()}  # fmt: skip
    write(result)


def in_process(workdir: Path, served: dict, batch: int, seconds: float) -> dict:
    """The throughput-mode row of the served artefact and runtime at ``batch`` (unet-bench's
    timing: bench/throughput.py, each of the runtime's settings, the fastest kept)."""
    manifest = load_manifest(workdir)
    entry = next(e for e in manifest["artifacts"] if e["path"] == served["artifact"]["path"])
    x = seeded_inputs([(batch, *served["artifact"]["parity_shapes"][0][1:])], 11)[0]
    cfg = BenchConfig(batch=batch, warmup=3, min_time=seconds, min_iters=5)
    best = None
    runner = cpu_runner(entry, served["runtime"], workdir)
    for choice in runner.throughput_choices():
        with runner.for_throughput(choice):
            latencies, wall, _ = time_stream(runner, x, runner.infer(x), cfg)
            got = {"img_per_s": len(latencies) * batch / wall, "setting": runner.throughput_setting()}
        if best is None or got["img_per_s"] > best["img_per_s"]:
            best = got
    return best


@contextlib.contextmanager
def served_by(repo: Path):
    """(server, parsed configs) of ``repo``, running until the block ends."""
    server, found, _ = repository_server(repo)
    with server:
        yield server, found


class Bench:
    """Load tests of one batch size, two servings measured alternately (A B A B ...), so that
    a drift of the machine's speed lands on both: each side's img/s is its rounds' mean."""

    def __init__(self, name, net, record, batch, inproc, seconds, rounds):
        self.name, self.net, self.record, self.batch = name, net, record, batch
        self.inproc, self.seconds, self.rounds = inproc, seconds, rounds
        self.real = real_requests(record, batch)  # read once: every measurement sends the same requests

    def paired(self, a, b, clients: int, protocols: tuple, binary=(True, True)) -> tuple[dict, dict]:
        runs = ([], [])
        for _ in range(self.rounds):
            for side, (serving, tensors) in enumerate(zip((a, b), binary)):
                runs[side].append(self.measure(*serving, clients, protocols, tensors))
        return tuple(self.mean(r) for r in runs)

    def measure(self, server, found, clients, protocols, binary=True) -> dict:
        model, record = found[self.name], self.record["models"][self.name]
        requests = max(3, math.ceil(self.inproc["img_per_s"] * self.seconds / (self.batch * clients)))
        load_test(server, self.name, model, record, self.net, clients=clients, requests=2, batch=self.batch,
                  protocols=protocols, binary=binary, real=self.real)  # warm-up: OpenVINO compiles per shape on first use
        report = load_test(server, self.name, model, record, self.net, clients=clients, requests=requests,
                           batch=self.batch, protocols=protocols, binary=binary, deadline_s=30 * self.seconds,
                           threshold=mask_threshold(self.record["model"]["config"]), real=self.real)  # fmt: skip
        row = {"protocol": "+".join(protocols) + ("" if binary else " (JSON)"), "clients": clients,
               "batch": self.batch, "requests": report.answered, "img_per_s": report.images_per_s,
               "latency_ms": report.latency_ms, "formed_batches": report.batches, "server_ms": report.server_ms,
               "passed": report.passed, "mismatched": report.mismatched, "errors": report.errors[:3]}  # fmt: skip
        print(f"  {row['protocol']:>12} x{clients} b{self.batch}: {row['img_per_s']:7.1f} img/s, p50 "
              f"{report.latency_ms.get('p50', 0):.1f} ms, server {fmt_split(report.server_ms)}, batches "
              f"{report.batches}, passed {report.passed}", flush=True)  # fmt: skip
        return row

    def mean(self, runs: list[dict]) -> dict:
        """The last run's details, with img/s the mean of every run (each listed), verdicts all."""
        row = dict(runs[-1])
        row["runs_img_per_s"] = [r["img_per_s"] for r in runs]
        row["img_per_s"] = sum(row["runs_img_per_s"]) / len(runs)
        row["vs_in_process"] = row["img_per_s"] / self.inproc["img_per_s"]
        row["passed"] = all(r["passed"] for r in runs)
        row["requests"] = sum(r["requests"] for r in runs)
        return row


def real_requests(record: dict, batch: int) -> list[torch.Tensor] | None:
    """For a reduced-precision model (judged on real images only, as `triton --check` judges it):
    requests of ``batch`` of the record's held-out images at the export size, cycled; None for FP32
    (seeded requests)."""
    name = next(iter(record["models"]))
    artifact = record["models"][name]["artifact"]
    if not judged_on_images_only(artifact["precision"]):
        return None
    images, why = real_images(record, None)
    if not images:
        sys.exit(f"{artifact['path']} is {artifact['precision']}: judged on real images only, and {why}")
    n_channels = record["model"]["config"].get("n_channels", 3)
    pp = Preprocess.from_dict(record["model"].get("preprocess"))
    size = tuple(artifact["parity_shapes"][0][2:])
    tensors = [t for t in (image_to_tensor(load_image(p, n_channels), pp, n_channels) for p in images)
               if tuple(t.shape[-2:]) == size]  # fmt: skip
    return [torch.stack([tensors[(k * batch + i) % len(tensors)] for i in range(batch)]) for k in range(4)]


def fmt_split(split: dict) -> str:
    return " ".join(f"{part.replace('compute_', '')} {split[part]:.1f}" for part in SERVER_PARTS if part in split)


BEFORE = {"delay_us": 2000}  # the config before issue 29: dynamic batching waited up to 2 ms for company
# One cause at a time against "before": (label, what it changes, edit of the config's instance
# count, its unet_export settings, its dynamic batching; or the client's tensor encoding).
CAUSES = [
    ("HTTP tensors as JSON", "client", {"binary": False}),
    ("2 instances, 1 thread each", "config", {"instances": 2}),
    ("1 instance, 1 thread", "config", {"settings": {"threads": 1}}),
    ("queue delay 0", "config", {"delay_us": 0}),
    ("queue delay 20 ms", "config", {"delay_us": 20000}),
    ("preferred batch size = max", "config", {"preferred": "max"}),
]


def causes(bench: Bench, before, tmp: Path, clients: int, only: str | None = None) -> list[dict]:
    """Each cause against the "before" serving, alternately, over gRPC (the client's tensor
    encoding over HTTP, on the one "before" server)."""
    rows = []
    for label, where, change in [c for c in CAUSES if not only or only in c[0]]:
        print(f" cause: {label}", flush=True)
        if where == "client":
            a, b = bench.paired(before, before, clients, ("http",), binary=(True, False))
            rows.append({"cause": label, "before": a, "after": b})
            continue
        repo = variant(bench_repo(before), tmp, label, bench.name, change)
        try:
            with served_by(repo) as changed:
                a, b = bench.paired(before, changed, clients, ("grpc",))
            rows.append({"cause": label, "before": a, "after": b, "settings": settings_of(repo, bench.name)})
        finally:
            shutil.rmtree(repo)
    return rows


def bench_repo(serving) -> Path:
    return serving[0].repo


def variant(repo: Path, tmp: Path, label: str, name: str, change: dict) -> Path:
    """A copy of ``repo`` with ``name``'s config changed (edit)."""
    copy = tmp / re.sub(r"[^a-z0-9]+", "-", label.lower())
    shutil.copytree(repo, copy)
    edit(copy / name / configs.CONFIG_NAME, **change)
    return copy


def edit(path: Path, instances: int | None = None, settings: dict | None = None, delay_us: int | None = None,
         preferred: str | None = None) -> None:  # fmt: skip
    config = configs.parse(path)
    if instances:
        config.instance_group[0].count = instances
    if settings:
        value = json.loads(config.parameters["unet_export"].string_value) | settings
        configs.set_parameter(config, "unet_export", value)
    if delay_us is not None:
        config.dynamic_batching.max_queue_delay_microseconds = delay_us
    if preferred:
        del config.dynamic_batching.preferred_batch_size[:]
        config.dynamic_batching.preferred_batch_size.append(config.max_batch_size)
    path.write_text(configs.to_text(config, ["edited by benchmarks/serve.py"]))


def settings_of(repo: Path, name: str) -> dict:
    config = configs.parse(repo / name / configs.CONFIG_NAME)
    value = json.loads(config.parameters["unet_export"].string_value)
    return {"instances": sum(g.count or 1 for g in config.instance_group), "threads": value.get("threads"),
            "queue_delay_us": config.dynamic_batching.max_queue_delay_microseconds,
            "preferred": list(config.dynamic_batching.preferred_batch_size)}  # fmt: skip


def commit() -> str:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=HERE).stdout.strip()


def write(result: dict) -> None:
    c = result["config"]
    cpu = re.sub(r"[^a-z0-9]+", "-", c["device"]["name"].lower()).strip("-")
    what = f"{result['runtime']}-{c['precision']}" + (f"-{c['instances']}-instances" if c["instances"] > 1 else "")
    stem = HERE / "results" / f"{c['date']}-serve-{what}-{cpu}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# Served against in-process throughput: {result['model']} ({result['artifact']} with {result['runtime']})",
             f"{c['device']['name']}, {c['device']['cores']} cores, commit {c['commit']}, load average {c['load_avg']}",
             f"Repository as written: {result['written']}", ""]  # fmt: skip
    for batch, part in result["batches"].items():
        inproc = part["in_process"]
        lines += [f"## Requests of batch {batch}: in-process {inproc['img_per_s']:.1f} img/s ({inproc['setting']})", "",
                  "| repository | protocol | clients | img/s | served / in-process (target >= 0.8) | p50 ms | p99 ms | server split ms "
                  "(queue, input, execute, output) | formed batches | answers match eager |",
                  "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- | --- | --- |"]  # fmt: skip
        lines += [row_line(r, "as written") for r in part["as_written"]] + [row_line(r, "before") for r in part["before"]]
        if part.get("causes"):
            lines += ["", f"Causes, each alone against the repository as written before issue 29, measured alternately "
                      f"with it (batch {batch}):", "",
                      "| cause | protocol | clients | before img/s | with the cause img/s | with / before | server split "
                      "ms before | with the cause | formed batches with the cause | answers match eager |",
                      "| --- | --- | ---: | ---: | ---: | ---: | --- | --- | --- | --- |"]  # fmt: skip
            lines += [cause_line(cause) for cause in part["causes"]]
        lines.append("")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def cause_line(cause: dict) -> str:
    a, b = cause["before"], cause["after"]
    return (f"| {cause['cause']} | {b['protocol']} | {b['clients']} | {a['img_per_s']:.1f} | {b['img_per_s']:.1f} | "
            f"{b['img_per_s'] / a['img_per_s']:.2f} | {fmt_split(a['server_ms'])} | {fmt_split(b['server_ms'])} | "
            f"{b['formed_batches']} | {a['passed'] and b['passed']} |")  # fmt: skip


def row_line(r: dict, repository: str) -> str:
    lat = r["latency_ms"]
    return (f"| {repository} | {r['protocol']} | {r['clients']} | {r['img_per_s']:.1f} | {r['vs_in_process']:.2f} | "
            f"{lat.get('p50', 0):.1f} | {lat.get('p99', 0):.1f} | {fmt_split(r['server_ms'])} | {r['formed_batches']} | "
            f"{r['passed']} |")  # fmt: skip


if __name__ == "__main__":
    main()
