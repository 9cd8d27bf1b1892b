"""The envelope: every input shape an artefact declares it takes, and the few shapes that prove it.

An artefact declares a range: a batch range and, per side, the sizes its model's size rule
accepts between a smallest and a largest (one box; a TensorRT engine has one per optimisation
profile). Two shapes inside it prove little: engines that are right at the optimisation shape and
wrong at another width, models that match at batch 1 and differ at batch 2, are what users of
these tools report. So the gate checks the box at its corners and edges (``probes``): the
export size, the largest, tall and wide corners, a non-square size off the usual multiples and
the largest batch at the smallest corner (every batch of more than one image is also run image by
image: its output must equal each image alone), and it makes sure a shape just outside is refused
(``refusals``), naming the nearest accepted sizes, instead of running unproven. ``predict``,
``triton`` and ``unet-bench`` refuse a shape outside what was proven the same way
(``Envelope.check``, ``batch_for``).

The big corner runs one image: its float64 reference is what the gate costs
(benchmarks/envelope.py: 1.09x the two-shape gate on the demo).
"""

from dataclasses import dataclass

from unet_export.errors import UserError
from unet_export.models.sizes import SizeRule

DEFAULT_MAX_BATCH = 8  # Triton's default max_batch_size here, and unet-bench's --batch 8
# The sides declared by default: the export size up to one and a half times it. A model is
# trained and exported at a scale; smaller inputs are mostly border, where INT8 calibrated on whole
# images changes classes (the demo's ONNX Runtime INT8: 0.12% of pixels on 64x64 crops of its
# 128x128 images, over the 0.1% gate, 0.008% on the whole images), and predict pads a smaller image
# up to the smallest proven side anyway. The largest corner's float64 reference is what the gate
# costs (benchmarks/envelope.py). --smallest/--largest declare more, and prove it.
DEFAULT_SIZE_RANGE = (1.0, 1.5)


@dataclass(frozen=True)
class Box:
    """Inclusive ranges of batch, height and width (height and width also on the size rule)."""

    batch: tuple[int, int]
    height: tuple[int, int]
    width: tuple[int, int]

    def contains(self, n: int, h: int, w: int) -> bool:
        return all(lo <= v <= hi for (lo, hi), v in ((self.batch, n), (self.height, h), (self.width, w)))

    def describe(self) -> str:
        return f"batch {_span(self.batch)}, height {_span(self.height)}, width {_span(self.width)}"

    def to_dict(self) -> dict:
        return {"batch": list(self.batch), "height": list(self.height), "width": list(self.width)}

    @classmethod
    def from_dict(cls, data: dict) -> "Box":
        return cls(*(tuple(int(v) for v in data[k]) for k in ("batch", "height", "width")))


def _span(pair: tuple[int, int]) -> str:
    return str(pair[0]) if pair[0] == pair[1] else f"{pair[0]}-{pair[1]}"


@dataclass(frozen=True)
class Probe:
    """One shape the envelope is checked at, and what it checks ("largest", "largest batch", ...)."""

    label: str
    shape: tuple[int, int, int, int]


@dataclass(frozen=True)
class Envelope:
    rule: SizeRule
    channels: int
    boxes: tuple[Box, ...]

    def accepts(self, n: int, h: int, w: int) -> bool:
        return self.rule.accepts(h) and self.rule.accepts(w) and any(b.contains(n, h, w) for b in self.boxes)

    def smallest(self) -> tuple[int, int]:
        """The smallest proven height and width: predict, the Triton pipeline and unet-bench pad a
        smaller image up to them."""
        return min(b.height[0] for b in self.boxes), min(b.width[0] for b in self.boxes)

    def largest_batch(self) -> int:
        return max(b.batch[1] for b in self.boxes)

    def describe(self) -> str:
        boxes = " or ".join(b.describe() for b in self.boxes)
        return boxes if self.rule.multiple == 1 else f"{boxes}; sides {self.rule.describe()}"

    def check(self, n: int, h: int, w: int, what: str = "input") -> None:
        """Refuse, in one line naming the envelope and the nearest accepted sizes, a shape it
        does not hold (a UserError: exit 2)."""
        if self.accepts(n, h, w):
            return
        box = min(self.boxes, key=lambda b: _distance(b, n, h, w))
        near = [f"{name} {' or '.join(map(str, sizes))}" for name, value, span in
                (("batch", n, box.batch), ("height", h, box.height), ("width", w, box.width))
                if (sizes := self._nearest(value, span, name == "batch")) != [value]]  # fmt: skip
        raise UserError(f"{what} {n}x{self.channels}x{h}x{w} is outside the proven envelope ({self.describe()}): "
                        f"use {', '.join(near)}")  # fmt: skip

    def _nearest(self, value: int, span: tuple[int, int], batch: bool) -> list[int]:
        lo, hi = span
        if batch:
            return [min(max(value, lo), hi)]
        fits = [s for s in self.rule.nearest(min(max(value, lo), hi)) if lo <= s <= hi]
        return fits or [self.rule.fit(hi)]

    def probes(self, export_size: tuple[int, int]) -> list[Probe]:
        """The shapes that prove the envelope, the export size first (the shape the artefact was
        written at), each once."""
        found: dict[tuple, Probe] = {}
        for box in self.boxes:
            for probe in self._box_probes(box, export_size):
                found.setdefault(probe.shape, probe)
        return list(found.values())

    def _box_probes(self, box: Box, export_size: tuple[int, int]) -> list[Probe]:
        """Batch 1 at the export size and at the three other corners of height x width, batch 1
        at a non-square size off the usual multiples (one above the smallest height, one above
        the middle width), and the largest batch at the smallest corner, whose images are also
        run alone (check_parity): that checks batch 1 there too."""
        (n_lo, n_hi), (h_lo, h_hi), (w_lo, w_hi) = box.batch, box.height, box.width
        c, side = self.channels, self._inside
        shapes = [
            ("export size", (n_lo, c, side(export_size[0], box.height), side(export_size[1], box.width))),
            ("largest", (n_lo, c, h_hi, w_hi)),
            ("tall", (n_lo, c, h_hi, w_lo)),
            ("wide", (n_lo, c, h_lo, w_hi)),
            ("non-square", (n_lo, c, self._up(h_lo + 1, box.height), self._up((w_lo + w_hi) // 2 + 1, box.width))),
            ("largest batch", (n_hi, c, h_lo, w_lo)),
        ]
        return [Probe(label, shape) for label, shape in shapes]

    def _up(self, size: int, span: tuple[int, int]) -> int:
        """The smallest accepted size >= ``size`` within ``span``."""
        return min(max(self.rule.at_least(size), span[0]), span[1])

    def _inside(self, size: int, span: tuple[int, int]) -> int:
        """The accepted size nearest ``size`` within ``span``."""
        lo, hi = span
        return min(max(self.rule.fit(size), lo), hi)

    def refusals(self) -> list[Probe]:
        """Shapes just outside every box: one more than the largest height and batch."""
        out = []
        for box in self.boxes:
            n, h, w = box.batch[1], box.height[1], box.width[0]
            out += [Probe("height just over", (1 if box.batch[0] <= 1 else box.batch[0], self.channels, h + 1, w)),
                    Probe("batch just over", (n + 1, self.channels, box.height[0], w))]  # fmt: skip
        return [p for p in out if not self.accepts(p.shape[0], *p.shape[2:])]

    def to_dict(self) -> dict:
        return {"boxes": [b.to_dict() for b in self.boxes], "channels": self.channels,
                "size_rule": self.rule.to_dict()}  # fmt: skip

    @classmethod
    def from_dict(cls, data: dict) -> "Envelope":
        rule = SizeRule.from_record(data["size_rule"])
        return cls(rule, int(data["channels"]), tuple(Box.from_dict(b) for b in data["boxes"]))


def _distance(box: Box, n: int, h: int, w: int) -> int:
    return sum(max(lo - v, 0, v - hi) for (lo, hi), v in ((box.batch, n), (box.height, h), (box.width, w)))


def declared(rule: SizeRule, channels: int, export_size: tuple[int, int], *, static_shape: tuple | None = None,
             max_batch: int | None = None, min_size: tuple[int, int] | None = None,
             max_size: tuple[int, int] | None = None, profiles: list[dict] | None = None) -> Envelope:  # fmt: skip
    """What an artefact declares it takes: a static one its single shape; a TensorRT engine its
    profiles (min..max per axis); any other 1 to ``max_batch`` images of every accepted size from
    ``min_size`` to ``max_size`` (default DEFAULT_MAX_BATCH, and DEFAULT_SIZE_RANGE x the export
    size, fitted to the rule)."""
    if static_shape is not None:
        n, _, h, w = (int(d) for d in static_shape)
        return Envelope(rule, channels, (Box((n, n), (h, h), (w, w)),))
    if profiles:
        boxes = tuple(Box((p["min"][0], p["max"][0]), (p["min"][2], p["max"][2]), (p["min"][3], p["max"][3]))
                      for p in profiles)  # fmt: skip
        return Envelope(rule, channels, boxes)
    max_batch = DEFAULT_MAX_BATCH if max_batch is None else max_batch
    if max_batch < 1:
        raise UserError(f"--max-batch must be at least 1, got {max_batch}")
    low, high = DEFAULT_SIZE_RANGE
    spans = []
    for i, name in enumerate(("height", "width")):
        smallest = min_size[i] if min_size else rule.at_least(int(export_size[i] * low))
        largest = max_size[i] if max_size else rule.fit(int(export_size[i] * high))
        spans.append(_side_span(rule, export_size[i], smallest, largest, name))
    return Envelope(rule, channels, (Box((1, max_batch), spans[0], spans[1]),))


def _side_span(rule: SizeRule, export: int, smallest: int, largest: int, name: str) -> tuple[int, int]:
    """[smallest, largest] on the rule; it must hold the export size (the shape the artefact was
    written and first checked at)."""
    lo, hi = max(rule.at_least(smallest), rule.first()), rule.fit(largest)
    if not lo <= export <= hi:
        raise UserError(f"--smallest/--largest {name} {smallest}..{largest} does not hold the export {name} "
                        f"{export}: the envelope is declared around the export size")  # fmt: skip
    return lo, hi


def parse_size(text: str, option: str = "--largest") -> tuple[int, int]:
    """'512x768' (height x width) or '512' (square) -> (512, 768)."""
    parts = text.lower().replace(",", "x").split("x")
    if not 1 <= len(parts) <= 2 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise UserError(f"{option} {text!r} is not HxW (or one side) in positive integers, e.g. 512x768")
    sizes = [int(p) for p in parts]
    return (sizes[0], sizes[-1])


def batch_for(env: "Envelope | None", requested: int | None, default: int, option: str, path: str) -> int:
    """The batch a command runs an artefact at: ``requested`` (``option``), by default ``default``
    or the largest proven batch if smaller; more than that is refused (exit 2), naming the
    envelope: the artefact would run batches it was never checked at. No envelope: as asked."""
    largest = None if env is None else env.largest_batch()
    if requested is None:
        return min(default, largest or default)
    if largest is not None and requested > largest:
        raise UserError(f"{option} {requested} is more than {path} was proven at ({env.describe()}): "
                        f"give {option} {largest} or less, or export it with --max-batch {requested}")  # fmt: skip
    return requested


def of_entry(entry: dict) -> Envelope | None:
    """The envelope a manifest entry was proven on (None: exported before envelopes were proven)."""
    record = entry.get("envelope")
    return Envelope.from_dict(record["declared"]) if record and record.get("declared") else None


def record(env: Envelope, report) -> dict:
    """The manifest's envelope record: what was declared, each probe's verdict and numbers (error
    against float64 in units of the noise floor, class changes, batch invariance), the shapes it
    refused, and whether the whole envelope is proven. ``report``: the gate's ParityReport."""
    checked = []
    for case in report.cases:
        if not case.probe:
            continue
        ratio = case.floor_ratio
        checked.append({"probe": case.probe, "shape": list(case.shape), "passed": case.passed,
                        "floor_ratio": ratio, "class_change": case.argmax_disagreement, "alone": case.alone,
                        "label": case.label or None})  # fmt: skip
    return {"declared": env.to_dict(), "describe": env.describe(), "checked": checked,
            "refused": refused(env), "proven": bool(report.passed and checked)}


def refused(env: Envelope) -> list[dict]:
    """Each shape just outside the envelope, with the one line it is refused with; a shape the
    envelope would run instead is a bug in the envelope itself, not a verdict on the artefact."""
    out = []
    for probe in env.refusals():
        try:
            env.check(probe.shape[0], *probe.shape[2:])
        except UserError as exc:
            out.append({"probe": probe.label, "shape": list(probe.shape), "message": str(exc)})
        else:
            raise AssertionError(f"the envelope {env.describe()} accepts {probe.shape}, which lies outside it")
    return out
