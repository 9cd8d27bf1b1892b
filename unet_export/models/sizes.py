"""Which input sizes a network takes: H and W = offset + multiple * k, at least ``min``.

milesial pads at run time (any size >= 16); plain U-Nets need multiples of 16; a ResNet-50
encoder multiples of 32; the unpadded 2015 U-Net 188, 204, 220, ... (16k + 124, k >= 4)."""

from dataclasses import asdict, dataclass, fields

from unet_export.errors import UserError


@dataclass(frozen=True)
class SizeRule:
    min: int = 16
    multiple: int = 1
    offset: int = 0
    shrink: int = 0  # output is this much smaller than the input (unpadded convs), centred

    def at_least(self, size: int) -> int:
        """The smallest accepted size >= ``size``."""
        return max(self.first(), size + (-(size - self.offset)) % self.multiple)

    def accepts(self, size: int) -> bool:
        return size >= self.min and (size - self.offset) % self.multiple == 0

    def nearest(self, size: int) -> list[int]:
        """The valid sizes just below and above ``size``."""
        below = size - (size - self.offset) % self.multiple
        candidates = [below, below + self.multiple] if below != size else [size]
        return [max(c, self.first()) for c in dict.fromkeys(candidates)]

    def first(self) -> int:
        """The smallest accepted size."""
        k = -(-(self.min - self.offset) // self.multiple)  # ceil
        return self.offset + self.multiple * max(k, 0)

    def check(self, height: int, width: int) -> None:
        """Raise a UserError naming the nearest valid sizes when (height, width) is refused."""
        for name, value in (("height", height), ("width", width)):
            if not self.accepts(value):
                near = " or ".join(map(str, sorted(set(self.nearest(value)))))
                raise UserError(f"{name} {value} does not fit this model ({self.describe()}): use {near}")

    def fit(self, size: int) -> int:
        """The largest accepted size <= ``size`` (or the smallest accepted one)."""
        return max(self.first(), size - (size - self.offset) % self.multiple)

    def describe(self) -> str:
        if self.multiple == 1:
            return f"at least {self.min}"
        form = f"{self.offset} + {self.multiple}k" if self.offset else f"a multiple of {self.multiple}"
        return f"{form}, at least {self.first()}"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_record(cls, record: dict) -> "SizeRule":
        """The rule a manifest's ``size_rule`` holds: its own fields only (the record also holds
        ``static``, which is the artefact's, not the model's)."""
        return cls(**{f.name: int(record[f.name]) for f in fields(cls) if f.name in record})
