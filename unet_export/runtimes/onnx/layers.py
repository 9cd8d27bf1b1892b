"""Which ONNX nodes a ``--fp32-layers`` pattern selects. Shared by the FP16 ONNX conversion (a
node block list) and the TensorRT <= 10 builder (layers named after ONNX nodes)."""

import ast
from fnmatch import fnmatchcase

SCOPES_KEY = "pkg.torch.onnx.name_scopes"  # torch.onnx's dynamo exporter records the module path here


def module_path(node) -> str:
    """The PyTorch module a node came from, e.g. ``up1.conv.double_conv.0`` ('' if unknown)."""
    for prop in node.metadata_props:
        if prop.key == SCOPES_KEY:
            try:
                scopes = ast.literal_eval(prop.value)
            except (ValueError, SyntaxError):
                return ""
            return scopes[-2] if len(scopes) >= 2 else ""
    return ""


def select_nodes(graph, patterns: list[str]) -> list[str]:
    """Names of nodes whose name, op type or module path matches any glob pattern."""
    chosen = []
    for node in graph.node:
        keys = (node.name, node.op_type, module_path(node))
        if any(fnmatchcase(key, pattern) for pattern in patterns for key in keys if key):
            chosen.append(node.name)
    return chosen


def describe_nodes(graph, limit: int = 4) -> str:
    """A few example names to show in an error, so a user can write a pattern that matches."""
    seen = [f"{n.name} ({n.op_type}, {module_path(n) or '-'})" for n in graph.node if n.op_type in ("Conv", "ConvTranspose", "Resize", "Pad")]
    return ", ".join(seen[:limit])


CONVS = ("Conv", "ConvTranspose")  # the layers reduced precision quantises or rounds


def label(node) -> str:
    """A layer named both ways, ``up4.up (node_convolution_3)``: the PyTorch module, then the node."""
    path = module_path(node)
    return f"{path} ({node.name})" if path else node.name


def flag_name(graph, node) -> str:
    """The name ``--fp32-layers`` should use to select exactly ``node``: its module path when that
    matches this node alone (what the user wrote), else the ONNX node name."""
    path = module_path(node)
    return path if path and select_nodes(graph, [path]) == [node.name] else node.name


PASS_THROUGH = ("Relu", "LeakyRelu", "Clip", "BatchNormalization", "Identity", "MaxPool")


def input_chain(node, writer: dict) -> tuple[list[str], str | None]:
    """The pass-through nodes (activations, pooling) between ``node`` and the convolution that
    writes its input, and that convolution's name (None if its input comes from elsewhere).
    ``writer``: tensor name -> the node that outputs it."""
    between, source = [], writer.get(node.input[0])
    while source is not None and source.op_type in PASS_THROUGH:
        between.append(source.name)
        source = writer.get(source.input[0])
    return between, source.name if source is not None and source.op_type in CONVS else None


def with_input_chains(graph, nodes: list[str]) -> list[str]:
    """``nodes`` plus, for each, the pass-through nodes that feed it from a convolution also in
    ``nodes``: an FP16 model keeps the tensor between two FP32 convolutions FP32 only if the ReLU
    between them stays FP32 too."""
    writer = {out: n for n in graph.node for out in n.output}
    by_name = {n.name: n for n in graph.node}
    out = list(nodes)
    for name in nodes:
        between, source = input_chain(by_name[name], writer)
        if source in nodes:
            out += [n for n in between if n not in out]
    return out
