"""Low-bit formats as data: one frozen `Format` record per format, and one registry of them by name.

A format says how a tensor is stored after quantization along its last dim (K):
- `element`: the code type of each value (int8, int4, fp8 e4m3/e5m2, fp4 e2m1);
- `granularity`: which values share a scale (whole tensor, one row, `group_size` consecutive values
  along K, a `block_rows` x `group_size` tile over the last two dims, or `block_rows` whole rows:
  attention operands (..., S, D) per batch, head and token block);
- `scale_type`: how a scale is stored (fp32, bf16, e8m0 power of two as in MX, e4m3 as in NVFP4);
- `symmetric`: False gives integer formats a zero point (int4 asymmetric, codes 0..15);
- `global_scale`: NVFP4-style two-level scaling, an fp32 per-tensor scale on top of e4m3 block scales.

The math that reads these records lives in `lowbit_compile.reference`; adding a format is adding a
record here (and kernels for it), never a branch in the passes.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

__all__ = [
    "ATTENTION_FORMATS",
    "AttentionFormat",
    "BUILTIN_ATTENTION_FORMATS",
    "BUILTIN_FORMATS",
    "FORMATS",
    "ElementType",
    "Format",
    "Granularity",
    "ScaleType",
    "get_attention_format",
    "get_format",
    "register_attention_format",
    "register_format",
]


class ElementType(str, enum.Enum):
    INT8 = "int8"
    INT4 = "int4"
    FP8_E4M3 = "fp8_e4m3"
    FP8_E5M2 = "fp8_e5m2"
    FP4_E2M1 = "fp4_e2m1"

    def __str__(self) -> str:
        return self.value


class Granularity(str, enum.Enum):
    TENSOR = "tensor"  # one scale for the whole tensor
    ROW = "row"  # one scale per row (last dim reduced): per-channel for weights, per-token for activations
    GROUP = "group"  # one scale per `group_size` consecutive elements along the last dim (K)
    BLOCK = "block"  # one scale per `block_rows` x `group_size` tile over the last two dims
    TOKEN_BLOCK = "token_block"  # one scale per `block_rows` consecutive rows (tokens), the whole last dim

    def __str__(self) -> str:
        return self.value


class ScaleType(str, enum.Enum):
    FP32 = "fp32"
    BF16 = "bf16"
    E8M0 = "e8m0"  # power of two, stored as a biased exponent byte (OCP MX)
    E4M3 = "e4m3"  # float8_e4m3fn, relative to a global fp32 scale (NVFP4)

    def __str__(self) -> str:
        return self.value


class _ElementInfo(NamedTuple):
    bits: int
    is_float: bool
    max_magnitude: float  # largest finite value (floats) or largest positive code (signed ints)
    storage_dtype: torch.dtype  # dtype of QuantizedTensor.data; 4-bit codes are packed two per uint8
    max_exponent: int | None  # exponent of the largest power of two <= max_magnitude (floats), used by MX


_ELEMENTS: dict[ElementType, _ElementInfo] = {
    ElementType.INT8: _ElementInfo(8, False, 127, torch.int8, None),
    ElementType.INT4: _ElementInfo(4, False, 7, torch.uint8, None),
    ElementType.FP8_E4M3: _ElementInfo(8, True, 448.0, torch.float8_e4m3fn, 8),
    ElementType.FP8_E5M2: _ElementInfo(8, True, 57344.0, torch.float8_e5m2, 15),
    ElementType.FP4_E2M1: _ElementInfo(4, True, 6.0, torch.uint8, 2),
}

_SCALE_STORAGE: dict[ScaleType, torch.dtype] = {
    ScaleType.FP32: torch.float32,
    ScaleType.BF16: torch.bfloat16,
    ScaleType.E8M0: torch.uint8,
    ScaleType.E4M3: torch.float8_e4m3fn,
}

MIN_GROUP_SIZE = 16  # smallest group along K any format uses (NVFP4)
MX_GROUP_SIZE = 32  # OCP MX shares one e8m0 exponent across 32 elements
_INT4_ASYMMETRIC_CODES = 15  # codes 0..15


def _is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _coerce_enum(enum_type: type[enum.Enum], value: Any, field: str) -> enum.Enum:
    try:
        return enum_type(value)
    except ValueError:
        valid = ", ".join(repr(member.value) for member in enum_type)
        raise ValueError(f"Format.{field}={value!r} is not valid; use one of {valid}") from None


@dataclass(frozen=True)
class Format:
    """A low-bit format. Quantization is always along the last dim (K) of a tensor.

    group_size: GROUP/BLOCK only: elements per scale along K (a power of two >= 16).
    block_rows: BLOCK / TOKEN_BLOCK only: rows per scale over the second-to-last dim (a power of two
                >= 2; TOKEN_BLOCK >= 16, a kernel tile).
    symmetric:  False gives integer formats a zero point (int4 asymmetric: codes 0..15).
    scale_type: storage of the scales; e8m0 = MX power-of-two scales (GROUP 32), e4m3 = NVFP4 block
                scales (needs global_scale).
    global_scale: NVFP4 two-level scaling: an fp32 per-tensor scale times e4m3 block scales.
    """

    name: str
    element: ElementType
    granularity: Granularity
    group_size: int | None = None
    block_rows: int | None = None
    symmetric: bool = True
    scale_type: ScaleType = ScaleType.FP32
    global_scale: bool = False

    def __post_init__(self) -> None:
        # Accept the JSON spellings ("int4", "group", ...) so records can be built from plain data.
        object.__setattr__(self, "element", _coerce_enum(ElementType, self.element, "element"))
        object.__setattr__(self, "granularity", _coerce_enum(Granularity, self.granularity, "granularity"))
        object.__setattr__(self, "scale_type", _coerce_enum(ScaleType, self.scale_type, "scale_type"))
        problem = self._problem()
        if problem is not None:
            raise ValueError(f"invalid format {self.name!r}: {problem}")

    def _problem(self) -> str | None:
        """The first thing wrong with this record, phrased as what to change; None if valid."""
        if not isinstance(self.name, str) or not self.name or self.name != self.name.strip():
            return "name must be a non-empty string without surrounding whitespace"
        for field in ("symmetric", "global_scale"):
            if not isinstance(getattr(self, field), bool):
                return f"{field} must be a bool, got {getattr(self, field)!r}"
        for field in ("group_size", "block_rows"):
            value = getattr(self, field)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                return f"{field} must be an int or None, got {value!r}"

        tiled = self.granularity in (Granularity.GROUP, Granularity.BLOCK)
        if tiled:
            if self.group_size is None:
                return f"{self.granularity.value} granularity needs group_size (e.g. group_size=128)"
            if self.group_size < MIN_GROUP_SIZE or not _is_power_of_two(self.group_size):
                return (
                    f"group_size must be a power of two >= {MIN_GROUP_SIZE} "
                    f"(16, 32, 64, 128, ...), got {self.group_size}"
                )
        elif self.group_size is not None:
            return (
                f"group_size={self.group_size} only applies to group/block granularity; "
                f"drop it or use granularity='group'"
            )

        if self.granularity is Granularity.TOKEN_BLOCK:
            if self.block_rows is None:
                return "token_block granularity needs block_rows (e.g. block_rows=128 for 128-token blocks)"
            if self.block_rows < MIN_GROUP_SIZE or not _is_power_of_two(self.block_rows):
                return f"token_block rows must be a power of two >= {MIN_GROUP_SIZE}, got {self.block_rows}"
        elif self.granularity is Granularity.BLOCK:
            if self.block_rows is None:
                return "block granularity needs block_rows (e.g. block_rows=128 for 128x128 tiles)"
            if self.block_rows < 2 or not _is_power_of_two(self.block_rows):
                return (
                    f"block_rows must be a power of two >= 2, got {self.block_rows} "
                    f"(for 1-row tiles use granularity='group')"
                )
        elif self.block_rows is not None:
            return f"block_rows={self.block_rows} only applies to block granularity; drop it or use granularity='block'"

        if not self.symmetric and self.element is not ElementType.INT4:
            return (
                f"a zero point (symmetric=False) is supported for int4 only, not {self.element.value}; "
                f"use symmetric=True"
            )

        if self.scale_type is ScaleType.E8M0:
            if not self.is_float:
                return (
                    f"e8m0 scales are for MX float elements (fp8/fp4), not {self.element.value}; use scale_type='fp32'"
                )
            if self.granularity is not Granularity.GROUP or self.group_size != MX_GROUP_SIZE:
                return f"e8m0 (MX) scales need granularity='group' with group_size={MX_GROUP_SIZE}"
        if self.scale_type is ScaleType.E4M3 and not self.global_scale:
            return (
                "e4m3 scales need global_scale=True: without an fp32 per-tensor scale on top, "
                "block scales under- or overflow e4m3's range"
            )
        if self.global_scale:
            if self.scale_type is not ScaleType.E4M3:
                return (
                    "global_scale=True is only for e4m3 block scales (NVFP4); "
                    "use scale_type='e4m3' or global_scale=False"
                )
            if not self.is_float:
                return f"global_scale (NVFP4-style) needs a float element, not {self.element.value}"
            if self.granularity is not Granularity.GROUP:
                return "global_scale (NVFP4-style) needs granularity='group'"
        return None

    # -- derived properties --------------------------------------------------------------------

    @property
    def bits(self) -> int:
        """Bits per element code: 8 or 4."""
        return _ELEMENTS[self.element].bits

    @property
    def is_float(self) -> bool:
        return _ELEMENTS[self.element].is_float

    @property
    def qmax(self) -> float | int:
        """Largest code (ints: 127, 7, or 15 asymmetric) or largest finite magnitude (floats: 448, 57344, 6)."""
        if not self.symmetric:
            return _INT4_ASYMMETRIC_CODES
        return _ELEMENTS[self.element].max_magnitude

    @property
    def qmin(self) -> float | int:
        """Smallest code (ints: -128, -8, or 0 asymmetric) or the most negative finite value (floats)."""
        if not self.symmetric:
            return 0
        if self.is_float:
            return -self.qmax
        return -(self.qmax + 1)

    @property
    def max_exponent(self) -> int | None:
        """Floats: exponent of the largest power of two the element holds (e4m3 8, e5m2 15, e2m1 2)."""
        return _ELEMENTS[self.element].max_exponent

    @property
    def storage_dtype(self) -> torch.dtype:
        """Dtype of `QuantizedTensor.data`; packed 4-bit formats store two codes per uint8."""
        return _ELEMENTS[self.element].storage_dtype

    @property
    def scale_dtype(self) -> torch.dtype:
        """Dtype of `QuantizedTensor.scale` (e8m0 is stored as a uint8 biased exponent)."""
        return _SCALE_STORAGE[self.scale_type]

    @property
    def per_row_block(self) -> bool:
        """Scales shared by `block_rows` rows: BLOCK tiles and TOKEN_BLOCK blocks."""
        return self.granularity in (Granularity.BLOCK, Granularity.TOKEN_BLOCK)

    @property
    def k_multiple(self) -> int:
        """What the last dim K must be a multiple of: the group size, 2 for packed 4-bit, else 1."""
        if self.group_size is not None:
            return self.group_size
        return 2 if self.bits == 4 else 1

    # -- plain data ----------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict (enums as their string values)."""
        result: dict[str, Any] = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            result[field.name] = value.value if isinstance(value, enum.Enum) else value
        return result

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Format:
        names = [field.name for field in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise ValueError(f"unknown Format keys {unknown}; valid keys are {names}")
        return cls(**data)

    def __str__(self) -> str:
        return self.name


# -- registry ------------------------------------------------------------------------------------

FORMATS: dict[str, Format] = {}


def register_format(fmt: Format) -> Format:
    """Add `fmt` to FORMATS under its name and return the registered record.

    Re-registering an equal record is a no-op; a different record under a taken name is an error.
    """
    if not isinstance(fmt, Format):
        raise TypeError(f"register_format expects a Format, got {type(fmt).__name__}")
    existing = FORMATS.get(fmt.name)
    if existing == fmt:
        return existing
    if existing is not None:
        raise ValueError(
            f"format name {fmt.name!r} is already registered with different content ({existing!r}); pick another name"
        )
    FORMATS[fmt.name] = fmt
    return fmt


def get_format(name_or_format: Format | str) -> Format:
    """The registered Format for a name; a Format passes through unchanged."""
    if isinstance(name_or_format, Format):
        return name_or_format
    if not isinstance(name_or_format, str):
        raise TypeError(f"expected a Format or a format name, got {type(name_or_format).__name__}")
    fmt = FORMATS.get(name_or_format)
    if fmt is None:
        raise ValueError(f"unknown format {name_or_format!r}; valid names: {', '.join(sorted(FORMATS))}")
    return fmt


def _builtin_formats() -> tuple[Format, ...]:
    E, G, S = ElementType, Granularity, ScaleType
    return (
        Format("int8_tensor", E.INT8, G.TENSOR),
        Format("int8_row", E.INT8, G.ROW),
        Format("int8_g128", E.INT8, G.GROUP, group_size=128),
        *(Format(f"int4_g{g}", E.INT4, G.GROUP, group_size=g) for g in (32, 64, 128)),
        *(Format(f"int4_g{g}_asym", E.INT4, G.GROUP, group_size=g, symmetric=False) for g in (32, 64, 128)),
        Format("fp8_e4m3_tensor", E.FP8_E4M3, G.TENSOR),
        Format("fp8_e4m3_row", E.FP8_E4M3, G.ROW),
        Format("fp8_e5m2_tensor", E.FP8_E5M2, G.TENSOR),
        Format("fp8_e5m2_row", E.FP8_E5M2, G.ROW),
        # DeepSeek-V3 style: 1x128 groups for activations, 128x128 tiles for weights.
        Format("fp8_e4m3_1x128", E.FP8_E4M3, G.GROUP, group_size=128),
        Format("fp8_e4m3_128x128", E.FP8_E4M3, G.BLOCK, group_size=128, block_rows=128),
        Format("mxfp8", E.FP8_E4M3, G.GROUP, group_size=MX_GROUP_SIZE, scale_type=S.E8M0),
        Format("mxfp4", E.FP4_E2M1, G.GROUP, group_size=MX_GROUP_SIZE, scale_type=S.E8M0),
        Format("nvfp4", E.FP4_E2M1, G.GROUP, group_size=16, scale_type=S.E4M3, global_scale=True),
        # Attention operands (B, H, S, D): one scale per batch, head and 64- or 128-token block.
        *(Format(f"fp8_e4m3_t{b}", E.FP8_E4M3, G.TOKEN_BLOCK, block_rows=b) for b in (64, 128)),
        *(Format(f"int8_t{b}", E.INT8, G.TOKEN_BLOCK, block_rows=b) for b in (64, 128)),
    )


# Names of the formats this module registers (user-registered formats come on top in FORMATS).
BUILTIN_FORMATS: tuple[str, ...] = tuple(register_format(fmt).name for fmt in _builtin_formats())


# -- attention formats -------------------------------------------------------------------------------


@dataclass(frozen=True)
class AttentionFormat:
    """How an attention site's operands are quantized: softmax(Q K^T * scale + mask) V.

    q, k, v: registered `Format` names of the three operands (the QK^T product runs in q/k's element,
             the PV product in v's).
    smooth_k: subtract from K the per-channel mean of its first token block (K's `block_rows`
             rows) before quantizing it: q . (k_j - c) = q . k_j - q . c for every key j, and softmax
             ignores a constant per query row, so the result is unchanged while a channel offset
             shared by all tokens (common in LLM keys) no longer takes K's integer range.
    quantize_probabilities: the probabilities P (in [0, 1]) are quantized to v's element for the PV
             product, with the fixed scale 1 / qmax, relative to the row max rounded up to a power
             of two (exp2 against an integer max), so online softmax's rescaling is exact.

    `lowbit::block_attention` takes high-precision q, k, v and quantizes them itself (inside the
    kernel on GPU); `reference.attention` is the numerical definition. A plain `Format` name used
    for attention stands for all three operands, per token, with fp32 probabilities (the
    `lowbit::attention` op over operands quantized by the graph).
    """

    name: str
    q: str
    k: str
    v: str
    smooth_k: bool = False
    quantize_probabilities: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name or self.name != self.name.strip():
            raise ValueError(f"invalid attention format {self.name!r}: name must be a non-empty string")
        for field in ("q", "k", "v"):
            value = getattr(self, field)
            object.__setattr__(self, field, get_format(value).name)  # unknown names raise here
        for field in ("smooth_k", "quantize_probabilities"):
            if not isinstance(getattr(self, field), bool):
                raise ValueError(f"invalid attention format {self.name!r}: {field} must be a bool")
        if self.name in FORMATS:
            raise ValueError(f"attention format name {self.name!r} is taken by a Format; pick another name")

    @property
    def formats(self) -> tuple[Format, Format, Format]:
        """The Format records of q, k and v."""
        return get_format(self.q), get_format(self.k), get_format(self.v)

    def to_dict(self) -> dict[str, Any]:
        return {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AttentionFormat:
        names = [field.name for field in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise ValueError(f"unknown AttentionFormat keys {unknown}; valid keys are {names}")
        return cls(**data)

    def __str__(self) -> str:
        return self.name


ATTENTION_FORMATS: dict[str, AttentionFormat] = {}


def register_attention_format(fmt: AttentionFormat) -> AttentionFormat:
    """Add `fmt` to ATTENTION_FORMATS (an equal record again is a no-op, another one an error)."""
    if not isinstance(fmt, AttentionFormat):
        raise TypeError(f"register_attention_format expects an AttentionFormat, got {type(fmt).__name__}")
    existing = ATTENTION_FORMATS.get(fmt.name)
    if existing == fmt:
        return existing
    if existing is not None:
        raise ValueError(f"attention format name {fmt.name!r} is already registered with different content")
    ATTENTION_FORMATS[fmt.name] = fmt
    return fmt


def get_attention_format(name_or_format: AttentionFormat | Format | str) -> AttentionFormat:
    """The attention format for a name; a plain `Format` (name) means that format for q, k and v,
    per operand, with fp32 probabilities."""
    if isinstance(name_or_format, AttentionFormat):
        return name_or_format
    if isinstance(name_or_format, str) and name_or_format in ATTENTION_FORMATS:
        return ATTENTION_FORMATS[name_or_format]
    fmt = get_format(name_or_format)
    return AttentionFormat(f"{fmt.name}/attention", fmt.name, fmt.name, fmt.name, quantize_probabilities=False)


def is_attention_format(name: str | None) -> bool:
    """True if `name` is a registered `AttentionFormat` (not a plain Format)."""
    return isinstance(name, str) and name in ATTENTION_FORMATS


def format_record(name: str) -> dict[str, Any]:
    """The plain-data record of a Format or AttentionFormat name (policy JSON and cache keys)."""
    if is_attention_format(name):
        return ATTENTION_FORMATS[name].to_dict()
    return get_format(name).to_dict()


def _builtin_attention_formats() -> tuple[AttentionFormat, ...]:
    records = []
    for b in (64, 128):
        fp8 = f"fp8_e4m3_t{b}"
        # FP8 Q, K, V (FlashAttention-3 style), per token block. K smoothing costs one subtraction
        # in the kernel and lifts K with offset outlier channels from 22 to 26 dB (DESIGN-NOTES).
        records.append(AttentionFormat(f"attn_fp8_t{b}", fp8, fp8, fp8, smooth_k=True))
        # INT8 QK^T with smoothed K, FP8 PV (SageAttention style).
        records.append(AttentionFormat(f"attn_int8_t{b}", f"int8_t{b}", f"int8_t{b}", fp8, smooth_k=True))
    return tuple(records)


BUILTIN_ATTENTION_FORMATS: tuple[str, ...] = tuple(
    register_attention_format(fmt).name for fmt in _builtin_attention_formats()
)
