"""The TorchScript writer's fallback: a model torch.jit.script cannot compile is traced at the
export sample's shape and recorded static; one that neither scripts nor traces is refused
naming both failures."""

import warnings

import pytest
import torch
import torch.nn as nn

from unet_export.api import export_artifact
from unet_export.bench.run import benchmark
from unet_export.errors import ArtifactError
from unet_export.runtimes.torchscript.export import export_torchscript, read_metadata
from unet_export.workdir.manifest import load_manifest


class SummedBranches(nn.Module):
    """Traces fine (with a TracerWarning from its size check, as smp's encoders give); scripting
    rejects sum() over a generator expression."""

    def __init__(self):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(3, 2, 3, padding=1) for _ in range(2))

    def forward(self, x):
        if x.shape[-1] % 8 != 0:
            raise ValueError("the width must be a multiple of 8")
        return sum(conv(x) for conv in self.convs)


class SignBranch(nn.Module):
    """Scripting rejects **kwargs; the trace records one branch of a data-dependent if, which its
    check on a second input (taking the other branch) catches."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 1)

    def forward(self, x, **kwargs):
        return self.conv(x) if x.min() < 0 else -self.conv(x)


def test_a_model_that_cannot_be_scripted_is_traced_at_the_sample_shape(tmp_path):
    torch.manual_seed(0)
    model, sample = SummedBranches().eval(), torch.rand(1, 3, 24, 40)
    dest = tmp_path / "m.ts"
    with warnings.catch_warnings():
        warnings.simplefilter("error", torch.jit.TracerWarning)  # expected during a trace: silenced, not raised
        io = export_torchscript(model, dest, sample, {"architecture": "x"})
    assert io["static"] is True and io["dynamic_axes"] == {}
    assert io["traced"].startswith("RuntimeError: ") and "\n" not in io["traced"]
    assert io["inputs"][0]["shape"] == [1, 3, 24, 40]
    loaded = torch.jit.load(str(dest), map_location="cpu")
    x = torch.rand(1, 3, 24, 40)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=1e-6)
    assert read_metadata(dest) == {"architecture": "x"}


def test_a_model_that_neither_scripts_nor_traces_names_both_failures(tmp_path):
    dest = tmp_path / "m.ts"
    with pytest.raises(ArtifactError) as info:
        export_torchscript(SignBranch().eval(), dest, -torch.ones(1, 3, 8, 8), {})
    message = str(info.value)
    assert message.startswith("torch.jit.script failed: NotSupportedError: ")
    assert "; torch.jit.trace at 1x3x8x8 failed too: TracingCheckError: " in message
    assert "\n" not in message and not dest.exists()


def test_traced_outputs_that_differ_from_eager_are_a_trace_failure(tmp_path, monkeypatch):
    """torch.jit.trace's check only warns when the traced outputs differ from the Python model's;
    the writer refuses such a trace rather than hiding the warning with the expected ones."""
    real = torch.jit.trace

    def drifting(model, *args, **kwargs):
        traced = real(model, *args, **kwargs)
        warnings.warn("Output nr 1. of the traced function does not match the corresponding output of the Python "
                      "function. Detailed error: Tensor-likes are not close!", torch.jit.TracerWarning)  # fmt: skip
        return traced

    monkeypatch.setattr(torch.jit, "trace", drifting)
    with pytest.raises(ArtifactError, match="failed too: RuntimeError: Output nr 1. of the traced function"):
        export_torchscript(SummedBranches().eval(), tmp_path / "m.ts", torch.rand(1, 3, 8, 8), {})


def test_a_traced_export_is_recorded_and_gated_static(make_checkpoint, tmp_path, monkeypatch):
    """Through export_artifact: the writer's static flag fixes the entry's size rule and the gate's
    inputs (as --static does), so verify, predict and unet-bench hold it to that shape."""

    def cannot_script(*_, **__):
        raise RuntimeError("Module 'Encoder' has no attribute '_is_torch_scriptable'\n  File ...")

    monkeypatch.setattr(torch.jit, "script", cannot_script)
    result = export_artifact(make_checkpoint("v3"), "torchscript", tmp_path, device="cpu", height=64, width=96)
    assert result.passed
    assert [tuple(c.shape) for c in result.parity.cases] == [(1, 3, 64, 96)]  # no batch-2 second size
    (entry,) = load_manifest(tmp_path)["artifacts"]
    assert entry["size_rule"]["static"] is True and "static" not in entry  # one place says it
    assert entry["traced"] == "RuntimeError: Module 'Encoder' has no attribute '_is_torch_scriptable'"
    assert entry["inputs"][0]["shape"] == [1, 3, 64, 96] and entry["dynamic_axes"] == {}
    row = benchmark(tmp_path, backends=["torchscript"], device="cpu", batch=2, warmup=0, iters=1).rows[-1]
    assert row.status == "unavailable" and "static torchscript artefact takes [1, 3, 64, 96]" in row.reason
