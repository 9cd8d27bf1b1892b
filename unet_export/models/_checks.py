"""Input checks shared by the models: Python-only, skipped while tracing or compiling so they never
end up in an exported graph (models call them under ``if not torch.jit.is_scripting()``)."""

import torch


def _exporting() -> bool:
    return torch.jit.is_tracing() or torch.compiler.is_compiling()


def check_input(x: torch.Tensor, n_channels: int, min_size: int = 1, multiple: int = 1, offset: int = 0) -> None:
    """Raise ValueError naming the fix when x is not an (N, n_channels, H, W) batch."""
    if _exporting():
        return
    if x.dim() != 4:
        raise ValueError(
            f"expected a 4-D batch (N, {n_channels}, H, W), got shape {tuple(x.shape)}; "
            "add the batch dimension with x.unsqueeze(0)"
        )
    if x.shape[1] != n_channels:
        raise ValueError(
            f"expected {n_channels} input channel(s), got {x.shape[1]} (shape {tuple(x.shape)})"
        )
    if min(x.shape[2], x.shape[3]) < min_size:
        raise ValueError(f"input {x.shape[2]}x{x.shape[3]} is too small: H and W must be >= {min_size}")
    if (x.shape[2] - offset) % multiple or (x.shape[3] - offset) % multiple:
        form = f"{offset} + {multiple}k" if offset else f"multiples of {multiple}"
        raise ValueError(f"input {x.shape[2]}x{x.shape[3]}: H and W must be {form}; resize or pad the image")
