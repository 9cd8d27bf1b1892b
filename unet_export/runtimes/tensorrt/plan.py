"""Everything about a TensorRT build that needs no TensorRT: shapes and profiles, which build
path a TensorRT version takes, the engine's manifest record, compatibility checks and parser
error messages. Kept apart so all of it is tested on machines without a GPU."""

import re
from dataclasses import dataclass
from pathlib import Path

from unet_export.errors import UserError
from unet_export.models.sizes import SizeRule

Shape = tuple[int, int, int, int]
DEFAULT_MIN_BATCH, DEFAULT_OPT_BATCH, DEFAULT_MAX_BATCH = 1, 8, 16


def parse_shape(text: str, option: str) -> Shape:
    """'8x3x256x256' -> (8, 3, 256, 256)."""
    parts = re.split(r"[x,]", text.strip().lower())
    if len(parts) != 4 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise UserError(f"{option} {text!r} is not NxCxHxW with positive integers, e.g. 8x3x256x256")
    return tuple(int(p) for p in parts)  # type: ignore[return-value]


@dataclass(frozen=True)
class Profile:
    min: Shape
    opt: Shape
    max: Shape

    def contains(self, shape: tuple[int, ...]) -> bool:
        return len(shape) == 4 and all(lo <= s <= hi for lo, s, hi in zip(self.min, shape, self.max))

    def to_dict(self) -> dict:
        return {"min": list(self.min), "opt": list(self.opt), "max": list(self.max)}

    @classmethod
    def from_dict(cls, data: dict) -> "Profile":
        return cls(tuple(data["min"]), tuple(data["opt"]), tuple(data["max"]))

    def describe(self) -> str:
        return f"min {_dims(self.min)} opt {_dims(self.opt)} max {_dims(self.max)}"


def _dims(shape) -> str:
    return "x".join(map(str, shape))


def parse_profile(text: str) -> Profile:
    """--profile 'MIN:OPT:MAX', each NxCxHxW -> Profile."""
    parts = text.strip().split(":")
    if len(parts) != 3:
        raise UserError(f"--profile {text!r} is not MIN:OPT:MAX (each NxCxHxW), "
                        "e.g. 1x3x256x256:1x3x256x256:1x3x512x512")  # fmt: skip
    return Profile(*(parse_shape(part, f"--profile {text!r}:") for part in parts))


def entry_profiles(entry: dict) -> list[Profile]:
    """An engine entry's optimisation profiles, in the engine's order: "profiles", or (recorded
    before there could be several) its one "profile"; none for any other artefact."""
    records = entry.get("profiles") or ([entry["profile"]] if "profile" in entry else [])
    return [Profile.from_dict(p) for p in records]


def resolve_profiles(onnx_entry: dict, profiles: list[str] | None = None, min_text=None, opt_text=None,
                     max_text=None) -> list[Profile]:  # fmt: skip
    """The engine's optimisation profiles: each --profile MIN:OPT:MAX, or the one profile of
    --min/--opt/--max-shape and the manifest's defaults (resolve_profile). Each is validated as
    the one-profile form is; the two forms do not mix."""
    if not profiles:
        return [resolve_profile(onnx_entry, min_text, opt_text, max_text)]
    if min_text or opt_text or max_text:
        raise UserError("--profile gives whole profiles: drop --min-shape/--opt-shape/--max-shape "
                        "(or give one profile with those alone)")  # fmt: skip
    channels, rule, static, fixed = _source(onnx_entry)
    out: list[Profile] = []
    for text in profiles:
        profile = parse_profile(text)
        if profile in out:
            raise UserError(f"--profile {text!r} is given twice")
        names = {name: f"--profile {text!r}: {name}" for name in ("min", "opt", "max")}
        _validate(profile, channels, rule, static, names=names, fixed=fixed)
        out.append(profile)
    return out


def _source(onnx_entry: dict) -> tuple[int, SizeRule, bool, Shape | None]:
    """(channels, size rule, static, the static input shape) of the ONNX model an engine is built from."""
    channels = int(onnx_entry["inputs"][0]["shape"][1])
    rule = onnx_entry.get("size_rule", {})
    static = bool(rule.get("static", False))
    fixed = tuple(int(d) for d in onnx_entry["inputs"][0]["shape"]) if static else None
    return channels, SizeRule.from_record(rule), static, fixed  # type: ignore[return-value]


def resolve_profile(onnx_entry: dict, min_text=None, opt_text=None, max_text=None) -> Profile:
    """The optimisation profile: the user's shapes, the rest from the ONNX entry in the manifest
    (batch 1..16, opt batch 8, height and width at the export size)."""
    channels, rule, static, fixed = _source(onnx_entry)
    height, width = onnx_entry["export_size"]
    if fixed is not None:
        defaults = Profile(fixed, fixed, fixed)
    else:
        defaults = Profile((DEFAULT_MIN_BATCH, channels, height, width), (DEFAULT_OPT_BATCH, channels, height, width),
                           (DEFAULT_MAX_BATCH, channels, height, width))  # fmt: skip
    given = {name: parse_shape(text, f"--{name}-shape") for name, text in (("min", min_text), ("opt", opt_text), ("max", max_text)) if text}
    profile = Profile(**({"min": defaults.min, "opt": defaults.opt, "max": defaults.max} | given))
    if given and not all(k in given for k in ("min", "max")):
        profile = _widen(profile, given)
    _validate(profile, channels, rule, static)
    return profile


def _widen(profile: Profile, given: dict) -> Profile:
    """With only some shapes given, stretch the defaults so that min <= opt <= max still holds."""
    lo = tuple(min(a, b, c) for a, b, c in zip(profile.min, profile.opt, profile.max)) if "min" not in given else profile.min
    hi = tuple(max(a, b, c) for a, b, c in zip(profile.min, profile.opt, profile.max)) if "max" not in given else profile.max
    return Profile(lo, profile.opt, hi)  # type: ignore[arg-type]


def _validate(profile: Profile, channels: int, rule: SizeRule, static: bool, *, names: dict | None = None,
              fixed: Shape | None = None) -> None:  # fmt: skip
    """``names``: how the messages name min/opt/max (default --min-shape & co); ``fixed``: the
    static model's one shape, which the profile must be."""
    names = names or {name: f"--{name}-shape" for name in ("min", "opt", "max")}
    for name in ("min", "opt", "max"):
        shape = getattr(profile, name)
        if shape[1] != channels:
            raise UserError(f"{names[name]} has {shape[1]} channels; the model takes {channels}")
        for dim, label in ((shape[2], "height"), (shape[3], "width")):
            if not rule.accepts(dim):
                raise UserError(f"{names[name]} {label} {dim} breaks the model's size rule ({rule.describe()})")
    if not (all(a <= b for a, b in zip(profile.min, profile.opt)) and all(a <= b for a, b in zip(profile.opt, profile.max))):
        raise UserError(f"profile must satisfy min <= opt <= max in every dimension, got {profile.to_dict()}")
    if static and not (profile.min == profile.opt == profile.max and fixed in (None, profile.min)):
        raise UserError("the ONNX model was exported --static: its engine profile cannot vary; export without --static")


def trt_major(version: str) -> int:
    try:
        return int(version.split(".")[0])
    except ValueError:
        raise UserError(f"cannot read the TensorRT version {version!r}") from None


@dataclass(frozen=True)
class BuildPlan:
    precision: str  # fp16 | fp32
    source: str  # "fp32-onnx" or "fp16-onnx": which ONNX model the parser reads
    fp16_flag: bool  # TensorRT <= 10: BuilderFlag.FP16 (weak typing)
    strongly_typed: bool  # precision comes from the ONNX types alone
    pin_fp32_layers: bool  # TensorRT <= 10: layer precision + OBEY_PRECISION_CONSTRAINTS
    # TensorRT <= 10 is strongly typed only when NetworkDefinitionCreationFlag.STRONGLY_TYPED (1) is set;
    # 11.x always is, and its STRONGLY_TYPED (value 0 there) is deprecated and ignored, so it is not set.
    strongly_typed_flag: bool = False


def plan_build(trt_version: str, precision: str, fp32_layers: list[str] | None = None) -> BuildPlan:
    """TensorRT <= 10 builds FP16 from the FP32 model with BuilderFlag.FP16; TensorRT >= 11 has no
    precision flags (strongly typed only), so FP16 comes from an FP16 ONNX model."""
    if precision not in ("fp16", "fp32"):
        raise UserError(f"precision {precision!r}: choose fp16 or fp32")
    legacy = trt_major(trt_version) <= 10
    if precision == "fp32":
        return BuildPlan("fp32", "fp32-onnx", fp16_flag=False, strongly_typed=True, pin_fp32_layers=False,
                         strongly_typed_flag=legacy)  # fmt: skip
    if legacy:
        return BuildPlan("fp16", "fp32-onnx", fp16_flag=True, strongly_typed=False, pin_fp32_layers=bool(fp32_layers))
    return BuildPlan("fp16", "fp16-onnx", fp16_flag=False, strongly_typed=True, pin_fp32_layers=False)


def engine_path(workdir: Path, onnx_path: str, precision: str) -> Path:
    """DIR/<stem>.<precision>.engine, the stem of the FP32 ONNX model (weights.onnx -> weights)."""
    stem = Path(onnx_path).name.removesuffix(".onnx").removesuffix(".fp16")
    return Path(workdir) / f"{stem}.{precision}.engine"


def check_engine_compat(entry: dict, trt_version: str, gpu_name: str, capability: str) -> None:
    """Refuse an engine built by another TensorRT version or for another GPU, before TensorRT does."""
    built = (entry.get("tensorrt_version"), entry.get("compute_capability"))
    if built == (trt_version, capability):
        return
    raise UserError(
        f"{entry['path']} was built by TensorRT {built[0]} for {entry.get('gpu')} (sm {built[1]}); "
        f"this machine has TensorRT {trt_version} and {gpu_name} (sm {capability}): "
        "engines only run where they were built, rebuild it with `unet-export trt`"
    )


def parser_error_message(source: str, errors: list[dict]) -> str:
    """One line for the ONNX parser's first error, with a hint for the known U-Net failures."""
    if not errors:
        return f"TensorRT's ONNX parser rejected {source} without saying why (see the TensorRT log above)"
    first = errors[0]
    node = f"node {first.get('node_name') or first.get('node')} ({first.get('operator') or '?'})"
    text = f"TensorRT's ONNX parser rejected {node} of {source}: {first.get('desc', '').strip()}"
    if first.get("operator") == "Pad" or "padding" in first.get("desc", "").lower():
        text += ("; older TensorRT parsers take only constant zero padding, so reflect padding "
                 "(the bilibili U-Net) fails there: use a newer TensorRT, or run this model with ONNX Runtime")  # fmt: skip
    if len(errors) > 1:
        text += f" (+{len(errors) - 1} more errors)"
    return text
