"""Quantized attention at decode (one query per head against a long KV) without tensor cores.

The packed decode launch of `attention.attention_kernel` runs a GQA group's G query rows (4 for
Llama-3) through 8-bit MMAs padded to 16 rows: every K and V element passes through shared memory
as an MMA operand, and the kernel needs 255 registers at 4 warps, one program per SM, too few warps
to hide the in-register quantization of each tile (0.74-0.78x of bf16 SDPA on an H100,
benchmarks/NOTES-attention.md v6). Here the products are FMAs on the codes' values instead (a
G x 128 x 128 block is 64K multiply-adds, cheap on the FMA pipes), and the tiles stay in the
registers of the load that brought them:

- scores [BLOCK_N, G] = sum over D of K codes [BLOCK_N, D, 1] * Q codes [1, D, G], the group kept
  in each thread's registers (a size-1 dimension of the K tile's layout), D reduced inside a warp;
- PV [Dv, G] = sum over BLOCK_N of V codes [BLOCK_N, Dv, 1] * P codes [BLOCK_N, 1, G], P already
  in the layout the scores' reduction left it in.

The cross-warp steps per K/V block are the two tile amaxes, the score max and sum, and the PV sum.
The next block's K and V are loaded before this one is quantized (Triton pipelines no plain loads
in a loop), so loads are in flight while the program computes.

Numerics are those of `reference.attention` exactly as the MMA kernel's (`attention.py`): codes
and scales per block, products of 8-bit values exact in fp32, only the order of fp32 sums differs.
Scope: query length 1, any GQA group up to MAX_GROUP, every mask kind, causal (top-left: the one
query sees key 0), KV splits combined by `attention.combine_splits_kernel`.
"""

from __future__ import annotations

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is optional
    triton = None
    tl = None

MAX_GROUP = 16  # padded GQA group (q heads per kv head) this kernel takes; larger groups use the MMA path

if triton is not None:
    from lowbit_compile.kernels.attention import _first_block_mean, _inverse, _max_nan, _quantize

    @triton.jit
    def _kv_tile(base, offs_n, in_s, stride_s, stride_d, offs_d, d_valid):
        return tl.load(
            base + offs_n[:, None] * stride_s + offs_d[None, :] * stride_d, mask=in_s[:, None] & d_valid[None, :],
            other=0.0,
        )  # fmt: skip

    @triton.jit
    def _max_keep_nan(a, b):
        """max of two values of any float type (NaN wins), in that type: `_max_nan`'s
        `tl.maximum(propagate_nan=...)` returns fp32 for bf16, which `tl.reduce` rejects."""
        return tl.where((a > b) | (a != a), a, b)

    @triton.jit
    def _amax(x):
        """max |x| over a tile in x's own dtype (exact: the max of bf16 magnitudes is one of them)."""
        return tl.reduce(tl.abs(x), None, _max_keep_nan).to(tl.float32)

    @triton.jit
    def _widen(x, G: tl.constexpr):
        """[N, D] -> [N, D, G] (G in 1, 2, 4, 8, 16) with the G copies in each thread's registers:
        `tl.join` keeps the tile's own layout and adds an in-thread dimension, where an expand_dims
        and broadcast let Triton spread G over threads and re-layout the whole tile through shared
        memory."""
        if G == 1:
            y = x[:, :, None]
        else:
            y = tl.join(x, x)
            if G >= 4:
                y = tl.reshape(tl.join(y, y), (x.shape[0], x.shape[1], 4))
            if G >= 8:
                y = tl.reshape(tl.join(y, y), (x.shape[0], x.shape[1], 8))
            if G >= 16:
                y = tl.reshape(tl.join(y, y), (x.shape[0], x.shape[1], 16))
        return y

    @triton.jit
    def decode_attention_kernel(
        q_ptr, k_ptr, v_ptr, mask_ptr, out_ptr, partial_ptr, stats_ptr,
        S, D, DV, H_KV, GROUP, rows_total, split_len, qk_scale,
        stride_qb, stride_qh, stride_qd,
        stride_kb, stride_kh, stride_ks, stride_kd,
        stride_vb, stride_vh, stride_vs, stride_vd,
        stride_mb, stride_mh, stride_ms,
        KV_BUCKET,  # autotuning key only
        HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, GROUP_PAD: tl.constexpr,
        IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr,
        QK_INT8: tl.constexpr, QK_QMAX: tl.constexpr, V_QMAX: tl.constexpr, SMOOTH_K: tl.constexpr,
        SPLITS: tl.constexpr, SOFT_FP8: tl.constexpr, SCALE_FROM_D: tl.constexpr, BLOCK_N: tl.constexpr,
        PREFETCH: tl.constexpr,
    ):  # fmt: skip
        """One program per (batch * kv head, KV split): the single query of each of the group's q
        heads against keys [split * split_len, ...). q (B, Hq, 1, D) seen through (b, h, d)
        strides, k / v (B, Hkv, S, D), mask (B, Hq, 1, S) through (b, h, s) strides. SPLITS == 1
        writes out (B * Hq, DV); else fp32 partials and (max, sum) stats per split and row."""
        # scale in base 2, as fp32 (see attention_kernel: Inductor passes a Python float as fp64)
        if SCALE_FROM_D:
            d64 = (tl.program_id(0) * 0 + D).to(tl.float64)
            qk_scale = ((1.0 / tl.sqrt(d64)) * 1.4426950408889634).to(tl.float32)
        else:
            qk_scale = (tl.program_id(0) * 0.0 + qk_scale).to(tl.float32)
        pid_bh = tl.program_id(0)
        split = tl.program_id(1)
        b = pid_bh // H_KV
        kv_head = pid_bh % H_KV
        g = tl.arange(0, GROUP_PAD)
        g_valid = g < GROUP
        q_head = kv_head * GROUP + tl.where(g_valid, g, 0)
        offs_d = tl.arange(0, HEAD_DIM)
        offs_dv = tl.arange(0, HEAD_DIM_V)
        d_valid = offs_d < D
        dv_valid = offs_dv < DV

        # Q as [D, G]: one scale per (head, token), codes held as their fp32 values
        q = tl.load(
            q_ptr + b * stride_qb + q_head[None, :] * stride_qh + offs_d[:, None] * stride_qd,
            mask=d_valid[:, None] & g_valid[None, :], other=0.0,
        ).to(tl.float32)  # fmt: skip
        q_scale = tl.reduce(tl.abs(q), 0, _max_nan) * (1.0 / QK_QMAX)
        q8 = _quantize(q, _inverse(q_scale)[None, :], QK_INT8, QK_QMAX, SOFT_FP8).to(tl.float32)
        q_scale = q_scale * qk_scale

        k_base = k_ptr + b * stride_kb + kv_head * stride_kh
        v_base = v_ptr + b * stride_vb + kv_head * stride_vh
        mask_base = mask_ptr + b * stride_mb + q_head[None, :] * stride_mh
        if SMOOTH_K:
            k_mean = _first_block_mean(k_base, S, stride_ks, stride_kd, offs_d, d_valid, HEAD_DIM, BLOCK_N)
        else:
            k_mean = tl.zeros((HEAD_DIM,), dtype=tl.float32)

        n_begin = split * split_len
        n_end = tl.minimum(S, n_begin + split_len)
        if IS_CAUSAL:  # top-left aligned, as SDPA: query 0 sees key 0
            n_end = tl.minimum(n_end, 1)
        acc = tl.zeros((HEAD_DIM_V, GROUP_PAD), dtype=tl.float32)
        row_sum = tl.zeros((GROUP_PAD,), dtype=tl.float32)
        row_max = tl.full((GROUP_PAD,), float("-inf"), dtype=tl.float32)

        offs_n = n_begin + tl.arange(0, BLOCK_N)
        in_s = offs_n < S  # a block's scale covers its keys up to S, whatever the causal limit
        if PREFETCH:  # the first block's tiles (none if the split is empty)
            first = in_s & (offs_n * 0 + n_begin < n_end)
            k_next = _kv_tile(k_base, offs_n, first, stride_ks, stride_kd, offs_d, d_valid)
            v_next = _kv_tile(v_base, offs_n, first, stride_vs, stride_vd, offs_dv, dv_valid)
        for n0 in range(n_begin, n_end, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            in_s = offs_n < S
            keep = offs_n < n_end
            k_valid = in_s[:, None] & d_valid[None, :]
            if PREFETCH:
                k = k_next
                v = v_next
                next_n = offs_n + BLOCK_N  # the next block, if this split goes on (up to S: its scale)
                more = (next_n < S) & (offs_n * 0 + n0 + BLOCK_N < n_end)
                k_next = _kv_tile(k_base, next_n, more, stride_ks, stride_kd, offs_d, d_valid)
                v_next = _kv_tile(v_base, next_n, more, stride_vs, stride_vd, offs_dv, dv_valid)
            else:
                k = _kv_tile(k_base, offs_n, in_s, stride_ks, stride_kd, offs_d, d_valid)
                v = _kv_tile(v_base, offs_n, in_s, stride_vs, stride_vd, offs_dv, dv_valid)
            # the tiles stay in their load's dtype until quantized (the amax of bf16 values is one of
            # them): a tile held as fp32 across the amax reductions doubled its registers
            if SMOOTH_K:
                k = tl.where(k_valid, k.to(tl.float32) - k_mean[None, :], 0.0)
            k_scale = _amax(k) * (1.0 / QK_QMAX)
            k8 = _quantize(k.to(tl.float32), _inverse(k_scale), QK_INT8, QK_QMAX, SOFT_FP8).to(tl.float32)
            qk = tl.sum(_widen(k8, GROUP_PAD) * q8[None, :, :], 1)  # [BLOCK_N, G]
            s = qk * (q_scale[None, :] * k_scale)
            if MASK_KIND != 0:
                m_ptrs = mask_base + offs_n[:, None] * stride_ms
                m_valid = keep[:, None] & g_valid[None, :]
                if MASK_KIND == 1:  # a finite fill (finfo.min) stays finite: reference._mask_in_base_2
                    mv = tl.load(m_ptrs, mask=m_valid, other=0.0).to(tl.float32)
                    s += tl.where(mv == float("-inf"), mv, tl.maximum(mv * 1.4426950408889634, -3.4028234663852886e38))
                else:
                    s = tl.where(tl.load(m_ptrs, mask=m_valid, other=0) != 0, s, float("-inf"))
            s = tl.where(keep[:, None], s, float("-inf"))
            new_max = _max_nan(row_max, tl.math.ceil(tl.reduce(s, 0, _max_nan)))
            safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)  # nothing seen yet: P = 0
            alpha = tl.math.exp2(row_max - safe_max)  # a power of two (or 0)
            p = tl.math.exp2(s - safe_max[None, :])
            row_sum = row_sum * alpha + tl.sum(p, 0)
            row_max = new_max

            v_scale = _amax(v) * (1.0 / V_QMAX)
            v8 = _quantize(v.to(tl.float32), _inverse(v_scale), False, V_QMAX, SOFT_FP8).to(tl.float32)
            p8 = _quantize(p, V_QMAX, False, V_QMAX, SOFT_FP8).to(tl.float32)  # P * 448: codes of scale 1/448
            pv = tl.sum(_widen(v8, GROUP_PAD) * p8[:, None, :], 0)  # [Dv, G]
            acc = acc * alpha[None, :] + pv * (v_scale * (1.0 / V_QMAX))

        out_rows = b * H_KV * GROUP + q_head  # row of the contiguous (B * Hq, Dv) output (L = 1)
        store_mask = dv_valid[:, None] & g_valid[None, :]
        if SPLITS == 1:
            out = tl.math.div_rn(acc, tl.broadcast_to(row_sum[None, :], (HEAD_DIM_V, GROUP_PAD)))
            out = tl.where(row_sum[None, :] == 0, 0.0, out)  # fully masked row: 0, as SDPA
            tl.store(out_ptr + out_rows[None, :] * DV + offs_dv[:, None], out.to(out_ptr.dtype.element_ty), mask=store_mask)
        else:
            part_rows = split * rows_total + out_rows
            tl.store(partial_ptr + part_rows[None, :] * DV + offs_dv[:, None], acc, mask=store_mask)
            tl.store(stats_ptr + part_rows * 2, row_max, mask=g_valid)
            tl.store(stats_ptr + part_rows * 2 + 1, row_sum, mask=g_valid)

    # Candidates for H100 (benchmarks/profile_attention.py): 8 warps fit the tile's registers (~250)
    # with one program per SM; 16 warps halve each thread's share of a tile (128 registers).
    DECODE_CONFIGS = [
        triton.Config({"PREFETCH": prefetch}, num_warps=warps, num_stages=1) for warps in (8, 16) for prefetch in (True, False)
    ]
    decode_attention_kernel_tuned = triton.autotune(
        configs=DECODE_CONFIGS,
        key=["HEAD_DIM", "HEAD_DIM_V", "GROUP_PAD", "IS_CAUSAL", "MASK_KIND", "QK_INT8", "SMOOTH_K", "SPLITS", "BLOCK_N", "KV_BUCKET"],
    )(decode_attention_kernel)
