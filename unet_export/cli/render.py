"""Rich rendering the command families share (each draws its own in cli/render_<family>.py):
columns never cut, tables that fit the log, cell formats, the gate rule in words and the parity
table; no logic beyond formatting."""

from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

from unet_export.api import ExportResult
from unet_export.parity.gate import GATE_IMAGES, ParityReport
from unet_export.text import gate_rule, x_floor  # noqa: F401 (render_* import them from here)


def whole_column(table: Table, header: str, cells, **kwargs) -> None:
    """A column whose cells are never cut or wrapped (CI logs are 160 columns wide and `parity_failed`
    read `parity…`): at least as wide as its longest cell and longest header word; only headers wrap."""
    widest = max((Text.from_markup(str(c)).cell_len for c in cells), default=0)
    width = max(widest, *map(len, header.split()))
    # A fixed width: Rich squeezes even no_wrap columns below their min_width when the table is too wide
    # (FittedTable keeps it from being too wide); the header alone wraps between its words.
    words = Text(header, no_wrap=False, overflow="fold")
    table.add_column(words, no_wrap=True, min_width=width, width=width, **kwargs)


class FittedTable:
    """A table built for the width it is printed at: when even its narrowest layout would cut words,
    optional columns are left out (in the order given) until it fits, and the caption says which."""

    def __init__(self, build, optional: tuple[str, ...]):
        self.build, self.optional = build, optional

    def __rich_console__(self, console, options):
        dropped: list[str] = []
        table = self.build(dropped)
        for column in self.optional:
            # measured unbounded: Measurement.get clamps the minimum to the width it is given
            if Measurement.get(console, options.update_width(10_000), table).minimum <= options.max_width:
                break
            dropped.append(column)
            table = self.build(dropped)
        if dropped:
            note = f"left out at {options.max_width} columns: {', '.join(dropped)} (a wider terminal or --markdown shows them)"
            table.caption = f"{table.caption}\n{note}" if table.caption else note
        yield table


def dims(shape) -> str:
    return "x".join(map(str, shape))


def cell(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _sci(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}e}"


def parity_table(result: ExportResult | ParityReport) -> Table:
    """One row per input: the artefact's error against float64 next to eager fp32's own (the
    noise floor), their ratio, the bound in force, and the decisions."""
    parity = result.parity if isinstance(result, ExportResult) else result
    table = Table(title=f"Parity: {parity.runner}, {gate_rule(parity.limits, parity.tolerance)}", title_justify="left")
    # The input column never shrinks (at 80 columns it was cut to "2x3x2…"): the headers wrap instead.
    widest = max((len(_input_label(case)) for case in parity.cases), default=5)
    table.add_column("input", justify="left", no_wrap=True, min_width=widest)
    for column in ("err vs f64", "noise floor", "x floor", "allowed", "vs eager fp32", "class diff", "Dice", "result"):
        table.add_column(column, justify="right")
    for case in parity.cases:
        differing = f"{case.argmax_disagreement:.4%}"
        if case.tie_pixels:
            differing += f" (+{case.tie_pixels} ties)"
        ratio = case.floor_ratio
        table.add_row(
            _input_label(case), _sci(case.max_err_fp64), _sci(case.noise_floor),
            x_floor(ratio), _sci(case.atol, 1), _sci(case.max_abs_err), differing,
            f"{case.dice_vs_eager:.6f}", "[green]pass[/]" if case.passed else "[red]FAIL[/]",
        )  # fmt: skip
    return table


def _input_label(case) -> str:
    label = f" {case.label}" if getattr(case, "label", "") and case.label != "seeded" else ""
    probe = getattr(case, "probe", "")
    probe = f" {probe}" if probe and not (probe == GATE_IMAGES and label) else ""
    return "x".join(map(str, case.shape)) + label + probe
