"""`unet-export triton`: the workdir's verified artefacts -> a Triton model repository.

    from unet_export.serving.repository import write_repository
    result = write_repository("exports", with_pipeline=True)

Models (NAME defaults to the checkpoint's stem):
  NAME_onnx[_fp16]       platform onnxruntime_onnx       KIND_CPU
  NAME_tensorrt_<prec>   platform tensorrt_plan          KIND_GPU, max batch within the engine profile
  NAME_torchscript       platform pytorch_libtorch       KIND_CPU, INPUT__0 -> OUTPUT__0
  NAME_openvino          backend openvino                KIND_CPU
  NAME_python            backend python (triton_model.py running the fastest verified CPU artefact)
  NAME_pipeline          ensemble: NAME_preprocess -> the model -> NAME_postprocess (uint8 image -> mask)
The repository is written into a temp folder beside DIR, checked (``validate.check_repository``),
and only then renamed into place; ``unet_export.json`` records where every file came from.
"""

import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from unet_export.errors import UserError
from unet_export.fileio import ensure_free_space, pid_alive, sha256_file, write_json
from unet_export.parity.envelope import DEFAULT_MAX_BATCH, batch_for, of_entry
from unet_export.runtimes.openvino.runner import HINTS
from unet_export.runtimes.tensorrt.plan import entry_profiles
from unet_export.serving import configs
from unet_export.serving.configs import NATIVE, PYTHON, VERSION
from unet_export.serving.ensemble import pipeline_plans
from unet_export.serving.plan import MODEL_SOURCE, RECORD_NAME, ModelPlan
from unet_export.serving.selection import RuntimeChoice, choose_cpu_runtime, parse_formats, select
from unet_export.serving.validate import check_repository
from unet_export.workdir.ir import ir_weights
from unet_export.workdir.manifest import checked_path, load_manifest, tool_versions, utc_now

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
MAX_BATCH_LIMIT = 1024


@dataclass
class RepositoryResult:
    repo: Path
    plans: list[ModelPlan]
    skipped: list[str]
    runtime: RuntimeChoice | None
    seconds: float


def write_repository(workdir: str | Path = "exports", repo: str | Path | None = None, *, name: str | None = None,
                     max_batch: int | None = None, instances: int = 1, formats: str | None = None, with_pipeline: bool = False,
                     python_runtime: str = "auto", before_publish=None) -> RepositoryResult:  # fmt: skip
    """``before_publish(staged)`` may refuse the written repository before it replaces ``repo``
    (`triton --check` checks there what would stop its server from starting). ``max_batch``:
    max_batch_size (default 8, or an artefact's largest proven batch if smaller); more than an
    artefact it serves was proven at is refused (parity.envelope)."""
    started = time.perf_counter()
    workdir = Path(workdir)
    repo = Path(repo) if repo else workdir / "triton"
    _check_options(max_batch, instances, python_runtime)
    _check_destination(repo)
    manifest = load_manifest(workdir)
    if manifest.get("model") is None:
        raise UserError(f"no manifest with a model in {workdir}: run `unet-export onnx WEIGHTS --workdir {workdir}` "
                        f"first")  # fmt: skip
    name = _model_name(name, manifest)
    chosen = select(manifest, workdir, parse_formats(formats))
    plans = [native_plan(entry, manifest, workdir, name, max_batch, instances) for entry in chosen.publish]
    runtime = None
    if chosen.python:
        runtime = choose_cpu_runtime(manifest, workdir, python_runtime, chosen.python_precision)
        plans.append(python_plan(runtime, manifest, workdir, name, max_batch, instances))
    if not plans:
        raise UserError(f"nothing to publish from {workdir}: no verified artefact was selected")
    if with_pipeline:
        plans += pipeline_plans(plans, manifest, name, instances)
    with _staged_repository(repo, _bytes_needed(plans)) as staged:
        for plan in plans:
            write_model(staged, plan)
        write_json(staged / RECORD_NAME, _repository_record(workdir, manifest, plans, chosen.skipped, runtime))
        check_repository(staged)
        if before_publish is not None:
            before_publish(staged)
    return RepositoryResult(repo, plans, chosen.skipped, runtime, time.perf_counter() - started)


def _check_options(max_batch: int | None, instances: int, python_runtime: str) -> None:
    if max_batch is not None and not 1 <= max_batch <= MAX_BATCH_LIMIT:
        raise UserError(f"--max-batch {max_batch}: give 1..{MAX_BATCH_LIMIT} (Triton's max_batch_size; dynamic "
                        f"batching needs >= 1)")  # fmt: skip
    if not 1 <= instances <= 64:
        raise UserError(f"--instances {instances}: give 1..64 model instances")
    if python_runtime not in ("auto", "onnxruntime", "openvino"):
        raise UserError(f"--python-runtime {python_runtime!r}: choose auto, onnxruntime or openvino")


def _check_destination(repo: Path) -> None:
    """A repository replaces only an earlier one of ours: never a file, never someone's folder."""
    if repo.exists() and not repo.is_dir():
        raise UserError(f"--repo {repo} is a file, not a folder: choose another path")
    if repo.is_dir() and any(repo.iterdir()) and not (repo / RECORD_NAME).is_file():
        raise UserError(f"--repo {repo} is a non-empty folder that unet-export did not write: choose an empty or "
                        f"new path")  # fmt: skip


def _model_name(name: str | None, manifest: dict) -> str:
    name = name or re.sub(r"[^A-Za-z0-9_.-]", "_", Path(manifest["model"]["checkpoint"]["path"]).stem)
    if not _NAME.match(name):
        raise UserError(f"--name {name!r}: letters, digits, '_', '.' and '-' only, starting with a letter or digit")
    return name


FIXED_BY_MODEL = ("n_channels", "n_classes")  # symbolic dims the model's config fixes (TorchScript names them)


def tensor_dims(shape: list, model_config: dict) -> list[int]:
    """Manifest shape -> Triton dims: a size the model fixes (n_classes) resolved, -1 for the
    free ones (batch, height, width)."""
    return [d if isinstance(d, int) else int(model_config[d]) if d in FIXED_BY_MODEL and d in model_config else -1
            for d in shape]  # fmt: skip


def _specs(tensors: list[dict], model_config: dict, names: list[str] | None = None) -> tuple[bool, list[dict]]:
    """(batched, specs): batched when the batch dimension is free, which Triton then leaves out."""
    dims = [tensor_dims(t["shape"], model_config) for t in tensors]
    batched = all(d[0] == -1 for d in dims)
    specs = [{"name": n, "dtype": "FP32", "dims": d[1:] if batched else d}
             for n, d in zip(names or [t["name"] for t in tensors], dims, strict=True)]  # fmt: skip
    return batched, specs


def proven_batch(entry: dict, max_batch: int | None) -> int:
    """max_batch_size for the model serving ``entry``: --max-batch, by default 8 or the largest
    batch its envelope was proven at if smaller. More than that is refused (exit 2), before
    anything is written: Triton would batch requests into shapes the artefact was never checked
    at. A static artefact takes no batch dimension (max_batch_size 0); an entry without an
    envelope record keeps --max-batch as it is."""
    env = None if entry.get("size_rule", {}).get("static") else of_entry(entry)
    return batch_for(env, max_batch, DEFAULT_MAX_BATCH, "--max-batch", entry["path"])


def _artifact_record(entry: dict) -> dict:
    """The artefact a model serves, and what `--check` needs to judge it as its parity gate did."""
    parity = entry.get("parity", {})
    return {k: entry.get(k) for k in ("format", "precision", "path", "sha256", "bytes", "size_rule")} | {
        "weights_sha256": (entry.get("weights") or {}).get("sha256"),  # an OpenVINO IR's .bin
        "parity_shapes": [case["shape"] for case in parity.get("cases", [])], "limits": parity.get("limits"),
        "verified_on": parity.get("device"), "real_images": entry.get("real_images"),
        "envelope": (entry.get("envelope") or {}).get("declared")}  # what `triton --check` may send


def native_plan(entry: dict, manifest: dict, workdir: Path, name: str, max_batch: int, instances: int) -> ModelPlan:
    fmt, kind = entry["format"], NATIVE[entry["format"]]
    plain = entry["precision"] == "fp32" and fmt != "tensorrt"  # an engine's precision is always worth saying
    model_name = f"{name}_{fmt}" + ("" if plain else f"_{entry['precision']}")
    names = (["INPUT__0"], ["OUTPUT__0"]) if fmt == "torchscript" else (None, None)  # libtorch's naming convention
    config_dims = manifest["model"]["config"]
    batched, inputs = _specs(entry["inputs"], config_dims, names[0])
    _, outputs = _specs(entry["outputs"], config_dims, names[1])
    max_batch = proven_batch(entry, max_batch)
    notes, limit = [], None
    if fmt == "tensorrt":
        inputs, limit, max_batch, notes = _engine_limits(entry, inputs, max_batch)
    config = configs.new_config(model_name, kind, max_batch if batched else 0, inputs, outputs)
    configs.add_serving(config, kind, instances, batching=batched)
    if fmt == "tensorrt" and len(profiles := entry_profiles(entry)) > 1:
        # Without the list Triton runs every instance on profile 0 alone; with it, it picks per request.
        config.instance_group[0].profile.extend(str(i) for i in range(len(profiles)))
    files = {f"{VERSION}/{kind.filename}": checked_path(workdir, entry)}
    if fmt == "tensorrt":
        files = _engine_file(config, entry, files)
    if fmt == "openvino":  # IR is two files: the graph (.xml, the verified entry) and its weights
        files[f"{VERSION}/model.bin"] = _ir_weights(workdir, entry)
    record = {"kind": fmt, "artifact": _artifact_record(entry), "graph": _graph_names(entry), "batch_limit": limit,
              "dims": _artifact_dims(entry, config_dims)}  # fmt: skip
    if fmt == "tensorrt":  # the engine's real input shape is its profile's, not the ONNX model's
        record["dims"]["inputs"] = [[-1, *inputs[0]["dims"]]]
    return ModelPlan(model_name, fmt, config, files, record, notes)


def _artifact_dims(entry: dict, model_config: dict) -> dict:
    return {side: [tensor_dims(t["shape"], model_config) for t in entry[side]] for side in ("inputs", "outputs")}


def _engine_limits(entry: dict, inputs: list[dict], max_batch: int) -> tuple[list[dict], int, int, list[str]]:
    """An engine takes only its optimisation profiles: max_batch_size at most the largest max
    batch among them, H and W fixed where every profile fixes them to the same size. Triton's
    config has no per-profile shapes: a request no profile holds fails there (the notes say so)."""
    profiles = entry_profiles(entry)
    low = [min(p.min[i] for p in profiles) for i in range(4)]
    high = [max(p.max[i] for p in profiles) for i in range(4)]
    dims = [high[i] if low[i] == high[i] else -1 for i in range(1, len(high))]
    notes = []
    if max_batch > high[0]:
        notes.append(f"max_batch_size {high[0]} (the engine profile's max batch; --max-batch {max_batch} asked)")
        max_batch = high[0]
    if low[0] > 1:
        notes.append(f"the engine profile needs batches >= {low[0]}: smaller requests fail")
    if len(profiles) > 1:
        boxes = " or ".join(f"{dims_text(p.min)}..{dims_text(p.max)}" for p in profiles)
        notes.append(f"{len(profiles)} optimisation profiles ({boxes}), all offered to each instance: "
                     "a batch and size no single profile holds fails")  # fmt: skip
    notes.append(f"built for {entry.get('gpu')} (compute capability {entry.get('compute_capability')}), "
                 f"TensorRT {entry.get('tensorrt_version')}; another GPU needs its own engine")  # fmt: skip
    return [inputs[0] | {"dims": dims}], high[0], max_batch, notes


def dims_text(shape) -> str:
    return "x".join(map(str, shape))


def _engine_file(config, entry: dict, files: dict) -> dict:
    """Name the plan after its compute capability and map only that one: on another GPU the
    model fails to load (no file), instead of failing to deserialise an engine it cannot run."""
    cc = str(entry.get("compute_capability") or "")
    if not re.fullmatch(r"\d+\.\d+", cc):
        return files
    filename = f"model.sm{cc.replace('.', '')}.plan"
    config.cc_model_filenames[cc] = filename
    return {f"{VERSION}/{filename}": next(iter(files.values()))}


def _ir_weights(workdir: Path, entry: dict) -> Path:
    """The IR's .bin, checked against the sha256 the manifest records for it."""
    return ir_weights(checked_path(workdir, entry), entry)


def _graph_names(entry: dict) -> dict:
    return {"inputs": [t["name"] for t in entry["inputs"]], "outputs": [t["name"] for t in entry["outputs"]]}


def python_plan(choice: RuntimeChoice, manifest: dict, workdir: Path, name: str, max_batch: int,
                instances: int) -> ModelPlan:  # fmt: skip
    entry = choice.entry
    max_batch = proven_batch(entry, max_batch)
    batched, inputs = _specs(entry["inputs"], manifest["model"]["config"])
    _, outputs = _specs(entry["outputs"], manifest["model"]["config"])
    config = configs.new_config(f"{name}_python", PYTHON, max_batch if batched else 0, inputs, outputs)
    configs.add_serving(config, PYTHON, instances, batching=batched)
    artifact = "model.xml" if entry["format"] == "openvino" else "model.onnx"
    hint = HINTS[entry["precision"]]  # the hint the artefact was verified with
    # threads 0: the serving machine's cores shared by the instances (triton_model.py decides there)
    rule = {k: v for k, v in entry["size_rule"].items() if k != "static"}  # refused sizes get a 400 naming it
    configs.set_parameter(config, "unet_export", {"role": "model", "runtime": choice.runtime, "artifact": artifact,
                          "input": inputs[0]["name"], "output": outputs[0]["name"], "threads": 0,
                          "precision_hint": hint, "size_rule": rule, "envelope": _served_envelope(entry)})  # fmt: skip
    files = {f"{VERSION}/model.py": MODEL_SOURCE.read_text(), f"{VERSION}/{artifact}": checked_path(workdir, entry)}
    if entry["format"] == "openvino":
        files[f"{VERSION}/model.bin"] = _ir_weights(workdir, entry)
    record = {"kind": "python", "artifact": _artifact_record(entry), "graph": _graph_names(entry),
              "dims": _artifact_dims(entry, manifest["model"]["config"]), "runtime": choice.runtime,
              "timings_ms": choice.timings_ms}  # fmt: skip
    notes = [f"runs {entry['path']} with {choice.runtime}, the serving machine's cores shared by the instances"]
    return ModelPlan(f"{name}_python", "python", config, files, record, notes)


def _served_envelope(entry: dict) -> dict | None:
    """The proven sizes the Python model answers (triton_model.envelope_problem): a request of
    another size gets a 400 naming them. None: no envelope recorded, the size rule alone."""
    env = of_entry(entry)
    return env and {"boxes": [box.to_dict() for box in env.boxes], "describe": env.describe()}


def write_model(repo: Path, plan: ModelPlan) -> None:
    """The model's folder: its files (an artefact copy must hash to the verified sha256) and config."""
    folder = repo / plan.name
    hashes = {}
    for relative, source in plan.files.items():
        target = folder / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(source, Path):
            shutil.copyfile(source, target)
        else:
            target.write_text(source)
        hashes[relative] = sha256_file(target)
    artifact = plan.record.get("artifact")
    copied = [h for r, h in hashes.items() if not r.endswith((".py", ".bin"))]
    weights = hashes.get(f"{VERSION}/model.bin")
    if artifact and (artifact["sha256"] not in copied or artifact["weights_sha256"] not in (None, weights)):
        raise UserError(f"{artifact['path']} changed while it was copied into {plan.name}; run the command again")
    plan.record["files"] = hashes
    header = [f"{plan.name}: written by unet-export {tool_versions('unet-export')['unet-export']}"]
    if artifact:
        header.append(f"serves {artifact['path']} ({artifact['format']} {artifact['precision']}, sha256 "
                      f"{artifact['sha256']}), which passed its parity gate against eager on {artifact['verified_on']}")  # fmt: skip
    (folder / configs.CONFIG_NAME).write_text(configs.to_text(plan.config, header + plan.notes))


def _repository_record(workdir: Path, manifest: dict, plans: list[ModelPlan], skipped: list[str], runtime) -> dict:
    return {"schema": 1, "created": utc_now(), "workdir": str(workdir.resolve()), "model": manifest["model"],
            "models": {p.name: p.record | {"notes": p.notes} for p in plans}, "skipped": skipped,
            "python_runtime": runtime and {"runtime": runtime.runtime, "artifact": runtime.entry["path"],
                                           "timings_ms": runtime.timings_ms, "shape": list(runtime.shape)}}  # fmt: skip


def _bytes_needed(plans: list[ModelPlan]) -> int:
    sources = [s for p in plans for s in p.files.values() if isinstance(s, Path)]
    return sum(s.stat().st_size for s in sources if s.is_file()) + (1 << 20)


class _staged_repository:
    """A temp folder beside ``repo``, renamed over it when the block succeeds; removed otherwise
    (with any parent folder this created). Temp folders of dead processes are swept first."""

    def __init__(self, repo: Path, need_bytes: int):
        self.repo, self.need = repo, need_bytes
        self.staged = repo.with_name(f".{repo.name}.{os.getpid()}.tmp")
        self.created = [p for p in [repo.parent, *repo.parent.parents] if not p.exists()]

    def __enter__(self) -> Path:
        self.repo.parent.mkdir(parents=True, exist_ok=True)
        _sweep(self.repo)
        ensure_free_space(self.repo.parent, self.need, f"the Triton repository {self.repo}")
        self.staged.mkdir()
        return self.staged

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is None:
            old = self.repo.with_name(f".{self.repo.name}.{os.getpid()}.old")
            if self.repo.exists():
                os.replace(self.repo, old)
            os.replace(self.staged, self.repo)
            shutil.rmtree(old, ignore_errors=True)
            return
        shutil.rmtree(self.staged, ignore_errors=True)
        for folder in self.created:  # innermost first
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()


def _sweep(repo: Path) -> None:
    pattern = re.compile(rf"^\.{re.escape(repo.name)}\.(\d+)\.(tmp|old)$")
    for path in repo.parent.iterdir():
        match = pattern.match(path.name)
        if match and path.is_dir() and not pid_alive(int(match.group(1))):
            shutil.rmtree(path, ignore_errors=True)
