"""A Triton Python-backend model written by `unet-export triton` (copied as <model>/1/model.py).

Standalone on purpose: it needs numpy, onnxruntime or openvino (role "model") and Pillow (role
"preprocess", only when the training preprocessing resizes), never unet_export, so the repository
runs in Triton's own container too: hence one file, longer than the ~300 lines of the rest. The
role and its settings are the config's parameter "unet_export" (JSON), written from the
workdir's manifest:

- model: float32 NCHW batch -> logits, running the verified ONNX/OpenVINO artefact in this folder;
  requests of one shape that dynamic batching delivered together run as one batch.
- preprocess: uint8 (N, H, W, C) images -> the model's input exactly as training prepared it
  (unet_export.data.dataset: bicubic resize or pad-to-square, /255 when any value is above 1, the
  channels reversed if "bgr", (x - mean) / std if "mean"), then mirror-padded to a size the model
  takes and at least the setting "smallest" [height, width] its envelope was proven from
  (unet_export.predict.fit_and_run), plus each image's sizes.
- postprocess: logits -> cropped back, resized to the image (bilinear, as predict does), argmax
  (output > the setting "threshold" for one class: 0 for a logit, 0.5 for a sigmoid output; 0
  in repositories written before it was recorded), milesial's mask_values.

Tensors cross the stub by DLPack. With numpy 2, the 2.51 stub's ``as_numpy()`` returned the first
element repeated and ``Tensor(name, ndarray)`` built tensors Triton rejected ("output tensor shape
does not match size"); ``np.from_dlpack`` / ``Tensor.from_dlpack`` are exact (measured). Outputs go
through ``to_triton`` (see there: the stub misnames the capsules it consumes).
"""

from __future__ import annotations  # Triton containers may run an older Python

import ctypes
import json
import os

import numpy as np


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        settings = json.loads(config["parameters"]["unet_export"]["string_value"])
        settings["instances"] = sum(int(g.get("count", 1)) for g in config.get("instance_group", [])) or 1
        folder = os.path.join(args["model_repository"], args["model_version"])
        self.step = ROLES[settings["role"]](settings, folder)

    def execute(self, requests):
        import triton_python_backend_utils as pb_utils

        return self.step.execute(requests, pb_utils)

    def finalize(self):
        self.step = None


class Model:
    def __init__(self, settings: dict, folder: str):
        self.input, self.output = settings["input"], settings["output"]
        self.size_rule = settings.get("size_rule")  # absent in repositories written before it was recorded
        self.envelope = settings.get("envelope")  # the sizes it was proven at; absent before issue 28
        path = os.path.join(folder, settings["artifact"])
        threads = int(settings.get("threads") or 0) or max(1, usable_cores() // settings.get("instances", 1))
        if settings["runtime"] == "onnxruntime":
            self.run = onnxruntime_session(path, threads)
        else:
            pinned = settings.get("instances", 1) == 1
            self.run = OpenVinoModel(path, settings.get("precision_hint", "f32"), threads, pinned)

    def execute(self, requests, pb):
        xs = [np.from_dlpack(pb.get_input_tensor_by_name(r, self.input)) for r in requests]
        responses = [self.refusal(x, pb) for x in xs]
        for indices in group_by_shape(xs):
            indices = [i for i in indices if responses[i] is None]
            if not indices:
                continue
            try:
                batch = np.ascontiguousarray(np.concatenate([xs[i] for i in indices]), dtype=np.float32)
                logits = self.run(batch)
            except Exception as exc:  # a runtime error answers these requests; the server keeps going
                for i in indices:
                    responses[i] = pb.InferenceResponse(error=pb.TritonError(f"{type(exc).__name__}: {exc}"))
                continue
            start = 0
            for i in indices:
                part = np.ascontiguousarray(logits[start : start + xs[i].shape[0]])
                responses[i] = pb.InferenceResponse([to_triton(pb, self.output, part)])
                start += xs[i].shape[0]
        return responses

    def refusal(self, x: np.ndarray, pb):
        """An INVALID_ARG response (HTTP 400) for a size the network cannot take (an empty one
        too), naming the model's size rule; None when it fits. Without it the runtime fails
        deep inside a layer and the client gets a 500."""
        problem = (self.size_rule and size_problem(x.shape[-2], x.shape[-1], self.size_rule)) or \
            (self.envelope and envelope_problem(x.shape[-2], x.shape[-1], self.envelope))
        if not problem:
            return None
        message = f"input {self.input!r} of shape {list(x.shape)}: {problem}"
        return pb.InferenceResponse(error=pb.TritonError(message, pb.TritonError.INVALID_ARG))


# The DLPack protocol: a consumer that takes over a "dltensor" capsule renames it "used_dltensor",
# and the producer's capsule destructor then leaves the tensor alone. The Python backend's stub
# (2.51, and python_backend's pb_tensor.cc to this day) renames it "used_dlpack" instead, so numpy's
# destructor fails to read it as a "dltensor" and prints that error's traceback, once per output
# tensor (the tensor itself is fine: the stub owns it and frees it through its deleter). Naming
# the consumed capsule as the protocol says stops that at its cause. The name must outlive the
# capsule (PyCapsule_SetName keeps the pointer), hence a module constant.
_DLPACK_FRESH, _DLPACK_USED = b"dltensor", ctypes.c_char_p(b"used_dltensor")
_capsule_name = ctypes.pythonapi.PyCapsule_GetName
_capsule_name.argtypes, _capsule_name.restype = [ctypes.py_object], ctypes.c_char_p
_capsule_rename = ctypes.pythonapi.PyCapsule_SetName
_capsule_rename.argtypes, _capsule_rename.restype = [ctypes.py_object, ctypes.c_char_p], ctypes.c_int


def to_triton(pb, name: str, array: np.ndarray):
    """A response tensor from a C-contiguous CPU array, shared with the stub through DLPack."""
    capsule = array.__dlpack__(stream=None)  # the only stream a CPU array takes (array API)
    tensor = pb.Tensor.from_dlpack(name, capsule)
    if _capsule_name(capsule) != _DLPACK_FRESH:  # consumed: mark it as the protocol says
        _capsule_rename(capsule, _DLPACK_USED)
    return tensor


def usable_cores() -> int:
    """The cores this process may run on (a container's CPU set, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def group_by_shape(arrays: list) -> list[list[int]]:
    """Indices of requests whose per-item shapes agree (only those can share one batch)."""
    groups: dict[tuple, list[int]] = {}
    for i, a in enumerate(arrays):
        groups.setdefault(tuple(a.shape[1:]), []).append(i)
    return list(groups.values())


def onnxruntime_session(path: str, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    name, output = session.get_inputs()[0].name, session.get_outputs()[0].name
    return lambda x: session.run([output], {name: x})[0]


class OpenVinoModel:
    """One static compilation per input shape (faster kernels than a dynamic one), at most 8 kept.

    ``pinned`` False for several instances: each instance is a stub process of its own, and with
    OpenVINO's default pinning two instances of one thread each ran 0.56x one instance, each
    execute 3.5x longer, as if both were pinned to the same core (benchmarks/serve.py, a short
    run); unpinned, the kernel spreads them (FP32, batch 8, 4 clients: 1.11x one)."""

    def __init__(self, path: str, precision_hint: str, threads: int, pinned: bool = True):
        import openvino as ov

        self.core, self.model = ov.Core(), ov.Core().read_model(path)
        self.config = {"INFERENCE_PRECISION_HINT": precision_hint, "PERFORMANCE_HINT": "LATENCY",
                       "ENABLE_CPU_PINNING": pinned}  # fmt: skip
        if threads:
            self.config["INFERENCE_NUM_THREADS"] = threads
        self.compiled: dict[tuple, object] = {}

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if x.shape not in self.compiled:
            if len(self.compiled) >= 8:
                self.compiled.pop(next(iter(self.compiled)))
            model = self.model.clone()
            model.reshape({model.input(0).get_any_name(): list(x.shape)})
            self.compiled[x.shape] = self.core.compile_model(model, "CPU", self.config)
        compiled = self.compiled[x.shape]
        return compiled.create_infer_request().infer({0: x})[compiled.output(0)].copy()


class Preprocess:
    def __init__(self, settings: dict, folder: str):
        self.settings = settings

    def execute(self, requests, pb):
        responses = []
        for request in requests:
            images = np.from_dlpack(pb.get_input_tensor_by_name(request, "IMAGE"))
            if 0 in images.shape[1:3]:  # a bad request (HTTP 400), not a failure of the server
                message = f"IMAGE of shape {list(images.shape)}: an empty image (height and width must be at least 1)"
                responses.append(pb.InferenceResponse(error=pb.TritonError(message, pb.TritonError.INVALID_ARG)))
                continue
            try:
                x, sizes = preprocess_batch(images, self.settings)
            except Exception as exc:
                responses.append(pb.InferenceResponse(error=pb.TritonError(f"{type(exc).__name__}: {exc}")))
                continue
            tensors = [to_triton(pb, "INPUT", x), to_triton(pb, "SIZE", sizes)]
            responses.append(pb.InferenceResponse(tensors))
        return responses


def preprocess_batch(images: np.ndarray, settings: dict) -> tuple[np.ndarray, np.ndarray]:
    """(N, H, W, C) uint8 -> (N, C, H', W') float32 model input, (N, 4) int32 [H, W, h, w]: the
    image's size and its size after the training resize (before padding)."""
    inputs, sizes = [], []
    for image in images:
        x = prepare_image(image, settings["preprocess"])
        sizes.append([image.shape[0], image.shape[1], x.shape[1], x.shape[2]])
        inputs.append(pad_to_fit(x, settings["size_rule"], settings.get("smallest")))
    return np.ascontiguousarray(np.stack(inputs)), np.asarray(sizes, dtype=np.int32)


def prepare_image(image: np.ndarray, preprocess: dict) -> np.ndarray:
    """HxWxC -> CxHxW float32, as unet_export.data.dataset.image_to_tensor does it."""
    square, scale = preprocess.get("square"), float(preprocess.get("scale") or 1.0)
    if square or scale != 1.0:
        image = resize_image(image, square, scale)
    arr = image.astype(np.float32)
    if arr.size and arr.max() > 1:  # milesial divides only images holding values above 1
        arr /= 255.0
    return np.ascontiguousarray(normalise(arr, preprocess).transpose(2, 0, 1))


def normalise(hwc: np.ndarray, preprocess: dict) -> np.ndarray:
    """Preprocess.normalise on HxWxC: channels reversed if "bgr", then (x - mean) / std in float32."""
    if preprocess.get("bgr"):
        hwc = hwc[..., ::-1]
    if preprocess.get("mean") is not None:
        mean, std = (np.asarray(preprocess[k], dtype=np.float32) for k in ("mean", "std"))
        if mean.shape != (hwc.shape[-1],):
            raise ValueError(f"preprocess mean/std have {mean.size} values but the image has {hwc.shape[-1]} "
                             "channel(s)")
        hwc = (hwc - mean) / std
    return hwc


def resize_image(image: np.ndarray, square: int | None, scale: float) -> np.ndarray:
    """Preprocess.resize: pad-to-square at (0, 0) on black then square x square, or scale; bicubic."""
    from PIL import Image

    img = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    if square:
        side = max(img.size)
        canvas = Image.new(img.mode, (side, side), 0)
        canvas.paste(img, (0, 0))
        img, size = canvas, (square, square)
    else:
        size = (int(scale * img.size[0]), int(scale * img.size[1]))
    if size != img.size:
        img = img.resize(size, Image.BICUBIC)
    arr = np.asarray(img)
    return arr[..., None] if arr.ndim == 2 else arr


def first_size(rule: dict) -> int:
    """SizeRule.first: the smallest size the model takes."""
    k = -(-(rule["min"] - rule["offset"]) // rule["multiple"])
    return rule["offset"] + rule["multiple"] * max(k, 0)


def at_least(size: int, rule: dict) -> int:
    """SizeRule.at_least: the smallest size >= ``size`` the model takes."""
    return max(first_size(rule), size + (-(size - rule["offset"])) % rule["multiple"])


def size_problem(height: int, width: int, rule: dict) -> str | None:
    """SizeRule.check's message for a size the model does not take, else None."""
    for name, size in (("height", height), ("width", width)):
        if size < rule["min"] or (size - rule["offset"]) % rule["multiple"]:
            below = size - (size - rule["offset"]) % rule["multiple"]  # SizeRule.nearest
            candidates = [below, below + rule["multiple"]] if below != size else [size]
            near = " or ".join(map(str, sorted({max(c, first_size(rule)) for c in candidates})))
            return f"{name} {size} does not fit this model ({describe_rule(rule)}): use {near}"
    return None


def envelope_problem(height: int, width: int, envelope: dict) -> str | None:
    """A size outside every box of the proven envelope (parity.envelope), else None."""
    for box in envelope["boxes"]:
        if box["height"][0] <= height <= box["height"][1] and box["width"][0] <= width <= box["width"][1]:
            return None
    return f"{height}x{width} is outside the proven envelope ({envelope['describe']})"


def describe_rule(rule: dict) -> str:
    """SizeRule.describe."""
    if rule["multiple"] == 1:
        return f"at least {rule['min']}"
    form = f"{rule['offset']} + {rule['multiple']}k" if rule["offset"] else f"a multiple of {rule['multiple']}"
    return f"{form}, at least {first_size(rule)}"


def padding(height: int, width: int, rule: dict, smallest: list | None = None) -> tuple[int, int, int, int]:
    """(top, bottom, left, right), as fit_and_run: half the shrink on the top/left, and up to the
    ``smallest`` proven [height, width] (inference.predictor.padded_size: predict pads a small
    image up to what was proven; the served model refuses anything smaller)."""
    margin = rule["shrink"] // 2
    target_h, target_w = at_least(height + rule["shrink"], rule), at_least(width + rule["shrink"], rule)
    if smallest:
        target_h, target_w = max(target_h, smallest[0]), max(target_w, smallest[1])
    return margin, target_h - height - margin, margin, target_w - width - margin


def pad_to_fit(x: np.ndarray, rule: dict, smallest: list | None = None) -> np.ndarray:
    top, bottom, left, right = padding(x.shape[1], x.shape[2], rule, smallest)
    if not any((top, bottom, left, right)):
        return x
    mode = "reflect" if max(top, bottom, left, right) < min(x.shape[1:]) else "edge"  # reflect needs pad < size
    return np.pad(x, ((0, 0), (top, bottom), (left, right)), mode=mode)


class Postprocess:
    def __init__(self, settings: dict, folder: str):
        self.settings = settings
        values = np.asarray(settings["mask_values"])
        self.values = values.astype(np.uint8 if values.max() <= 255 else np.uint16)

    def execute(self, requests, pb):
        responses = []
        for request in requests:
            logits = np.from_dlpack(pb.get_input_tensor_by_name(request, "LOGITS"))
            sizes = np.from_dlpack(pb.get_input_tensor_by_name(request, "SIZE"))
            try:
                classes = [classes_of(one, size, self.settings) for one, size in zip(logits, sizes)]
                masks = np.stack([self.values[c] for c in classes])
            except Exception as exc:
                responses.append(pb.InferenceResponse(error=pb.TritonError(f"{type(exc).__name__}: {exc}")))
                continue
            responses.append(pb.InferenceResponse([to_triton(pb, "MASK", np.ascontiguousarray(masks))]))
        return responses


def classes_of(logits: np.ndarray, size: np.ndarray, settings: dict) -> np.ndarray:
    """(C, H', W') logits of one padded image -> (H, W) class indices at the image's size."""
    image_h, image_w, height, width = (int(v) for v in size)
    rule = settings["size_rule"]
    top, bottom, left, right = padding(height, width, rule, settings.get("smallest"))
    # the output is centred in the padded input (unpadded convs shrink it), as in fit_and_run
    off_y = max(0, top - (height + top + bottom - logits.shape[-2]) // 2)
    off_x = max(0, left - (width + left + right - logits.shape[-1]) // 2)
    logits = logits[:, off_y : off_y + height, off_x : off_x + width]
    if logits.shape[-2:] != (height, width):
        logits = resize_bilinear(logits, height, width)
    if settings["preprocess"].get("square"):  # undo pad-to-square: the square canvas, then crop
        side = max(image_h, image_w)
        logits = resize_bilinear(logits, side, side)[:, :image_h, :image_w]
    elif logits.shape[-2:] != (image_h, image_w):
        logits = resize_bilinear(logits, image_h, image_w)
    if logits.shape[0] == 1:  # one class: the threshold unet_export.models.mask_threshold gives
        return (logits[0] > settings.get("threshold", 0.0)).astype(np.int64)
    return logits.argmax(0)


def resize_bilinear(x: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """torch.nn.functional.interpolate(mode="bilinear", align_corners=False) of (C, H, W)."""
    y0, y1, wy = _source_pixels(x.shape[1], out_h)
    x0, x1, wx = _source_pixels(x.shape[2], out_w)
    rows = x[:, y0] * (1 - wy)[None, :, None] + x[:, y1] * wy[None, :, None]
    return rows[:, :, x0] * (1 - wx) + rows[:, :, x1] * wx


def _source_pixels(n_in: int, n_out: int):
    src = np.maximum((np.arange(n_out, dtype=np.float32) + 0.5) * np.float32(n_in / n_out) - 0.5, 0)
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    return i0, i1, (src - i0).astype(np.float32)


ROLES = {"model": Model, "preprocess": Preprocess, "postprocess": Postprocess}
