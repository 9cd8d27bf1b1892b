"""A one-class model whose output is a sigmoid probability (the registered reflect-sigmoid) is
decided at 0.5, not at logit 0: predict, evaluate and the parity gate (issue 27, item 4)."""

import numpy as np
import pytest
import torch
from PIL import Image

from unet_export.data.dataset import image_to_tensor, Preprocess
from unet_export.flows.evaluate import evaluate
from unet_export.flows.export import export_artifact
from unet_export.models import create_model
from unet_export.predict import load_predictor, predict_classes

SIZE = 64


def probabilities_on_both_sides(image: Image.Image) -> torch.nn.Module:
    """A one-class reflect-sigmoid whose output on ``image`` is spread around 0.5, about half of
    the pixels on each side (a random one gives 0.50-0.51 everywhere: every pixel above 0.5)."""
    torch.manual_seed(0)
    model = create_model("reflect-sigmoid", n_classes=1, width=4)
    x = image_to_tensor(image, Preprocess())[None]
    with torch.no_grad():
        model.out.weight *= 200
        model.out.bias.zero_()
        model.sigmoid = False
        model.out.bias -= model(x).median()  # logit 0, probability 0.5, at the median pixel
        model.sigmoid = True
    return model


@pytest.fixture
def case(tmp_path):
    """(weights, image path, the mask the model's probabilities > 0.5 give, the model)."""
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))
    image.save(tmp_path / "image.png")
    model = probabilities_on_both_sides(image)
    weights = tmp_path / "sigmoid.pth"
    torch.save(model.state_dict(), weights)
    with torch.no_grad():
        probs = model(image_to_tensor(image, Preprocess())[None])
    assert 0 < probs.min() < 0.5 < probs.max() < 1  # outputs on both sides of 0.5, none at a tie
    expected = (probs[0, 0] > 0.5).long().numpy()
    assert 0.3 < expected.mean() < 0.7
    return weights, tmp_path / "image.png", expected, model


def test_predict_decides_a_sigmoid_output_at_one_half(case):
    weights, image, expected, _ = case
    predictor = load_predictor(weights, "cpu", "reflect-sigmoid")
    with predictor.runner:
        classes, _ = predict_classes(predictor, image)
    assert np.array_equal(classes, expected)


def test_the_predict_command_writes_the_mask_decided_at_one_half(case, tmp_path):
    """The streaming path (batches through predict.stages), as a user runs it."""
    from typer.testing import CliRunner

    from unet_export.cli.main import app

    weights, image, expected, _ = case
    args = ["predict", weights, image, "--out", tmp_path / "out", "--model", "reflect-sigmoid", "--device", "cpu"]
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    assert np.array_equal(np.asarray(Image.open(tmp_path / "out" / "image_mask.png")), expected)


def test_evaluate_scores_the_mask_decided_at_one_half(case, tmp_path):
    weights, image, expected, _ = case
    data = tmp_path / "data"
    (data / "imgs").mkdir(parents=True)
    (data / "masks").mkdir()
    Image.open(image).save(data / "imgs" / "a.png")
    Image.fromarray(expected.astype(np.uint8)).save(data / "masks" / "a_mask.png")
    report = evaluate(weights, data, device="cpu", model="reflect-sigmoid")
    assert report["eager"]["dice"] == pytest.approx(1.0)


def test_the_gate_counts_class_changes_at_one_half(case, tmp_path, monkeypatch):
    """An artefact of other weights: the pixels whose probability crosses 0.5 change class, in
    the export's gate, in verify's and in the benchmark's."""
    from unet_export.bench.run import benchmark
    from unet_export.flows.verify import verify_workdir
    from unet_export.runtimes.formats import FORMATS

    weights, image, _, model = case
    other = probabilities_on_both_sides(Image.open(image))
    with torch.no_grad():
        other.out.bias += 0.2  # the pixels near 0.5 cross it; every output stays above 0
    real = FORMATS["torchscript"]
    monkeypatch.setitem(FORMATS, "torchscript",
                        real.__class__(lambda net, *a, **kw: real.write(other, *a, **kw), real.suffix))  # fmt: skip
    result = export_artifact(weights, "torchscript", tmp_path / "exports", model="reflect-sigmoid", device="cpu",
                             height=SIZE, width=SIZE)  # fmt: skip
    first = result.parity.cases[0]
    x = torch.rand(*first.shape, generator=torch.Generator().manual_seed(0))  # the gate's first seeded input
    with torch.no_grad():
        changed = int(((model(x) > 0.5) != (other(x) > 0.5)).sum())
    assert changed > 0.01 * x[:, 0].numel()
    assert first.differing_pixels == changed
    (verdict,) = verify_workdir(tmp_path / "exports", device="cpu").verdicts
    assert verdict.parity.cases[0].shape == first.shape and verdict.parity.cases[0].differing_pixels == changed
    rows = benchmark(tmp_path / "exports", batch=1, height=SIZE, width=SIZE, backends=["eager", "torchscript"],
                     device="cpu", iters=1, warmup=0).rows  # fmt: skip
    changes = rows[1].parity["argmax_disagreement"] + rows[1].parity["tie_pixels"] / x[:, 0].numel()
    assert changes == pytest.approx(changed / x[:, 0].numel())  # the same seeded batch as the gate's first
