"""Words for what the tool prints (the terminal, the HTML report, JUnit and the job summary alike)."""


def counted(n: int, noun: str, plural: str | None = None) -> str:
    """``1 image``, ``3 images``: "wrote 1 images" read as a typo in every one-file run."""
    return f"{n} {noun if n == 1 else plural or noun + 's'}"


def gate_rule(limits: dict | None, name: str) -> str:
    """The rule a parity report was judged by, in words."""
    if limits and (limits.get("rtol") is not None or limits.get("atol") is not None):
        return (f"{name} tolerance: max |err vs float64| <= {limits.get('rtol') or 0:g} x noise floor + "
                f"{limits.get('atol') or 0:g} x max(1, |logit|), no class change outside float64 ties")  # fmt: skip
    if limits:
        dice = f", Dice >= {limits['min_dice']:g}" if limits.get("min_dice") is not None else ""
        return f"{name} tolerance: class change vs float64 <= {limits['max_class_change']:.2%} (ties excluded){dice}"
    return f"{name} tolerance"


def x_floor(ratio) -> str:
    """An error in units of the noise floor: 0.79, 1.00, 169, 3.6e+07."""
    if ratio is None:
        return "-"
    return f"{ratio:.2f}" if ratio < 100 else f"{ratio:.0f}" if ratio < 1e5 else f"{ratio:.1e}"
