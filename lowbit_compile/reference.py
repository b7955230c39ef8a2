"""Reference quantize / dequantize / 4-bit packing for every `Format`, in plain torch ops.

This is the numerical definition of each format: kernels are tested against it, and the `qdq` stage
of the pipeline runs it. It is traced by torch.fx / aot_autograd with symbolic leading dims, so it
uses only tensor ops: no loops over elements, no `.item()`, no Python branches on tensor values
(branches on the Format record are static and fine).

Layouts (x has shape (..., R, K); quantization is along the last dim K):
- data:  `fmt.storage_dtype`, shape (..., K); packed 4-bit is uint8 (..., K//2) with element 2i in
         the low nibble and 2i+1 in the high nibble. Signed int4 codes are stored as code + 8,
         fp4 e2m1 codes as sign << 3 | magnitude index (0..7 for 0, .5, 1, 1.5, 2, 3, 4, 6).
- scale: same rank as x: TENSOR (1, ..., 1); ROW (..., 1); GROUP (..., K//g);
         BLOCK (..., ceil(R/block_rows), K//g); TOKEN_BLOCK (..., ceil(R/block_rows), 1).
         Stored as `fmt.scale_dtype`: fp32, bf16, e8m0 as a uint8 biased exponent (2**(e-127),
         255 = NaN), e4m3 as float8_e4m3fn.
- zero_point: asymmetric int only: float32 of the scale's shape. `quantize` gives integer values in
         [0, 15]; weights quantized at compile time with the scale search
         (`lowbit_compile.weight_search`, QuantSpec.weight_search) may have any finite float value.
         Every consumer computes (code - zero_point) * scale in fp32 and must not assume integers.
- global_scale: NVFP4 only: float32 0-dim, multiplies the decoded block scales.

Numerics: all math in float32. x ~= decode(data) * scale (asymmetric: (code - zero_point) * scale).
An all-zero group gets scale 0 (e8m0: 2**-127) and dequantizes to exact zeros. A NaN or Inf in a
group makes that group's scale non-finite, so the whole group dequantizes to NaN; it is never
replaced by a finite value.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from lowbit_compile.formats import ElementType, Format, Granularity, ScaleType, get_attention_format, get_format

__all__ = [
    "QuantizedTensor",
    "attention",
    "check_quantizable",
    "dequantize",
    "expand_scale",
    "fake_quantize",
    "pack_4bit",
    "quantize",
    "quantize_with_scale",
    "row_chunk",
    "rows_of",
    "scale_to_float",
    "smooth_keys",
    "unpack_4bit",
]

SUPPORTED_INPUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

_E4M3_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448, the largest NVFP4 block scale
_INT4_SIGNED_OFFSET = 8  # signed int4 code c is stored in its nibble as c + 8
_NIBBLE_MASK = 0x0F
_NIBBLE_BITS = 4

_FLOAT32_MANTISSA_BITS = 23
_FLOAT32_EXPONENT_MASK = 0xFF
_E8M0_BIAS = 127
_E8M0_MAX_STORED = 254  # 2**127
_E8M0_NAN = 255
_E8M0_SMALLEST_FLOAT32_BITS = 1 << 22  # bit pattern of 2**-127, e8m0's smallest value

_FP4_SIGN_SHIFT = 3
_FP4_INDEX_MASK = 0x07
# Midpoints between neighbouring e2m1 magnitudes 0, .5, 1, 1.5, 2, 3, 4, 6. Crossing midpoint i moves
# from index i to i + 1; a value exactly on a midpoint goes to the even index (even mantissa).
_FP4_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)


class QuantizedTensor(NamedTuple):
    """A quantized tensor in the layout described in the module docstring."""

    data: Tensor
    scale: Tensor
    zero_point: Tensor | None = None
    global_scale: Tensor | None = None


# -- checks ----------------------------------------------------------------------------------------


def check_quantizable(shape: Sequence[int], dtype: torch.dtype, fmt: Format | str) -> str | None:
    """None if a tensor of this shape and dtype can be quantized as `fmt`, else the reason why not."""
    fmt = get_format(fmt)
    if dtype not in SUPPORTED_INPUT_DTYPES:
        if not dtype.is_floating_point:
            return f"dtype {dtype} is not floating point"
        return f"dtype {dtype} is not supported; quantize from float16, bfloat16, float32 or float64"
    rank = len(shape)
    if rank == 0:
        return "rank 0 tensor has no last dim to quantize along; reshape it to (1,)"
    if fmt.granularity is Granularity.BLOCK and rank < 2:
        return f"rank {rank} tensor cannot use {fmt.block_rows}x{fmt.group_size} blocks (needs rank >= 2)"
    if fmt.granularity is Granularity.TOKEN_BLOCK and rank < 2:
        return f"rank {rank} tensor cannot use {fmt.block_rows}-row blocks (needs rank >= 2)"
    k = shape[-1]
    if k == 0:
        return "K=0: the last dim is empty"
    if fmt.group_size is not None and k % fmt.group_size != 0:
        return f"K={k} not divisible by group size {fmt.group_size}"
    if fmt.bits == 4 and k % 2 != 0:
        return f"K={k} is odd; packed 4-bit formats need an even K"
    return None


def _check_quantized(q: QuantizedTensor, fmt: Format) -> None:
    problems = []
    if q.data.dtype != fmt.storage_dtype:
        problems.append(f"data is {q.data.dtype}, expected {fmt.storage_dtype}")
    if q.scale.dtype != fmt.scale_dtype:
        problems.append(f"scale is {q.scale.dtype}, expected {fmt.scale_dtype}")
    if (q.zero_point is None) != fmt.symmetric:
        problems.append("zero_point must be given exactly for asymmetric formats")
    if (q.global_scale is None) == fmt.global_scale:
        problems.append("global_scale must be given exactly for formats with global_scale=True")
    if problems:
        raise ValueError(f"QuantizedTensor does not match format {fmt.name}: {'; '.join(problems)}")


# -- 4-bit packing ---------------------------------------------------------------------------------


def pack_4bit(codes: Tensor) -> Tensor:
    """uint8 codes in [0, 15] of shape (..., K), K even -> uint8 (..., K//2); element 2i in the low nibble."""
    if codes.dtype != torch.uint8:
        raise ValueError(f"pack_4bit expects uint8 codes, got {codes.dtype}")
    pairs = codes.unflatten(-1, (-1, 2))
    return (pairs[..., 0] & _NIBBLE_MASK) | (pairs[..., 1] << _NIBBLE_BITS)


def unpack_4bit(packed: Tensor) -> Tensor:
    """uint8 (..., K//2) -> uint8 codes (..., K), inverse of `pack_4bit`."""
    if packed.dtype != torch.uint8:
        raise ValueError(f"unpack_4bit expects uint8, got {packed.dtype}")
    low = packed & _NIBBLE_MASK
    high = packed >> _NIBBLE_BITS
    return torch.stack((low, high), dim=-1).flatten(-2)


# -- scale layout ----------------------------------------------------------------------------------


def _repeat_each(t: Tensor, repeats: int, dim: int) -> Tensor:
    """Repeat every entry of `t` along negative dim `dim` `repeats` times (repeat_interleave as a view + copy)."""
    t = t.unsqueeze(dim)
    sizes = list(t.shape)
    sizes[dim] = repeats
    return t.expand(sizes).flatten(dim - 1, dim)


def _max_over_all(t: Tensor) -> Tensor:
    """Max over every element as a 0-dim tensor (NaN propagates); 0 when a leading dim is 0.

    Reducing rows first and appending a 0 keeps empty inputs (an expert that got no tokens) legal;
    0 is neutral because every caller reduces magnitudes or a range that includes 0.
    """
    per_row = t.amax(dim=-1).reshape(-1)
    return torch.cat((per_row, per_row.new_zeros(1))).amax()


def _reduce_max(t: Tensor, fmt: Format) -> Tensor:
    """Max of float32 `t` over each scale's elements, in the scale's shape (NaN propagates).

    BLOCK pads a ragged last row-tile with zeros, which is neutral because every caller reduces
    magnitudes or a range that already includes 0.
    """
    if fmt.granularity is Granularity.TENSOR:
        return _max_over_all(t).reshape((1,) * t.dim())
    if fmt.granularity is Granularity.ROW:
        return t.amax(dim=-1, keepdim=True)
    if fmt.granularity is Granularity.TOKEN_BLOCK:
        per_group = t.amax(dim=-1, keepdim=True)  # (..., R, 1), then blocks of rows as BLOCK below
    else:
        per_group = t.unflatten(-1, (-1, fmt.group_size)).amax(dim=-1)  # (..., R, K//g)
    if fmt.granularity is Granularity.GROUP:
        return per_group
    rows = per_group.shape[-2]
    padded = F.pad(per_group, (0, 0, 0, (-rows) % fmt.block_rows))
    return padded.unflatten(-2, (-1, fmt.block_rows)).amax(dim=-2)


def expand_scale(scale: Tensor, fmt: Format | str, shape: Sequence[int]) -> Tensor:
    """A per-scale tensor (scale, decoded scale or zero point) expanded to the element shape `shape`."""
    fmt = get_format(fmt)
    if fmt.per_row_block:
        scale = _repeat_each(scale, fmt.block_rows, dim=-2).narrow(-2, 0, shape[-2])
    if fmt.group_size is not None:
        scale = _repeat_each(scale, fmt.group_size, dim=-1)
    return scale.expand(tuple(shape))


def _divide(numerator: Tensor, scale: Tensor) -> Tensor:
    """numerator / scale, with 0 where the scale is 0 (an all-zero group) instead of 0/0 = NaN."""
    return torch.where(scale == 0, 0.0, numerator / scale)


def _divide_where_finite(numerator: Tensor, scale: Tensor) -> Tensor:
    """numerator / scale for symmetric integer codes from numerator's own scales (`scale`, >= 0 or
    NaN, broadcast to it): 0 where the scale is 0 (an all-zero group) or not finite (the group holds
    a NaN or Inf, and the NaN scale carries it to dequantize), the codes `nan_to_num` gives there;
    elsewhere every |x| <= amax is finite, so the quotient holds no NaN and its codes need no NaN
    guard. `0 < scale < inf` is that test in the fewest ops (NaN fails both comparisons).

    Why not nan_to_num on the codes: its decomposition reads them four times (isnan and +-inf tests),
    and Inductor stores a value read that often in fp32 instead of recomputing it. Why the fewest
    ops: Inductor also stores any pointwise value whose inlined body (the producer's ops included:
    embedding, RMSNorm, residual adds) exceeds `realize_opcount_threshold` (30 on CUDA); with
    `isfinite(scale) & (scale != 0)` and the scale recomputed as amax / qmax, the chain reached 31-32
    ops at clamp_min / clamp_max on TinyLlama, and on the H100 the cast ran as a pointwise kernel of
    its own. Now it peaks at 28 (fp8's: 27), so amax -> round -> clamp -> cast is one pointwise
    chain after the reduction, fused into the activation's producer (DESIGN-NOTES, issue 6 item 3)."""
    return torch.where((scale > 0.0) & (scale < float("inf")), numerator / scale, 0.0)


# -- scale encodings -------------------------------------------------------------------------------


def _e8m0_encode(amax: Tensor, max_exponent: int) -> Tensor:
    """OCP MX shared exponent: floor(log2(amax)) - max_exponent, clamped to [-127, 127], biased by 127.

    floor(log2) is read exactly from the float32 exponent bits; zero and subnormal amax read as
    -127 and clamp to the smallest scale. A non-finite amax gives the e8m0 NaN code.
    """
    biased_exponent = (amax.view(torch.int32) >> _FLOAT32_MANTISSA_BITS) & _FLOAT32_EXPONENT_MASK
    stored = (biased_exponent - max_exponent).clamp(0, _E8M0_MAX_STORED)
    stored = torch.where(torch.isfinite(amax), stored, _E8M0_NAN)
    return stored.to(torch.uint8)


def _e8m0_decode(stored: Tensor) -> Tensor:
    """uint8 biased exponent e -> float32 2**(e - 127), built from bits so it is exact everywhere."""
    biased_exponent = stored.to(torch.int32)
    bits = torch.where(
        biased_exponent == 0,
        _E8M0_SMALLEST_FLOAT32_BITS,
        biased_exponent << _FLOAT32_MANTISSA_BITS,
    )
    return torch.where(biased_exponent == _E8M0_NAN, float("nan"), bits.view(torch.float32))


def scale_to_float(scale: Tensor, fmt: Format | str) -> Tensor:
    """Decode a stored scale to float32 (without the global scale, which the caller multiplies in)."""
    fmt = get_format(fmt)
    if fmt.scale_type is ScaleType.E8M0:
        return _e8m0_decode(scale)
    return scale.float()


def _store_scale(scale: Tensor, fmt: Format) -> tuple[Tensor, Tensor]:
    """(stored scale, the float32 value it decodes to); quantization divides by the decoded value."""
    stored = scale.to(fmt.scale_dtype)
    return stored, scale_to_float(stored, fmt)


# -- element encodings -----------------------------------------------------------------------------


def _fp4_encode(scaled: Tensor) -> Tensor:
    """float32 -> uint8 e2m1 codes, round to nearest even, saturating at +-6."""
    magnitude = scaled.abs()
    index = torch.zeros_like(magnitude, dtype=torch.uint8)
    for i, midpoint in enumerate(_FP4_MIDPOINTS):
        rounds_up_on_tie = (i + 1) % 2 == 0
        above = magnitude >= midpoint if rounds_up_on_tie else magnitude > midpoint
        index = index + above.to(torch.uint8)
    sign = (scaled < 0).to(torch.uint8) << _FP4_SIGN_SHIFT
    return sign | index


def _fp4_decode(codes: Tensor) -> Tensor:
    """uint8 e2m1 codes -> float32 values."""
    sign = 1.0 - 2.0 * ((codes >> _FP4_SIGN_SHIFT) & 1).float()
    index = codes & _FP4_INDEX_MASK
    exponent = (index >> 1).float()
    mantissa = (index & 1).float()
    normal = torch.exp2(exponent - 1.0) * (1.0 + 0.5 * mantissa)
    subnormal = 0.5 * mantissa
    return sign * torch.where(exponent == 0, subnormal, normal)


def _encode_elements(scaled: Tensor, fmt: Format, zero_point: Tensor | None, nan_free: bool = False) -> Tensor:
    """float32 values in code units (x / scale) -> `data` in the format's storage.

    nan_free: the caller guarantees `scaled` holds no NaN, so integer codes skip the NaN guard."""
    if fmt.element is ElementType.FP4_E2M1:
        return pack_4bit(_fp4_encode(scaled))
    if fmt.is_float:
        # Clamp first: the fp8 casts do not saturate reliably (e4m3fn has no Inf to overflow to).
        return scaled.clamp(fmt.qmin, fmt.qmax).to(fmt.storage_dtype)
    codes = torch.round(scaled)
    if zero_point is not None:
        codes = codes + zero_point
    codes = codes.clamp(fmt.qmin, fmt.qmax)
    if not nan_free:
        # A NaN code only occurs where the group's scale is not finite, which carries the NaN to
        # dequantize (or, with a given scale, where x is NaN); zeroing it keeps the integer cast defined.
        codes = torch.nan_to_num(codes, nan=0.0)
    if fmt.bits == 8:
        return codes.to(fmt.storage_dtype)
    if fmt.symmetric:
        codes = codes + _INT4_SIGNED_OFFSET
    return pack_4bit(codes.to(torch.uint8))


def _decode_elements(data: Tensor, fmt: Format, zero_point: Tensor | None) -> Tensor:
    """`data` -> float32 values in code units (multiply by the scale to get x back)."""
    if fmt.element is ElementType.FP4_E2M1:
        return _fp4_decode(unpack_4bit(data))
    if fmt.bits == 8:
        return data.float()
    codes = unpack_4bit(data).float()
    if zero_point is not None:
        return codes - zero_point
    return codes - _INT4_SIGNED_OFFSET


# -- public entry points ---------------------------------------------------------------------------


def quantize(x: Tensor, fmt: Format | str) -> QuantizedTensor:
    """Quantize `x` (..., K) along its last dim; see the module docstring for the layouts."""
    fmt = get_format(fmt)
    reason = check_quantizable(x.shape, x.dtype, fmt)
    if reason is not None:
        raise ValueError(f"cannot quantize a {tuple(x.shape)} {x.dtype} tensor as {fmt.name}: {reason}")
    xf = x.float()
    zero_point = None
    global_scale = None
    if fmt.scale_type is ScaleType.E8M0:
        stored = _e8m0_encode(_reduce_max(xf.abs(), fmt), fmt.max_exponent)
        scale = _e8m0_decode(stored)
    elif fmt.global_scale:
        # NVFP4: the fp32 global scale maps the tensor's amax to the largest block scale times the
        # largest element, so block scales use e4m3's whole range.
        global_scale = _max_over_all(xf.abs()) / (_E4M3_MAX * fmt.qmax)
        block_scale = _divide(_reduce_max(xf.abs(), fmt) / fmt.qmax, global_scale)
        stored = block_scale.clamp(max=_E4M3_MAX).to(fmt.scale_dtype)
        scale = stored.float() * global_scale
    elif not fmt.symmetric:
        # The range always includes 0 (as GPTQ does), so 0 is exact and zero_point lies in [0, 15].
        high = _reduce_max(xf, fmt).clamp(min=0)
        low = -_reduce_max(-xf, fmt).clamp(min=0)
        stored, scale = _store_scale((high - low) / fmt.qmax, fmt)
        zero_point = torch.round(_divide(-low, scale)).clamp(0, fmt.qmax)
    elif fmt.is_float:
        stored, scale = _store_scale(_reduce_max(xf.abs(), fmt) / fmt.qmax, fmt)
    else:
        # max(|x| / qmax) is max(|x|) / qmax bit for bit (dividing by a positive constant is monotone,
        # and NaN propagates either way); divided inside the reduction, the scale is the reduction's
        # own output, so the code chain below reads it instead of recomputing amax / qmax (see
        # _divide_where_finite for why the length of that chain matters).
        stored, scale = _store_scale(_reduce_max(xf.abs() / fmt.qmax, fmt), fmt)

    if fmt.is_float or zero_point is not None:
        scaled = _divide(xf, expand_scale(scale, fmt, x.shape))
        zero_point_full = None if zero_point is None else expand_scale(zero_point, fmt, x.shape)
        data = _encode_elements(scaled, fmt, zero_point_full)
    else:
        data = _encode_elements(_divide_where_finite(xf, expand_scale(scale, fmt, x.shape)), fmt, None, nan_free=True)
    return QuantizedTensor(data, stored, zero_point, global_scale)


def quantize_with_scale(x: Tensor, scale: Tensor, fmt: Format | str) -> QuantizedTensor:
    """Quantize `x` with a given scale (a static, calibrated one) instead of one computed from `x`.

    `scale` is float, in the layout `quantize` gives for `fmt` or broadcastable to it (TENSOR:
    (1, ..., 1)). Values beyond the scale's range saturate at the format's largest code. Only
    symmetric formats with fp32/bf16 scales: the others derive more than one number from `x`."""
    fmt = get_format(fmt)
    if not fmt.symmetric or fmt.global_scale or fmt.scale_type not in (ScaleType.FP32, ScaleType.BF16):
        raise ValueError(f"a given scale needs a symmetric format with fp32/bf16 scales, not {fmt.name}")
    reason = check_quantizable(x.shape, x.dtype, fmt)
    if reason is not None:
        raise ValueError(f"cannot quantize a {tuple(x.shape)} {x.dtype} tensor as {fmt.name}: {reason}")
    stored, decoded = _store_scale(scale.float(), fmt)
    data = _encode_elements(_divide(x.float(), expand_scale(decoded, fmt, x.shape)), fmt, None)
    return QuantizedTensor(data, stored, None, None)


def dequantize(q: QuantizedTensor, fmt: Format | str, dtype: torch.dtype = torch.float32) -> Tensor:
    """The tensor `q` stands for, in `dtype`, with the shape of the original x."""
    fmt = get_format(fmt)
    _check_quantized(q, fmt)
    k = q.data.shape[-1] * (2 if fmt.bits == 4 else 1)
    shape = (*q.data.shape[:-1], k)
    scale = scale_to_float(q.scale, fmt)
    if q.global_scale is not None:
        scale = scale * q.global_scale
    zero_point = None if q.zero_point is None else expand_scale(q.zero_point, fmt, shape)
    values = _decode_elements(q.data, fmt, zero_point)
    return (values * expand_scale(scale, fmt, shape)).to(dtype)


def row_chunk(fmt: Format | str, k: int, max_elements: int) -> int:
    """Rows per chunk when a (R, K) tensor is worked on in chunks of at most about `max_elements`
    elements: at least one row, and whole blocks of rows for formats whose scales cover several."""
    fmt = get_format(fmt)
    step = max(1, max_elements // max(k, 1))
    if fmt.per_row_block:
        step = max(fmt.block_rows, step // fmt.block_rows * fmt.block_rows)
    return step


def rows_of(q: QuantizedTensor, fmt: Format | str, start: int, stop: int) -> QuantizedTensor | None:
    """Rows [start, stop) of a quantized (..., R, K) tensor, as a quantized tensor of its own (views),
    or None where the format's scales are not local to rows (TENSOR: one scale for all rows).
    Row-block formats need `start` on a block boundary (a multiple of `block_rows`)."""
    fmt = get_format(fmt)
    if fmt.granularity is Granularity.TENSOR:
        return None
    if fmt.per_row_block:
        if start % fmt.block_rows:
            raise ValueError(f"rows from {start}: not a multiple of the {fmt.block_rows}-row blocks of {fmt.name}")
        scale_rows = slice(start // fmt.block_rows, -(-stop // fmt.block_rows))
    else:
        scale_rows = slice(start, stop)
    zero_point = None if q.zero_point is None else q.zero_point[..., scale_rows, :]
    return QuantizedTensor(q.data[..., start:stop, :], q.scale[..., scale_rows, :], zero_point, q.global_scale)


def fake_quantize(x: Tensor, fmt: Format | str) -> Tensor:
    """dequantize(quantize(x)) in x's dtype: the numerical effect of the format on x."""
    return dequantize(quantize(x, fmt), fmt, x.dtype)


# -- attention -------------------------------------------------------------------------------------

LOG2E = 1.4426950408889634  # scores are taken in base 2: exp(x) = exp2(x * LOG2E)


def smooth_keys(k: Tensor, block_rows: int) -> Tensor:
    """K (..., S, D) in float32 minus the per-channel mean of its first `block_rows` tokens.

    Softmax is unchanged (q . c is the same for every key of a query row), and a channel offset
    shared by all tokens no longer takes K's quantization range. The first block, not the whole
    sequence: every kernel program (and every split of a long KV) reads it at no extra pass over K."""
    kf = k.float()
    # narrow to min(S, block_rows) rows without asking which is smaller: slicing with `:block_rows`
    # guards on S >= block_rows under dynamic shapes, a recompile for sequences shorter than a block
    rows = torch.sym_min(kf.shape[-2], block_rows)
    return kf - kf.narrow(-2, 0, rows).mean(dim=-2, keepdim=True)


_FLOAT32_MAX = torch.finfo(torch.float32).max


def _mask_in_base_2(mask: Tensor) -> Tensor:
    """An additive mask times log2(e); a finite fill such as finfo.min stays finite (it would overflow
    to -inf, and a row masked entirely would give 0 instead of eager's average of all values)."""
    scaled = (mask * LOG2E).clamp(min=-_FLOAT32_MAX)
    return torch.where(mask == float("-inf"), mask, scaled)


def attention_quantized_probabilities(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Tensor | None,
    is_causal: bool,
    scale: float | None,
    enable_gqa: bool,
    fmt: Format | str,
) -> Tensor:
    """softmax(q k^T * scale + mask) v in float32 with the probabilities P quantized to `fmt`'s
    element (the element of the PV product), as `F.scaled_dot_product_attention` otherwise: masks
    (bool: True keeps; float: added), top-left causal, GQA heads repeated; a fully masked row gives 0.

    P = exp2(s - ceil(max_j s)) with s the scores in base 2, so P lies in (0, 1] and a kernel's
    online softmax, whose running max is also an integer, rescales by powers of two (exactly). P is
    stored as codes of P * qmax (scale 1/qmax); the row sum l is taken in fp32 before rounding.
    """
    fmt = get_format(fmt)
    q, k, v = q.float(), k.float(), v.float()
    if enable_gqa and k.shape[-3] != q.shape[-3]:
        group = q.shape[-3] // k.shape[-3]
        k, v = k.repeat_interleave(group, dim=-3), v.repeat_interleave(group, dim=-3)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    scores = (q @ k.transpose(-2, -1)) * (scale * LOG2E)
    if is_causal:
        keep = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + _mask_in_base_2(attn_mask.float())
    row_max = torch.ceil(scores.amax(dim=-1, keepdim=True))
    row_max = torch.where(row_max == float("-inf"), 0.0, row_max)  # fully masked row: P = 0
    p = torch.exp2(scores - row_max)
    row_sum = p.sum(dim=-1, keepdim=True)
    codes = _decode_elements(_encode_elements(p * fmt.qmax, fmt, None), fmt, None)
    out = (codes @ v) / (row_sum * fmt.qmax)
    return torch.where(row_sum == 0, 0.0, out)


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    fmt: str = "attn_fp8_t128",
) -> Tensor:
    """Quantized attention in float32, the numerical definition of an attention format (a
    `formats.AttentionFormat`, or a plain Format for q, k and v): K smoothed if the format says
    so, q, k, v fake-quantized, then SDPA math with quantized or fp32 probabilities."""
    attention_format = get_attention_format(fmt)
    q_fmt, k_fmt, v_fmt = attention_format.formats
    if attention_format.smooth_k:
        k = smooth_keys(k, k_fmt.block_rows or k.shape[-2])
    q, k, v = (fake_quantize(t.float(), f) for t, f in ((q, q_fmt), (k, k_fmt), (v, v_fmt)))
    if attention_format.quantize_probabilities:
        return attention_quantized_probabilities(q, k, v, attn_mask, is_causal, scale, enable_gqa, v_fmt)
    mask = attn_mask if attn_mask is None or attn_mask.dtype == torch.bool else attn_mask.float()
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa
    )
