"""Scale / zero-point search for int4 weights (fold time only; calibration-free unless calibrated).

`reference.quantize` rounds to nearest with the scale set by each group's range (RTN). For 4-bit
weights that wastes most of the 16 levels on a group's one or two outliers. `search_quantize`
returns a quantization of the same weight in EXACTLY the reference layout (packed uint8 data, fp32
scale (N, K//g), fp32 zero point (N, K//g) for the asymmetric formats) that minimises each group's
reconstruction error ||dequantize(q) - w||^2:

1. MSE-optimal clipping: the group's range (asymmetric: [low, high] including 0; symmetric: amax)
   is shrunk by each factor of a small grid (1.0 down to `SHRINK_GRID[-1]`), the weight rounded
   with it, and the factor with the smallest error kept per group;
2. alternating least squares: with the codes fixed, the scale and offset (asymmetric: s, z with
   w ~ (c - z) * s; symmetric: s) that minimise the error are a per-group linear regression
   (closed form); with (s, z) fixed, rounding to the nearest code is optimal. Each half-step can
   only lower the error, so a few rounds refine step 1 (the half-quadratic idea of HQQ, solved
   exactly for the l2 loss).

A group keeps the round-to-nearest result unless the search found a strictly smaller error, so the
error is never larger than RTN's, and groups RTN treats specially (all zero: scale 0; NaN/Inf: a
non-finite scale) are RTN's exactly. Zero points of searched asymmetric groups are finite floats,
not necessarily integers (dequantize computes (code - zero_point) * scale in fp32 either way).

With calibration (`lowbit_compile.calibrate`), the error is weighted per input channel:
sum_k importance_k * (dequantize(q) - w)_k^2, importance_k being the mean square of the activation
that channel k multiplies (activation-aware, a diagonal approximation of the layer's output error;
GPTQ's Hessian diagonal). Both steps then solve the weighted problem; the comparison with RTN uses
the same weighted error.

Only weights go through this, once, at compile time (`passes.state.quantize_weight`); activation
quantization is `reference.quantize` unchanged. Everything is vectorised over groups; rows are
processed in chunks so the grid's temporaries stay bounded (16 MiB each on CPU) for any weight size.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lowbit_compile import reference
from lowbit_compile.formats import ElementType, Format, Granularity, ScaleType, get_format

__all__ = ["SHRINK_GRID", "REFINE_STEPS", "searchable", "search_quantize"]

# Shrink factors of a group's range tried in step 1 (1.0 = round-to-nearest's own range).
SHRINK_GRID: tuple[float, ...] = tuple(round(1.0 - 0.03 * i, 2) for i in range(17))  # 1.00 .. 0.52
REFINE_STEPS = 6  # alternating least-squares rounds in step 2
# Elements of (grid x rows x K) evaluated at once: 16 MiB temporaries on CPU; larger on accelerators,
# where launches, not memory traffic, would otherwise dominate (128 MiB temporaries).
_CHUNK_ELEMENTS = {"cpu": 1 << 22}
_CHUNK_ELEMENTS_DEFAULT = 1 << 25


def searchable(fmt: Format | str) -> bool:
    """Whether `search_quantize` improves on `reference.quantize` for this format: integer 4-bit
    with fp32 group (or row) scales. Other formats quantize round-to-nearest as before."""
    fmt = get_format(fmt)
    return (
        fmt.element is ElementType.INT4
        and fmt.scale_type is ScaleType.FP32
        and fmt.granularity in (Granularity.GROUP, Granularity.ROW)
        and not fmt.global_scale
    )


# The Triton kernel runs the search on CUDA tensors (False: the torch ops below everywhere).
USE_KERNEL = True


def _use_kernel(x: Tensor, fmt: Format) -> bool:
    if not (USE_KERNEL and x.is_cuda):
        return False
    from lowbit_compile.kernels import HAS_TRITON

    if not HAS_TRITON:
        return False
    from lowbit_compile.kernels import weight_search as kernel

    return kernel.supports(fmt)


def _groups(x: Tensor, fmt: Format) -> Tensor:
    """(R, K) float32 -> (R, G, g): the elements that share one scale."""
    if fmt.granularity is Granularity.ROW:
        return x.unsqueeze(-2)
    return x.unflatten(-1, (-1, fmt.group_size))


def _encode(w: Tensor, scale: Tensor, zero: Tensor | None, fmt: Format) -> Tensor:
    """Nearest codes (float) for groups `w` (..., g) with per-group scale / zero point (..., 1)."""
    scaled = torch.where(scale == 0, 0.0, w / scale)
    if zero is not None:
        scaled = scaled + zero
    return torch.round(scaled).clamp(fmt.qmin, fmt.qmax)


def _error(w: Tensor, codes: Tensor, scale: Tensor, zero: Tensor | None, weight: Tensor | None = None) -> Tensor:
    values = codes - zero if zero is not None else codes
    squares = (values * scale - w).square()
    return (squares if weight is None else squares * weight).sum(-1, keepdim=True)


def _least_squares(
    w: Tensor, codes: Tensor, scale: Tensor, zero: Tensor | None, weight: Tensor | None = None
) -> tuple[Tensor, Tensor | None]:
    """The (scale, zero) minimising ||(codes - zero) * scale - w||^2 for fixed codes, per group; the
    old values where the regression is degenerate (all codes equal, or a non-positive slope).
    `weight` (broadcastable to w): per-element weights of the squares (weighted regression)."""
    if weight is not None:
        return _weighted_least_squares(w, codes, scale, zero, weight)
    if zero is None:
        denom = codes.square().sum(-1, keepdim=True)
        new_scale = (codes * w).sum(-1, keepdim=True) / denom
        ok = (denom > 0) & (new_scale > 0) & torch.isfinite(new_scale)
        return torch.where(ok, new_scale, scale), None
    c_mean = codes.mean(-1, keepdim=True)
    w_mean = w.mean(-1, keepdim=True)
    dc = codes - c_mean
    var = dc.square().sum(-1, keepdim=True)
    slope = (dc * (w - w_mean)).sum(-1, keepdim=True) / var
    ok = (var > 0) & (slope > 0) & torch.isfinite(slope)
    slope = torch.where(ok, slope, scale)
    # w ~ slope * c + (w_mean - slope * c_mean) = (c - z) * slope  =>  z = c_mean - w_mean / slope
    new_zero = torch.where(ok, c_mean - w_mean / slope, zero)
    return slope, new_zero


def _weighted_least_squares(
    w: Tensor, codes: Tensor, scale: Tensor, zero: Tensor | None, weight: Tensor
) -> tuple[Tensor, Tensor | None]:
    """`_least_squares` with weighted squares; a group whose weights are all zero keeps its values."""
    weight = weight.expand_as(w)
    if zero is None:
        denom = (weight * codes.square()).sum(-1, keepdim=True)
        new_scale = (weight * codes * w).sum(-1, keepdim=True) / denom
        ok = (denom > 0) & (new_scale > 0) & torch.isfinite(new_scale)
        return torch.where(ok, new_scale, scale), None
    total = weight.sum(-1, keepdim=True)
    c_mean = (weight * codes).sum(-1, keepdim=True) / total
    w_mean = (weight * w).sum(-1, keepdim=True) / total
    dc = codes - c_mean
    var = (weight * dc.square()).sum(-1, keepdim=True)
    slope = (weight * dc * (w - w_mean)).sum(-1, keepdim=True) / var
    ok = (total > 0) & (var > 0) & (slope > 0) & torch.isfinite(slope)
    slope = torch.where(ok, slope, scale)
    new_zero = torch.where(ok, c_mean - w_mean / slope, zero)
    return slope, new_zero


def _search_rows(
    w: Tensor, fmt: Format, grid: Tensor, steps: int, weight: Tensor | None = None
) -> tuple[Tensor, Tensor | None, Tensor]:
    """Best (scale, zero, error) per group of `w` (R, G, g), each (R, G, 1); `weight` (1, G, g)
    weights the squared errors (None: plain)."""
    asym = not fmt.symmetric
    if asym:
        high = w.amax(-1, keepdim=True).clamp(min=0)
        low = w.amin(-1, keepdim=True).clamp(max=0)
    else:
        amax = w.abs().amax(-1, keepdim=True)
    # Step 1: the grid, as an extra leading dim (S, R, G, g).
    f = grid.view(-1, 1, 1, 1)
    wg = w.unsqueeze(0)
    if asym:
        scale = (high - low) * f / fmt.qmax
        zero = torch.round(torch.where(scale == 0, 0.0, -low * f / scale)).clamp(0, fmt.qmax)
    else:
        scale = amax * f / fmt.qmax
        zero = None
    codes = _encode(wg, scale, zero, fmt)
    err = _error(wg, codes, scale, zero, weight)
    best = err.argmin(0, keepdim=True)
    scale = scale.expand_as(err).gather(0, best)[0]
    zero = None if zero is None else zero.expand_as(err).gather(0, best)[0]
    best_err = err.gather(0, best)[0]
    # Step 2: alternate the least-squares (scale, zero) and nearest codes, keeping improvements.
    for _ in range(steps):
        codes = _encode(w, scale, zero, fmt)
        new_scale, new_zero = _least_squares(w, codes, scale, zero, weight)
        new_err = _error(w, _encode(w, new_scale, new_zero, fmt), new_scale, new_zero, weight)
        better = new_err < best_err
        scale = torch.where(better, new_scale, scale)
        if zero is not None:
            zero = torch.where(better, new_zero, zero)
        best_err = torch.where(better, new_err, best_err)
    return scale, zero, best_err


def search_quantize(
    x: Tensor,
    fmt: Format | str,
    grid: tuple[float, ...] = SHRINK_GRID,
    steps: int = REFINE_STEPS,
    importance: Tensor | None = None,
) -> reference.QuantizedTensor:
    """Quantize a weight `x` (..., K) as `fmt` (a `searchable` format) in the reference layout, with
    each group's scale (and zero point) searched to minimise its reconstruction error; never a larger
    error than `reference.quantize` gives, group by group.

    importance: optional non-negative (K,) weights of each input channel's squared error (from
    calibration: the mean square of the activation each column multiplies); None weights all equally."""
    fmt = get_format(fmt)
    if not searchable(fmt):
        raise ValueError(f"search_quantize supports int4 formats with fp32 group/row scales, not {fmt.name}")
    if importance is not None:
        finite = bool(torch.isfinite(importance).all())
        if importance.shape != (x.shape[-1],) or not finite or bool((importance < 0).any()):
            raise ValueError(
                f"importance must be {x.shape[-1]} finite non-negative numbers (one per input channel), got a "
                f"{tuple(importance.shape)} tensor"
            )
    rtn = reference.quantize(x, fmt)  # also checks that x can be quantized as fmt
    shape = x.shape
    rows = x.numel() // shape[-1]
    grid_t = torch.tensor(grid, dtype=torch.float32, device=x.device)
    if _use_kernel(x, fmt):  # the same search as one Triton launch (kernels/weight_search.py)
        from lowbit_compile.kernels import weight_search as kernel

        channel_weights = None if importance is None else importance.float().to(x.device).contiguous()
        codes_k, scale_k, zero_k = kernel.search_groups(
            x.detach().reshape(rows, shape[-1]).contiguous(),
            reference.unpack_4bit(rtn.data).reshape(rows, -1).contiguous(),
            rtn.scale.reshape(rows, -1).contiguous(),
            None if rtn.zero_point is None else rtn.zero_point.reshape(rows, -1).contiguous(),
            fmt, grid_t, steps, channel_weights,
        )  # fmt: skip
        data = reference.pack_4bit(codes_k.reshape(*shape[:-1], shape[-1]))
        zero_out = None if zero_k is None else zero_k.reshape(rtn.zero_point.shape)
        return reference.QuantizedTensor(data, scale_k.reshape(rtn.scale.shape), zero_out, None)
    w_all = _groups(x.detach().float().reshape(-1, shape[-1]), fmt)  # (R, G, g)
    groups = w_all.shape[1]
    rtn_scale = rtn.scale.reshape(rows, groups, 1)
    rtn_zero = None if rtn.zero_point is None else rtn.zero_point.reshape(rows, groups, 1)
    rtn_codes = _groups(reference.unpack_4bit(rtn.data).reshape(rows, -1), fmt)
    rtn_values = rtn_codes.float() - (8 if rtn_zero is None else rtn_zero)
    weight = None if importance is None else _groups(importance.float().to(x.device).reshape(1, -1), fmt)
    budget = _CHUNK_ELEMENTS.get(x.device.type, _CHUNK_ELEMENTS_DEFAULT)
    chunk = max(1, budget // max(1, len(grid) * shape[-1]))
    scales, zeros, codes = [], [], []
    for start in range(0, rows, chunk):  # chunks of rows (not groups): bounded temporaries
        part = slice(start, start + chunk)
        w, s0 = w_all[part], rtn_scale[part]
        z0 = None if rtn_zero is None else rtn_zero[part]
        rtn_squares = (rtn_values[part] * s0 - w).square()
        rtn_err = (rtn_squares if weight is None else rtn_squares * weight).sum(-1, keepdim=True)
        scale, zero, err = _search_rows(w, fmt, grid_t, steps, weight)
        # Keep RTN unless strictly better (NaN errors compare False), and wherever RTN's scale is
        # 0 or non-finite (all-zero or NaN/Inf groups keep their defined results).
        use = (err < rtn_err) & (s0 > 0) & torch.isfinite(s0) & torch.isfinite(scale)
        if zero is not None:
            use = use & torch.isfinite(zero)
        searched = _encode(w, scale, zero, fmt)
        if fmt.symmetric:
            searched = searched + 8  # signed int4 code c is stored as c + 8
        codes.append(torch.where(use, torch.nan_to_num(searched, nan=0.0).to(torch.uint8), rtn_codes[part]))
        scales.append(torch.where(use, scale, s0))
        zeros.append(None if zero is None else torch.where(use, zero, z0))
    data = reference.pack_4bit(torch.cat(codes).reshape(*shape[:-1], shape[-1]))
    scale_out = torch.cat(scales).reshape(rtn.scale.shape).contiguous()
    zero_out = None if rtn_zero is None else torch.cat(zeros).reshape(rtn.zero_point.shape).contiguous()
    return reference.QuantizedTensor(data, scale_out, zero_out, None)
