"""Probe for the int4 GEMV (issue 5, M=1): how fast can reading the int4 weight be, and how close
does a GEMV on a K-major word layout come to it?

    PYTHONPATH=. python benchmarks/experiments/gemv_probe.py --out $OUT     (GPU)
    TRITON_INTERPRET=1 PYTHONPATH=. python benchmarks/experiments/gemv_probe.py --check   (CPU)

Kernels:
- `floor_kernel`: reads the codes (N*K/2 bytes) and the fp32 scales and zero points, sums them per
  row: the time any int4 GEMV needs at least, for a load structure (tile, split).
- `gemv4_kernel`: GEMV on the weight stored K-major as int32 words, w_t[K/8, N] (word i of column n
  holds elements 8i..8i+7 of row n, nibble j = element 8i+j), scales and zero points [K/G, N]. A
  thread holds words of one K position for several columns, so x is loaded once per thread and
  shared by its columns; each nibble becomes a float by one and-or into the bits of 2**23 (placed at
  mantissa bit 12 or 16 by one of four shifts of the word), its 2**23 * x term subtracted once per
  word. Split-K programs write fp32 partials; the last program of a column tile to finish (a counter)
  sums them and writes the output, so there is one launch.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
from pathlib import Path

import torch
import triton
import triton.language as tl

from lowbit_compile.kernels.weight_only import _add_nibble_products


@triton.jit
def floor_kernel(w_ptr, s_ptr, out_ptr, N, KB, G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KB: tl.constexpr, SPLIT_K: tl.constexpr):
    pid = tl.program_id(0)
    pid_k = pid % SPLIT_K
    pid_n = pid // SPLIT_K
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    slice_kb = tl.cdiv(tl.cdiv(KB, BLOCK_KB), SPLIT_K) * BLOCK_KB
    acc = tl.zeros((BLOCK_N, BLOCK_KB), tl.int32)
    sacc = tl.zeros((BLOCK_N,), tl.float32)
    for kb in range(pid_k * slice_kb, tl.minimum(pid_k * slice_kb + slice_kb, KB), BLOCK_KB):
        offs_k = kb + tl.arange(0, BLOCK_KB)
        acc += tl.load(w_ptr + offs_n[:, None] * KB + offs_k[None, :]).to(tl.int32)
        offs_g = kb * 8 // G + tl.arange(0, BLOCK_KB * 8 // G)  # two fp32 per group: scale + zero
        sacc += tl.sum(tl.load(s_ptr + offs_n[:, None] * (KB * 8 // G) + offs_g[None, :]), axis=1)
    total = tl.sum(acc, axis=1).to(tl.float32) + sacc
    tl.atomic_add(out_ptr + offs_n, total, sem="relaxed")


@triton.jit
def _tile_loads(w_ptr, s_ptr, z_ptr, kw0, kw_end, offs_n, n_mask, N, GROUP: tl.constexpr, ZERO_POINT: tl.constexpr,
                EVEN: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr):
    """The words [BLOCK_KW, BLOCK_N] at kw0 and their scales and zero points: [1, BLOCK_N] when the
    tile lies in one group (one row, loaded straight into the tile's layout), else per word."""
    kw = kw0 + tl.arange(0, BLOCK_KW)
    if EVEN:
        mask = n_mask[None, :]
    else:
        mask = (kw < kw_end)[:, None] & n_mask[None, :]
    w = tl.load(w_ptr + kw[:, None] * N + offs_n[None, :], mask=mask, other=0)
    if BLOCK_KW * 8 <= GROUP:
        s_offs = (kw0 * 8 // GROUP) * N + offs_n[None, :]
        s_mask = n_mask[None, :] & ((offs_n * 0 + kw0) < kw_end)[None, :]
    else:
        s_offs = (kw * 8 // GROUP)[:, None] * N + offs_n[None, :]
        s_mask = mask
    s = tl.load(s_ptr + s_offs, mask=s_mask, other=0.0)
    if ZERO_POINT:
        z = tl.load(z_ptr + s_offs, mask=s_mask, other=0.0)
    else:
        z = s
    return w, s, z


@triton.jit
def gemv4_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, out_ptr, part_ptr, count_ptr,
    M, N, K, stride_xm, stride_om, KW_SLICE,
    GROUP: tl.constexpr, ZERO_POINT: tl.constexpr, EVEN: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr, SPLIT_K: tl.constexpr, ASM: tl.constexpr,
    PREFETCH: tl.constexpr = False, STAGES: tl.constexpr = 1,
):  # fmt: skip
    pid = tl.program_id(0)
    pid_k = pid % SPLIT_K
    tile = pid // SPLIT_K
    tiles_n = tl.cdiv(N, BLOCK_N)
    pid_n = tile % tiles_n
    pid_m = tile // tiles_n
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    KW = K // 8
    kw_begin = pid_k * KW_SLICE
    kw_end = tl.minimum(kw_begin + KW_SLICE, KW)
    x_row = x_ptr + pid_m * stride_xm
    acc = tl.zeros((BLOCK_KW, BLOCK_N), tl.float32)
    if PREFETCH:  # registers hold the next tile's loads while this one computes
        w_next, s_next, z_next = _tile_loads(w_ptr, s_ptr, z_ptr, kw_begin, kw_end, offs_n, n_mask, N, GROUP, ZERO_POINT, False, BLOCK_N, BLOCK_KW)
    for kw0 in tl.range(kw_begin, kw_end, BLOCK_KW, num_stages=STAGES):
        kw = kw0 + tl.arange(0, BLOCK_KW)
        x_ptrs = x_row + kw * 8  # x as [BLOCK_KW, 1]: fewer elements than threads, so the compiler
        # loads it straight into the weight tile's layout (each thread its own K positions) instead of
        # converting a tile through shared memory
        if PREFETCH:
            w, s, z = w_next, s_next, z_next
            w_next, s_next, z_next = _tile_loads(w_ptr, s_ptr, z_ptr, kw0 + BLOCK_KW, kw_end, offs_n, n_mask, N, GROUP, ZERO_POINT, False, BLOCK_N, BLOCK_KW)
        else:
            w, s, z = _tile_loads(w_ptr, s_ptr, z_ptr, kw0, kw_end, offs_n, n_mask, N, GROUP, ZERO_POINT, EVEN, BLOCK_N, BLOCK_KW)
        # sum_j c_j x_j = (lo - 2**23 x_lo) / 2**12 + (hi - 2**23 x_hi) / 2**16, where lo / hi collect the
        # nibbles placed at mantissa bit 12 / 16. Scales are stored times 2**-16 and zero points times
        # 2**16 (exact), so a word adds s' * (16 lo + hi - 2**23 (16 x_lo + x_hi) - z' (x_lo + x_hi)).
        x_lo = tl.zeros((BLOCK_KW, 1), tl.float32)
        x_hi = tl.zeros((BLOCK_KW, 1), tl.float32)
        for j in tl.static_range(8):
            if EVEN:
                xj = tl.load(x_ptrs + j).to(tl.float32)[:, None]
            else:
                xj = tl.load(x_ptrs + j, mask=kw < kw_end, other=0.0).to(tl.float32)[:, None]
            if j == 0 or j == 1 or j == 3 or j == 5:
                x_lo += xj
            else:
                x_hi += xj
        magic = -8388608.0 * (16.0 * x_lo + x_hi)
        if ZERO_POINT:
            hi = magic - z * (x_lo + x_hi)
        else:
            hi = tl.broadcast_to(magic - 524288.0 * (x_lo + x_hi), (BLOCK_KW, BLOCK_N))  # z' = 8 * 2**16
        lo = tl.zeros((BLOCK_KW, BLOCK_N), tl.float32)
        for j in tl.static_range(8):
            if EVEN:  # (the same loads as above: the compiler loads once)
                xj = tl.load(x_ptrs + j).to(tl.float32)[:, None]
            else:
                xj = tl.load(x_ptrs + j, mask=kw < kw_end, other=0.0).to(tl.float32)[:, None]
            lo, hi = _add_nibble_products(lo, hi, w, xj, j, ASM)
        acc += s * (16.0 * lo + hi)
    total = tl.sum(acc, axis=0)
    out_ptrs = out_ptr + pid_m * stride_om + offs_n
    if SPLIT_K == 1:
        tl.store(out_ptrs, total.to(out_ptr.dtype.element_ty), mask=n_mask)
    else:
        # partials [tiles, SPLIT_K, BLOCK_N]; the last program of the tile to arrive sums them
        tl.store(part_ptr + (tile * SPLIT_K + pid_k) * BLOCK_N + tl.arange(0, BLOCK_N), total)
        tl.debug_barrier()
        arrived = tl.atomic_add(count_ptr + tile, 1, sem="acq_rel", scope="gpu")
        if arrived == SPLIT_K - 1:
            summed = tl.zeros((BLOCK_N,), tl.float32)
            for i in tl.static_range(SPLIT_K):
                summed += tl.load(part_ptr + (tile * SPLIT_K + i) * BLOCK_N + tl.arange(0, BLOCK_N), cache_modifier=".cg")
            tl.store(out_ptrs, summed.to(out_ptr.dtype.element_ty), mask=n_mask)
            tl.atomic_xchg(count_ptr + tile, 0, sem="relaxed", scope="gpu")


@triton.jit
def gemv4_rows_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, out_ptr, part_ptr, count_ptr,
    M, N, K, stride_xm, stride_wn, stride_sn, stride_om, KW_SLICE,
    GROUP: tl.constexpr, ZERO_POINT: tl.constexpr, EVEN: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr, SPLIT_K: tl.constexpr, ASM: tl.constexpr,
    FINISH: tl.constexpr,  # split-K: 1 = the last program sums the partials (counter), 0 = a second kernel does
    ONE_WORD: tl.constexpr = False,  # 4-byte loads: a thread holds one word of several rows (x shared by them)
):  # fmt: skip
    """The same GEMV on the reference layout: w (N, K/2) bytes read as int32 words (N, K/8), scales
    and zero points (N, K/G). Tiles [BLOCK_N, BLOCK_KW] words; x as [1, BLOCK_KW] rows and scales
    as [BLOCK_N, 1] columns (fewer elements than threads: loaded straight into the tile's layout)."""
    pid = tl.program_id(0)
    pid_k = pid % SPLIT_K
    tile = pid // SPLIT_K
    tiles_n = tl.cdiv(N, BLOCK_N)
    pid_n = tile % tiles_n
    pid_m = tile // tiles_n
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_n = tl.where(n_mask, offs_n, 0)  # rows past N read row 0 (contiguity is along K here)
    KW = K // 8
    kw_begin = pid_k * KW_SLICE
    kw_end = tl.minimum(kw_begin + KW_SLICE, KW)
    x_row = x_ptr + pid_m * stride_xm
    acc = tl.zeros((BLOCK_N, BLOCK_KW), tl.float32)
    for kw0 in range(kw_begin, kw_end, BLOCK_KW):
        if ONE_WORD:
            kw = kw0 + (tl.arange(0, BLOCK_KW) ^ 0)
        else:
            kw = kw0 + tl.arange(0, BLOCK_KW)
        if EVEN:
            w = tl.load(w_ptr + offs_n[:, None] * stride_wn + kw[None, :])
        else:
            w = tl.load(w_ptr + offs_n[:, None] * stride_wn + kw[None, :], mask=(kw < kw_end)[None, :], other=0)
        if BLOCK_KW * 8 <= GROUP:
            s_offs = offs_n[:, None] * stride_sn + kw0 * 8 // GROUP
        else:
            s_offs = offs_n[:, None] * stride_sn + (kw * 8 // GROUP)[None, :]
        s = tl.load(s_ptr + s_offs) * (1.0 / 65536.0)
        x_ptrs = x_row + kw[None, :] * 8
        x_lo = tl.zeros((1, BLOCK_KW), tl.float32)
        x_hi = tl.zeros((1, BLOCK_KW), tl.float32)
        for j in tl.static_range(8):
            if EVEN:
                xj = tl.load(x_ptrs + j).to(tl.float32)
            else:
                xj = tl.load(x_ptrs + j, mask=(kw < kw_end)[None, :], other=0.0).to(tl.float32)
            if j == 0 or j == 1 or j == 3 or j == 5:
                x_lo += xj
            else:
                x_hi += xj
        magic = -8388608.0 * (16.0 * x_lo + x_hi)
        if ZERO_POINT:
            z = tl.load(z_ptr + s_offs) * 65536.0
            hi = magic - z * (x_lo + x_hi)
        else:
            hi = tl.broadcast_to(magic - 524288.0 * (x_lo + x_hi), (BLOCK_N, BLOCK_KW))
        lo = tl.zeros((BLOCK_N, BLOCK_KW), tl.float32)
        for j in tl.static_range(8):
            if EVEN:
                xj = tl.load(x_ptrs + j).to(tl.float32)
            else:
                xj = tl.load(x_ptrs + j, mask=(kw < kw_end)[None, :], other=0.0).to(tl.float32)
            lo, hi = _add_nibble_products(lo, hi, w, xj, j, ASM)
        acc += s * (16.0 * lo + hi)
    total = tl.sum(acc, axis=1)
    out_ptrs = out_ptr + pid_m * stride_om + offs_n
    if SPLIT_K == 1:
        tl.store(out_ptrs, total.to(out_ptr.dtype.element_ty), mask=n_mask)
    elif FINISH == 0:  # partials [SPLIT_K, M, N], summed by common.splitk_sum_kernel
        tl.store(part_ptr + (pid_k * M + pid_m) * N + offs_n, total, mask=n_mask)
    else:
        tl.store(part_ptr + (tile * SPLIT_K + pid_k) * BLOCK_N + tl.arange(0, BLOCK_N), total)
        tl.debug_barrier()
        arrived = tl.atomic_add(count_ptr + tile, 1, sem="acq_rel", scope="gpu")
        if arrived == SPLIT_K - 1:
            summed = tl.zeros((BLOCK_N,), tl.float32)
            for i in tl.static_range(SPLIT_K):
                summed += tl.load(part_ptr + (tile * SPLIT_K + i) * BLOCK_N + tl.arange(0, BLOCK_N), cache_modifier=".cg")
            tl.store(out_ptrs, summed.to(out_ptr.dtype.element_ty), mask=n_mask)
            tl.atomic_xchg(count_ptr + tile, 0, sem="relaxed", scope="gpu")


def gemv4_rows(x, data, scale, zero, group, block_n, block_kw, split_k, num_warps=4, out=None, finish=1, one_word=False):
    """x (M, K) @ int4 weight in the reference layout: data (N, K/2) uint8, scale / zero (N, K/G)."""
    from lowbit_compile.kernels import common

    m, k = x.shape
    n = data.shape[0]
    words = data.view(torch.int32)
    kw_total = k // 8
    kw_slice = triton.cdiv(triton.cdiv(kw_total, block_kw), split_k) * block_kw
    tiles = m * triton.cdiv(n, block_n)
    if out is None:
        out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if split_k > 1 and not finish:
        part = torch.empty(split_k * m * n, dtype=torch.float32, device=x.device)
        count = part
    else:
        key = (x.device, tiles, split_k, block_n)
        if key not in _workspace:
            _workspace[key] = (
                torch.empty(tiles * split_k * block_n, dtype=torch.float32, device=x.device),
                torch.zeros(tiles, dtype=torch.int32, device=x.device),
            )
        part, count = _workspace[key]
    gemv4_rows_kernel[(tiles * split_k,)](
        x, words, scale, zero if zero is not None else scale, out, part, count,
        m, n, k, x.stride(0), words.stride(0), scale.stride(0), out.stride(0), kw_slice,
        GROUP=group, ZERO_POINT=zero is not None, EVEN=kw_total % kw_slice == 0 and kw_slice % block_kw == 0,
        BLOCK_N=block_n, BLOCK_KW=block_kw, SPLIT_K=split_k, ASM=os.environ.get("TRITON_INTERPRET") != "1",
        FINISH=finish, ONE_WORD=one_word, num_warps=num_warps,
    )  # fmt: skip
    if split_k > 1 and not finish:
        common.sum_partials(part, out, split_k, m * n)
    return out


def to_kmajor(data: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None):
    """Reference layout (N, K/2) uint8 -> int32 words [K/8, N]; scales / zeros (N, K/G) -> [K/G, N]."""
    words = data.contiguous().view(torch.int32).t().contiguous()
    scale_t = (scale * 2.0**-16).t().contiguous()
    return words, scale_t, None if zero is None else (zero * 2.0**16).t().contiguous()


_workspace: dict = {}


def gemv4(x, words, scale_t, zero_t, group, block_n, block_kw, split_k, num_warps=4, out=None, prefetch=False, stages=1):
    m, k = x.shape
    n = words.shape[1]
    kw_total = k // 8
    kw_slice = triton.cdiv(triton.cdiv(kw_total, block_kw), split_k) * block_kw
    tiles = m * triton.cdiv(n, block_n)
    if out is None:
        out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    key = (x.device, tiles, split_k, block_n)
    if key not in _workspace:
        _workspace[key] = (
            torch.empty(tiles * split_k * block_n, dtype=torch.float32, device=x.device),
            torch.zeros(tiles, dtype=torch.int32, device=x.device),
        )
    part, count = _workspace[key]
    gemv4_kernel[(tiles * split_k,)](
        x, words, scale_t, zero_t if zero_t is not None else scale_t, out, part, count,
        m, n, k, x.stride(0), out.stride(0), kw_slice,
        GROUP=group, ZERO_POINT=zero_t is not None, EVEN=kw_total % kw_slice == 0 and kw_slice % block_kw == 0,
        BLOCK_N=block_n, BLOCK_KW=block_kw, SPLIT_K=split_k, ASM=os.environ.get("TRITON_INTERPRET") != "1", PREFETCH=prefetch, STAGES=stages, num_warps=num_warps,
    )  # fmt: skip
    return out


def check() -> None:
    from lowbit_compile import reference
    from lowbit_compile.report import sqnr

    torch.manual_seed(0)
    for fmt, (n, k), cfg in itertools.product(
        ("int4_g128_asym", "int4_g32"), ((40, 256), (24, 384)), ((16, 4, 1, 0), (8, 8, 3, 1), (32, 16, 2, 1), (16, 2, 1, 1))
    ):
        bn, bkw, split, prefetch = cfg
        group = 128 if "g128" in fmt else 32
        w = torch.randn(n, k)
        q = reference.quantize(w, fmt)
        x = torch.randn(2, k).to(torch.float16)
        want = x.float() @ reference.dequantize(q, fmt, torch.float32).t()
        words, s_t, z_t = to_kmajor(q.data, q.scale, q.zero_point)
        got = gemv4(x, words, s_t, z_t, group, bn, bkw, split, prefetch=bool(prefetch)).float()
        print(fmt, n, k, (bn, bkw, split, prefetch), f"{sqnr(want, got):.1f} dB")
        assert sqnr(want, got) > 50, "gemv4 mismatch"
        rows_bn, rows_bkw = bkw * 2, bn // 2
        if rows_bkw * 8 > group:
            rows_bkw = group // 8
        got = gemv4_rows(x, q.data, q.scale, q.zero_point, group, rows_bn, rows_bkw, split, finish=prefetch).float()
        print("  rows", (rows_bn, rows_bkw, split, prefetch), f"{sqnr(want, got):.1f} dB")
        assert sqnr(want, got) > 50, "gemv4_rows mismatch"


def sweep(out_dir: Path) -> None:
    import sys

    import torch.nn.functional as F

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from _sweep import bench_rotating

    from lowbit_compile import reference
    from lowbit_compile.formats import get_format
    from lowbit_compile.kernels import common, weight_only
    from lowbit_compile.report import sqnr

    torch.manual_seed(0)
    rows, log = [], open(out_dir / "gemv_probe.log", "w")

    def say(*a):
        print(*a, flush=True)
        print(*a, file=log, flush=True)

    shapes = ((4096, 4096), (14336, 4096), (4096, 14336))
    for fmt in ("int4_g128_asym",):
        for n, k in shapes:
            w = torch.randn(n, k, device="cuda") / k**0.5
            q = reference.quantize(w, fmt)
            x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
            want = x.float() @ reference.dequantize(q, fmt, torch.float32).t()
            copies = common.L2_BYTES // (n * k // 2) + 2
            zero = q.zero_point
            ref_copies = [(q.data.clone(), q.scale.clone(), zero.clone() if zero is not None else torch.empty(0, device="cuda")) for _ in range(copies)]
            km = [to_kmajor(q.data, q.scale, zero) for _ in range(copies)]
            km = [(a.clone(), b.clone(), c.clone() if c is not None else None) for a, b, c in km]
            wb = [w.to(torch.bfloat16).clone() for _ in range(common.L2_BYTES // (n * k * 2) + 2)]
            t_bf16 = bench_rotating([lambda wb=t: F.linear(x, wb) for t in wb])
            res = {"fmt": fmt, "n": n, "k": k, "bf16_us": t_bf16 * 1e3}
            # the kernel on main, every tuner candidate
            meta = weight_only.WeightMeta.of(get_format(fmt), q.data)
            best = None
            for cfg in weight_only._candidates(1, meta):
                out = torch.empty(1, n, dtype=torch.bfloat16, device="cuda")
                try:
                    t = bench_rotating([lambda c=c: weight_only.launch(x, *c, None, out, meta, cfg) for c in ref_copies])
                except Exception as e:  # noqa: BLE001
                    say("main", cfg, "failed", str(e)[:200])
                    continue
                if best is None or t < best[0]:
                    best = (t, cfg)
            res["main_us"], res["main_cfg"] = best[0] * 1e3, str(best[1].as_tuple())
            # floor: read the same bytes
            floor_best = None
            wflat = [c[0].view(torch.int32) for c in ref_copies]
            sz = [torch.cat([c[1], c[2]], 1) if c[2].numel() else torch.cat([c[1], c[1]], 1) for c in ref_copies]
            for bn, bkb, split, warps in itertools.product((8, 16), (128, 256), (2, 4, 8), (4,)):
                if (k // 8) % bkb or bn * bkb < warps * 32 * 4:
                    continue
                o = torch.zeros(n, device="cuda")
                grid = (triton.cdiv(n, bn) * split,)
                t = bench_rotating([lambda i=i: floor_kernel[grid](wflat[i], sz[i], o, n, k // 8, 64, BLOCK_N=bn, BLOCK_KB=bkb, SPLIT_K=split, num_warps=warps) for i in range(copies)])
                if floor_best is None or t < floor_best[0]:
                    floor_best = (t, (bn, bkb, split, warps))
            res["floor_us"], res["floor_cfg"] = floor_best[0] * 1e3, str(floor_best[1])
            # gemv4 on the K-major word layout
            g_all = []
            configs = []
            for bn, bkw, split, warps, prefetch in itertools.product((64, 128), (8, 16, 32), (2, 4, 8, 16, 32), (4, 8), (0, 1)):
                iters = (k // 8) // bkw // split
                if bn * bkw < warps * 32 * 4 or iters < 1 or (prefetch and iters < 2) or bn * bkw > 4096:
                    continue
                configs.append((bn, bkw, split, warps, prefetch, 1))
            configs += [(64, 8, 16, 4, 0, 3), (64, 16, 8, 4, 0, 3), (128, 16, 4, 4, 0, 3), (64, 16, 4, 4, 0, 3)]
            for bn, bkw, split, warps, prefetch, stages in configs:
                out = torch.empty(1, n, dtype=torch.bfloat16, device="cuda")
                kw_args = dict(out=out, prefetch=bool(prefetch), stages=stages)
                try:
                    got = gemv4(x, *km[0], 128, bn, bkw, split, warps, **kw_args).float()
                    db = sqnr(want, got)
                    t = bench_rotating([lambda c=c: gemv4(x, *c, 128, bn, bkw, split, warps, **kw_args) for c in km])
                except Exception as e:  # noqa: BLE001
                    say("gemv4", (bn, bkw, split, warps, prefetch, stages), "failed", str(e)[:300])
                    continue
                g_all.append((t, (bn, bkw, split, warps, prefetch, stages), db))
            g_all.sort()
            res["gemv4_us"], res["gemv4_cfg"], res["gemv4_db"] = g_all[0][0] * 1e3, str(g_all[0][1]), g_all[0][2]
            res["gemv4_min_db"] = min(d for _, _, d in g_all)
            res["gemv4_top"] = [(round(t * 1e3, 2), c) for t, c, _ in g_all[:8]]
            res["gemv4_best_no_prefetch"] = next((round(t * 1e3, 2), c) for t, c, _ in g_all if not c[4])
            res["gemv4_best_stages"] = min(((round(t * 1e3, 2), c) for t, c, _ in g_all if c[5] > 1), default=None)
            # symmetric codes (no zero points), the top configs only
            if fmt == "int4_g128_asym":
                qs = reference.quantize(w, "int4_g128")
                want_s = x.float() @ reference.dequantize(qs, "int4_g128", torch.float32).t()
                kms = [to_kmajor(qs.data.clone(), qs.scale.clone(), None) for _ in range(copies)]
                sym = []
                for _, (bn, bkw, split, warps, prefetch, stages), _ in g_all[:8]:
                    out = torch.empty(1, n, dtype=torch.bfloat16, device="cuda")
                    kw_args = dict(out=out, prefetch=bool(prefetch), stages=stages)
                    db = sqnr(want_s, gemv4(x, *kms[0], 128, bn, bkw, split, warps, **kw_args).float())
                    t = bench_rotating([lambda c=c: gemv4(x, *c, 128, bn, bkw, split, warps, **kw_args) for c in kms])
                    sym.append((t, (bn, bkw, split, warps, prefetch, stages), db))
                sym.sort()
                res["sym_us"], res["sym_cfg"], res["sym_db"] = sym[0][0] * 1e3, str(sym[0][1]), sym[0][2]
                del kms
            say(json.dumps(res))
            rows.append(res)
            del wb, ref_copies, km
            torch.cuda.empty_cache()
    (out_dir / "gemv_probe.json").write_text(json.dumps(rows, indent=1))
    say("| fmt | N x K | bf16 us | main (x bf16) | floor (x bf16) | gemv4 (x bf16) | gemv4 cfg | no prefetch | SQNR dB (min) | sym g128 |")
    say("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        b = r["bf16_us"]
        say(f"| {r['fmt']} | {r['n']}x{r['k']} | {b:.1f} | {b / r['main_us']:.2f}x | {b / r['floor_us']:.2f}x | "
            f"{b / r['gemv4_us']:.2f}x | {r['gemv4_cfg']} | {b / r['gemv4_best_no_prefetch'][0]:.2f}x | "
            f"{r['gemv4_db']:.1f} ({r['gemv4_min_db']:.1f}) | {b / r.get('sym_us', float('nan')):.2f}x |")


def sweep_rows(out_dir: Path) -> None:
    """The reference-layout GEMV against the K-major one (best configs of the first sweeps), with
    split-K finished by the counter or by a second kernel."""
    import sys

    import torch.nn.functional as F

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from _sweep import bench_rotating

    from lowbit_compile import reference
    from lowbit_compile.kernels import common
    from lowbit_compile.report import sqnr

    torch.manual_seed(0)
    log = open(out_dir / "gemv_rows.log", "w")
    table = []

    def say(*a):
        print(*a, flush=True)
        print(*a, file=log, flush=True)

    fmt = "int4_g128_asym"
    for n, k in ((4096, 4096), (14336, 4096), (4096, 14336)):
        w = torch.randn(n, k, device="cuda") / k**0.5
        q = reference.quantize(w, fmt)
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        want = x.float() @ reference.dequantize(q, fmt, torch.float32).t()
        copies = common.L2_BYTES // (n * k // 2) + 2
        rows = [(q.data.clone(), q.scale.clone(), q.zero_point.clone()) for _ in range(copies)]
        km = [to_kmajor(q.data, q.scale, q.zero_point) for _ in range(copies)]
        wb = [w.to(torch.bfloat16).clone() for _ in range(common.L2_BYTES // (n * k * 2) + 2)]
        t_bf16 = bench_rotating([lambda wb=t: F.linear(x, wb) for t in wb])
        out = torch.empty(1, n, dtype=torch.bfloat16, device="cuda")
        results = []
        for bn, bkw, split, warps in ((64, 16, 16, 4), (64, 16, 4, 4), (64, 16, 8, 4), (64, 32, 8, 4)):
            t = bench_rotating([lambda c=c: gemv4(x, *c, 128, bn, bkw, split, warps, out=out) for c in km])
            results.append((t, "kmajor", (bn, bkw, split, warps), sqnr(want, gemv4(x, *km[0], 128, bn, bkw, split, warps).float())))
        for bn, bkw, split, warps, finish in itertools.product((32, 64, 128), (8, 16), (2, 4, 8, 16), (4, 8), (1, 0)):
            if bn * bkw < warps * 32 * 4 or (k // 8) // bkw < split or bn * bkw > 2048:
                continue
            try:
                db = sqnr(want, gemv4_rows(x, *rows[0], 128, bn, bkw, split, warps, finish=finish).float())
                t = bench_rotating([lambda c=c: gemv4_rows(x, *c, 128, bn, bkw, split, warps, out=out, finish=finish) for c in rows])
            except Exception as e:  # noqa: BLE001
                say("rows", (bn, bkw, split, warps, finish), "failed", str(e)[:300])
                continue
            results.append((t, f"rows finish={finish}", (bn, bkw, split, warps), db))
        results.sort()
        for t, kind, cfg, db in results[:12]:
            say(f"{n}x{k} {kind} {cfg} {t * 1e3:.2f} us {t_bf16 / t:.2f}x {db:.1f} dB")
        for kind in ("kmajor", "rows finish=1", "rows finish=0"):
            best = next(r for r in results if r[1] == kind)
            table.append((f"{n}x{k}", kind, best[2], t_bf16 / best[0], best[3]))
        del rows, km, wb
        torch.cuda.empty_cache()
    say("| N x K | kernel | config (BN, BKW, split, warps) | x bf16 | SQNR dB |")
    say("|---|---|---|---|---|")
    for shape, kind, cfg, ratio, db in table:
        say(f"| {shape} | {kind} | {cfg} | {ratio:.2f}x | {db:.1f} |")


def time_package(out_dir: Path) -> None:
    """The package's K-major GEMV (`weight_only.launch_gemv_kmajor`, every candidate) against bf16
    and the reference-layout kernel's candidates, int4 g128 with and without zero points, M=1."""
    import sys

    import torch.nn.functional as F

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from _sweep import bench_rotating

    from lowbit_compile import reference
    from lowbit_compile.formats import get_format
    from lowbit_compile.kernels import common, weight_only
    from lowbit_compile.report import sqnr

    torch.manual_seed(0)
    log = open(out_dir / "gemv_package.log", "w")
    lines = ["| format | N x K | reference layout (best) | K-major GEMV (best) | config | SQNR dB |", "|---|---|---|---|---|---|"]
    for fmt in ("int4_g128_asym", "int4_g128"):
        for n, k in ((4096, 4096), (14336, 4096), (4096, 14336)):
            w = torch.randn(n, k, device="cuda") / k**0.5
            q = reference.quantize(w, fmt)
            zero = q.zero_point if q.zero_point is not None else torch.empty(0, device="cuda")
            x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
            want = x.float() @ reference.dequantize(q, fmt, torch.float32).t()
            copies = common.L2_BYTES // (n * k // 2) + 2
            rows = [(q.data.clone(), q.scale.clone(), zero.clone()) for _ in range(copies)]
            packed = [weight_only.pack_kmajor(*c) for c in rows]
            wb = [w.to(torch.bfloat16).clone() for _ in range(common.L2_BYTES // (n * k * 2) + 2)]
            t_bf16 = bench_rotating([lambda t=t: F.linear(x, t) for t in wb])
            out = torch.empty(1, n, dtype=torch.bfloat16, device="cuda")
            meta = weight_only.WeightMeta.of(get_format(fmt), q.data)
            t_main = min(
                bench_rotating([lambda c=c: weight_only.launch(x, *c, None, out, meta, cfg) for c in rows])
                for cfg in weight_only._candidates(1, meta)
            )
            best = None
            for cfg in weight_only.KMAJOR_GEMV_CANDIDATES:
                t = bench_rotating([lambda c=c: weight_only.launch_gemv_kmajor(x, *c, None, out, 128, cfg) for c in packed])
                if best is None or t < best[0]:
                    best = (t, cfg)
            weight_only.launch_gemv_kmajor(x, *packed[0], None, out, 128, best[1])
            db = sqnr(want, out.float())
            line = f"| {fmt} | {n}x{k} | {t_bf16 / t_main:.2f}x | {t_bf16 / best[0]:.2f}x | {best[1]} | {db:.1f} |"
            print(line, flush=True)
            print(line, file=log, flush=True)
            lines.append(line)
            del rows, packed, wb
            torch.cuda.empty_cache()
    print("\n".join(lines))
    print("\n".join(lines), file=log)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--check", action="store_true")
    parser.add_argument("--rows", action="store_true")
    parser.add_argument("--package", action="store_true")
    parser.add_argument("--out", default="benchmarks/out")
    args = parser.parse_args()
    if args.check:
        check()
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (time_package if args.package else sweep_rows if args.rows else sweep)(out)


if __name__ == "__main__":
    main()
