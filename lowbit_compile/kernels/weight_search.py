"""The int4 weight scale search (`lowbit_compile.weight_search`) as one Triton kernel.

The torch implementation evaluates the shrink grid and the least-squares rounds as whole-tensor
ops over chunks of rows: ~350 launches per 16 Mi elements, so on a GPU it is bound by launches
(a 14336 x 4096 weight: ~10k launches, 0.2 s; a Llama-3-8B-shaped model ~26 s of compile time,
benchmarks/RESULTS.md). Here each program loads a block of groups once and runs the whole search in
registers: one launch per weight, memory traffic of about one read of the weight and one write of
the codes.

Same search, same rules (`weight_search`'s docstring): the shrink grid with the first minimum
kept, `steps` alternating least-squares rounds each kept only if it lowers the error, and a group
keeps round-to-nearest's result (given, from `reference.quantize`) unless the search is strictly
better and every number is finite. Divisions are IEEE (`div_rn`) and rounding is half to even, as
torch's; only the order of the additions inside a group's sums differs from torch's, so a near tie
of two grid factors may resolve the other way (the tests bound the effect on the error).
"""

from __future__ import annotations

import contextlib

import torch

from lowbit_compile.formats import Format

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is optional
    triton = None
    tl = None

# Groups per program: a [BLOCK_GROUPS, group] fp32 tile of 2048 elements per 4 warps (16 per thread).
ELEMENTS_PER_PROGRAM = 2048
NUM_WARPS = 4

if triton is not None:

    @triton.jit
    def _finite(x):
        return (x - x) == 0.0  # NaN for an Inf or NaN, 0 otherwise

    @triton.jit
    def _round_even(x, QMIN: tl.constexpr, QMAX: tl.constexpr):
        """torch.round (half to even) then clamp to [QMIN, QMAX]. Clamped to one step beyond the
        range first, so adding and removing 1.5 * 2**23 rounds exactly in fp32 (|x| < 2**22); the
        final clamp gives what clamping torch.round(x) gives."""
        x = tl.minimum(tl.maximum(x, QMIN - 1.0), QMAX + 1.0)
        rounded = (x + 12582912.0) - 12582912.0
        return tl.minimum(tl.maximum(rounded, QMIN), QMAX)

    @triton.jit
    def _encode(w, scale, zero, ASYM: tl.constexpr, QMIN: tl.constexpr, QMAX: tl.constexpr):
        """weight_search._encode: nearest codes (float) of w [B, g] for per-group scale / zero [B]."""
        scaled = tl.where(scale[:, None] == 0.0, 0.0, tl.math.div_rn(w, scale[:, None]))
        if ASYM:
            scaled = scaled + zero[:, None]
        return _round_even(scaled, QMIN, QMAX)

    @triton.jit
    def _error(w, codes, scale, zero, imp, ASYM: tl.constexpr):
        """weight_search._error: sum over the group of imp * ((codes - zero) * scale - w)**2."""
        if ASYM:
            values = codes - zero[:, None]
        else:
            values = codes
        diff = values * scale[:, None] - w
        return tl.sum(diff * diff * imp, 1)

    @triton.jit
    def _least_squares(w, codes, scale, zero, imp, ASYM: tl.constexpr):
        """weight_search._(weighted_)least_squares: the (scale, zero) minimising the (weighted) error
        for fixed codes; the old values where the regression is degenerate. Unweighted is imp = 1."""
        if ASYM:
            total = tl.sum(imp, 1)
            c_mean = tl.math.div_rn(tl.sum(imp * codes, 1), total)
            w_mean = tl.math.div_rn(tl.sum(imp * w, 1), total)
            dc = codes - c_mean[:, None]
            var = tl.sum(imp * dc * dc, 1)
            slope = tl.math.div_rn(tl.sum(imp * dc * (w - w_mean[:, None]), 1), var)
            ok = (total > 0) & (var > 0) & (slope > 0) & _finite(slope)
            slope = tl.where(ok, slope, scale)
            new_zero = tl.where(ok, c_mean - tl.math.div_rn(w_mean, slope), zero)
        else:
            denom = tl.sum(imp * codes * codes, 1)
            new_scale = tl.math.div_rn(tl.sum(imp * codes * w, 1), denom)
            ok = (denom > 0) & (new_scale > 0) & _finite(new_scale)
            slope = tl.where(ok, new_scale, scale)
            new_zero = zero
        return slope, new_zero

    @triton.jit
    def search_groups_kernel(
        w_ptr, imp_ptr, grid_ptr, rtn_codes_ptr, rtn_scale_ptr, rtn_zero_ptr, codes_ptr, scale_ptr, zero_ptr,
        n_groups, groups_per_row,
        GROUP: tl.constexpr, BLOCK_GROUPS: tl.constexpr, N_GRID: tl.constexpr, STEPS: tl.constexpr,
        ASYM: tl.constexpr, WEIGHTED: tl.constexpr, QMIN: tl.constexpr, QMAX: tl.constexpr,
    ):  # fmt: skip
        """Groups of GROUP consecutive elements of a contiguous (rows, K) weight, BLOCK_GROUPS per
        program: the searched codes (uint8 as stored: symmetric codes + 8), scale and zero point of
        each, or round-to-nearest's where the search does not win."""
        groups = tl.program_id(0) * BLOCK_GROUPS + tl.arange(0, BLOCK_GROUPS)
        live = groups < n_groups
        cols = tl.arange(0, GROUP)
        offs = groups.to(tl.int64)[:, None] * GROUP + cols[None, :]
        tile_mask = live[:, None] & (cols[None, :] < GROUP)
        w = tl.load(w_ptr + offs, mask=tile_mask, other=0.0).to(tl.float32)
        if WEIGHTED:
            channel = (groups % groups_per_row)[:, None] * GROUP + cols[None, :]
            imp = tl.load(imp_ptr + channel, mask=tile_mask, other=0.0)
        else:
            imp = tl.full((BLOCK_GROUPS, GROUP), 1.0, tl.float32)
        # Step 1: the shrink grid; the first factor with the smallest error (torch's argmin).
        if ASYM:
            high = tl.maximum(tl.max(w, 1), 0.0)
            low = tl.minimum(tl.min(w, 1), 0.0)
            span = high - low
        else:
            span = tl.max(tl.abs(w), 1)
        best_scale = tl.zeros((BLOCK_GROUPS,), tl.float32)
        best_zero = tl.zeros((BLOCK_GROUPS,), tl.float32)
        best_err = tl.full((BLOCK_GROUPS,), float("inf"), tl.float32)
        for i in range(N_GRID):
            f = tl.load(grid_ptr + i)
            scale = tl.math.div_rn(span * f, QMAX * 1.0)
            if ASYM:
                ratio = tl.math.div_rn(-low * f, scale)
                zero = _round_even(tl.where(scale == 0.0, 0.0, ratio), 0.0, QMAX * 1.0)
            else:
                zero = best_zero
            err = _error(w, _encode(w, scale, zero, ASYM, QMIN, QMAX), scale, zero, imp, ASYM)
            take = err < best_err  # (a NaN error, from non-finite weights, keeps RTN below anyway)
            best_scale = tl.where(take, scale, best_scale)
            best_zero = tl.where(take, zero, best_zero)
            best_err = tl.where(take, err, best_err)
        scale, zero, err = best_scale, best_zero, best_err
        # Step 2: alternate least-squares (scale, zero) and nearest codes, keeping improvements.
        for _ in range(STEPS):
            codes = _encode(w, scale, zero, ASYM, QMIN, QMAX)
            new_scale, new_zero = _least_squares(w, codes, scale, zero, imp, ASYM)
            new_err = _error(w, _encode(w, new_scale, new_zero, ASYM, QMIN, QMAX), new_scale, new_zero, imp, ASYM)
            better = new_err < err
            scale = tl.where(better, new_scale, scale)
            zero = tl.where(better, new_zero, zero)
            err = tl.where(better, new_err, err)
        # Against round-to-nearest: strictly better, and RTN's scale positive and finite.
        rtn_codes = tl.load(rtn_codes_ptr + offs, mask=tile_mask, other=0)
        s0 = tl.load(rtn_scale_ptr + groups, mask=live, other=0.0)
        if ASYM:
            z0 = tl.load(rtn_zero_ptr + groups, mask=live, other=0.0)
            rtn_values = rtn_codes.to(tl.float32) - z0[:, None]
        else:
            z0 = zero
            rtn_values = rtn_codes.to(tl.float32) - 8.0
        diff = rtn_values * s0[:, None] - w
        rtn_err = tl.sum(diff * diff * imp, 1)
        use = (err < rtn_err) & (s0 > 0) & _finite(s0) & _finite(scale)
        if ASYM:
            use = use & _finite(zero)
        searched = _encode(w, scale, zero, ASYM, QMIN, QMAX)
        if not ASYM:
            searched = searched + 8.0  # signed int4 code c is stored as c + 8
        codes = tl.where(use[:, None], searched, rtn_codes.to(tl.float32))
        tl.store(codes_ptr + offs, codes.to(tl.uint8), mask=tile_mask)
        tl.store(scale_ptr + groups, tl.where(use, scale, s0), mask=live)
        if ASYM:
            tl.store(zero_ptr + groups, tl.where(use, zero, z0), mask=live)


def supports(fmt: Format) -> bool:
    """Group formats whose group is a power of two up to 256 (the int4 g32/64/128 formats); row
    scales (one group per row) keep the torch search."""
    g = fmt.group_size
    return triton is not None and g is not None and 16 <= g <= 256 and g & (g - 1) == 0


def search_groups(
    w: torch.Tensor,
    rtn_codes: torch.Tensor,
    rtn_scale: torch.Tensor,
    rtn_zero: torch.Tensor | None,
    fmt: Format,
    grid: torch.Tensor,
    steps: int,
    importance: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The search over a contiguous (rows, K) weight `w` (any float dtype): uint8 codes (rows, K) as
    stored (not packed), fp32 scale and zero point (rows, K // g) (zero None for symmetric formats).
    rtn_*: round-to-nearest's codes (uint8, unpacked), scale and zero point, as `reference.quantize`
    gives them; grid: the fp32 shrink factors; importance: (K,) fp32 channel weights or None."""
    rows, k = w.shape
    g = fmt.group_size
    n_groups = rows * (k // g)
    codes = torch.empty((rows, k), dtype=torch.uint8, device=w.device)
    scale = torch.empty((rows, k // g), dtype=torch.float32, device=w.device)
    zero = None if fmt.symmetric else torch.empty_like(scale)
    block = max(1, ELEMENTS_PER_PROGRAM // g)
    imp = importance if importance is not None else scale  # unread when not WEIGHTED
    rtn_zero_arg = rtn_zero if rtn_zero is not None else rtn_scale
    with torch.cuda.device(w.device) if w.is_cuda else contextlib.nullcontext():
        search_groups_kernel[(triton.cdiv(n_groups, block),)](
            w, imp, grid, rtn_codes, rtn_scale, rtn_zero_arg, codes, scale, zero if zero is not None else scale,
            n_groups, k // g,
            GROUP=g, BLOCK_GROUPS=block, N_GRID=grid.numel(), STEPS=steps, ASYM=not fmt.symmetric,
            WEIGHTED=importance is not None, QMIN=float(fmt.qmin), QMAX=float(fmt.qmax), num_warps=NUM_WARPS,
        )  # fmt: skip
    return codes, scale, zero
