"""Damages that depend on the input's shape: ONNX graphs edited so that their output is wrong only
for some heights or batch sizes, inside the range the artefact declares. A gate that checks two
shapes passes them; the envelope (unet_export.parity.envelope) must fail them and name the shape.

    from benchmarks.damage import damage_when
    damage_when("m.onnx", "m.tall.onnx", axis=2, above=300)  # wrong only when H > 300
    damage_when("m.onnx", "m.batch.onnx", axis=0, above=1)   # wrong only for batch > 1

The edit adds ``delta`` x max(1, |logit| scale) to every logit when the input's dimension ``axis``
exceeds ``above``: Shape -> Gather -> Greater -> Cast -> Mul -> Add, after the model's own output.
``delta`` defaults to 1e-4, the old fixed tolerance (FALLBACK_REL_ATOL), which a correct FP32
artefact never comes near on these models (its error is ~1e-6) and a damaged one reaches.
"""

from pathlib import Path

import onnx
from onnx import TensorProto, helper


def damage_when(src: str | Path, dest: str | Path, *, axis: int, above: int, delta: float = 1e-4) -> Path:
    """Write ``src`` to ``dest`` with its first output shifted by ``delta`` wherever the input's
    dimension ``axis`` (0 batch, 2 height, 3 width) is larger than ``above``."""
    model = onnx.load(str(src))
    graph = model.graph
    source, output = graph.input[0].name, graph.output[0].name
    raw = f"{output}_before_damage"
    for node in graph.node:  # the model's own output now feeds the damage
        node.output[:] = [raw if name == output else name for name in node.output]
    consts = [helper.make_tensor("damage_axis", TensorProto.INT64, [], [axis]),
              helper.make_tensor("damage_above", TensorProto.INT64, [], [above]),
              helper.make_tensor("damage_delta", TensorProto.FLOAT, [], [delta])]  # fmt: skip
    graph.initializer.extend(consts)
    graph.node.extend([
        helper.make_node("Shape", [source], ["damage_shape"]),
        helper.make_node("Gather", ["damage_shape", "damage_axis"], ["damage_dim"], axis=0),
        helper.make_node("Greater", ["damage_dim", "damage_above"], ["damage_on"]),
        helper.make_node("Cast", ["damage_on"], ["damage_onf"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["damage_onf", "damage_delta"], ["damage_shift"]),
        helper.make_node("Add", [raw, "damage_shift"], [output]),
    ])  # fmt: skip
    onnx.checker.check_model(model)
    onnx.save(model, str(dest))
    return Path(dest)
