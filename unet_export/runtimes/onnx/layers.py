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
