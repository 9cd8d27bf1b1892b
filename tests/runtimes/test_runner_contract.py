"""One contract, every runtime (as segmentation_models_pytorch runs one base test over every
architecture): each benchmark row that can run here is built the way the benchmark builds it
(bench.backends.BACKENDS) and must keep the Runner promises that the gate, the benchmark, predict
and serving rely on (runtimes/base.py). A row that cannot run here (no CUDA, no artefact) is
skipped with its reason, so a machine with a GPU runs the TensorRT and CUDA rows too. The INT8 rows
run the same contract (assert_keeps_the_runner_contract) in tests/flows/test_int8.py, on the demo
model's `unet-export int8` run, the only INT8 artefacts the suite makes: there they share that
run (and its pytest-xdist worker) with the other INT8 tests instead of quantizing a second time."""

import pytest
import torch

from unet_export.bench.backends import BACKENDS, BackendContext, Unavailable
from unet_export.checkpoint import build_model, load_checkpoint
from unet_export.runtimes import EagerRunner, Runner
from unet_export.workdir.manifest import load_manifest

SIZE = 64
REDUCED = {"eager-bf16", "eager-fp16", "openvino-bf16", "openvino-int8", "onnxruntime-int8", "tensorrt-fp16",
           "onnxruntime-cuda-fp16"}  # fmt: skip
INT8 = {"openvino-int8", "onnxruntime-int8"}
SLOW = {"aoti": "compiling the AOTInductor package takes about a minute here",
        "torch.compile": "compiling takes tens of seconds here"}  # fmt: skip


@pytest.fixture(scope="module")
def context(exports, tmp_path_factory):
    """The session's small model, exported to ONNX, TorchScript and an OpenVINO IR (AOTInductor only
    when asked for), in a copy this module may add to."""
    weights = exports.checkpoint("unet_v3.pth")
    root = tmp_path_factory.mktemp("contract")
    exports.copy(root / "exports", weights, ("onnx", "torchscript", "openvino"), SIZE, SIZE)
    return root, weights, build_model(load_checkpoint(weights))


def _ctx(context, name) -> BackendContext:
    root, weights, model = context
    if name == "aoti":
        from unet_export.api import export_artifact

        assert export_artifact(weights, "aoti", root / "exports", device="cpu", height=SIZE, width=SIZE).passed
    workdir = root / "exports"
    return BackendContext(model, workdir, load_manifest(workdir), torch.device("cpu"), (2, 3, SIZE, SIZE))


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n
                                  for n in BACKENDS if n not in INT8])  # fmt: skip
def test_every_runner_keeps_the_runner_contract(context, name):
    assert_keeps_the_runner_contract(name, _ctx(context, name), context[2], SIZE)


def test_every_int8_row_is_left_to_the_int8_tests():
    """test_int8.py runs the contract over INT8: a new INT8 row in the benchmark must join it,
    or no test would build it."""
    assert INT8 == {n for n in BACKENDS if "int8" in n}


def assert_keeps_the_runner_contract(name: str, ctx: BackendContext, model: torch.nn.Module, size: int) -> None:
    """The Runner promises, for benchmark row ``name`` built from ``ctx``; ``model`` is the eager
    model the artefact was exported from, ``size`` the square input size it takes."""
    try:
        runner = BACKENDS[name](ctx)
    except Unavailable as exc:
        pytest.skip(f"{name}: {exc}")
    assert isinstance(runner, Runner) and not runner.is_active  # construction loads nothing
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with pytest.raises(RuntimeError, match="activate"):
        runner.infer(x)
    with runner as active:
        assert active is runner and runner.is_active
        assert runner.activate() is runner  # activating twice loads once
        out = runner.infer(x)
        runner.synchronize()
        assert out.dtype == torch.float32 and out.device == runner.device
        assert tuple(out.shape) == (2, model.n_classes, size, size)  # float32 logits, NCHW, a channel per class
        assert torch.isfinite(out).all()
        single = runner.infer(x[:1])  # the batch axis is dynamic
        assert tuple(single.shape) == (1, model.n_classes, size, size)
        assert isinstance(runner.describe(), str) and runner.describe()
    assert not runner.is_active
    runner.deactivate()  # deactivating twice is harmless
    if name not in REDUCED:  # FP32 matches eager on this seeded input; reduced precision is judged on real images only
        with EagerRunner(model) as eager:
            expected = eager.infer(x)
        torch.testing.assert_close(out, expected, rtol=1e-3, atol=1e-3)
