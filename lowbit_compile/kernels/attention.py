"""Quantized flash attention (forward) in Triton: softmax(Q K^T * scale + mask) V with Q, K and V
quantized per token block, and QK^T and PV on 8-bit tensor cores.

The op hands the launcher high-precision q, k, v (bf16 / fp16 / fp32) with their strides, as the
model made them (often (B, L, H, D) memory seen as (B, H, L, D)); nothing is copied. Q is quantized
in registers by each program (its block's amax, a cast to fp8 e4m3 or int8). K and V: at prefill,
`quantize_kv_kernel` writes their codes and block scales once (every query block reads each K/V
tile, so quantizing in the loop repeated the work per query block); at decode each tile is loaded
and quantized in the loop (read once per GQA group anyway). Softmax and both accumulators are fp32.
The numerical definition is `reference.attention` (an `formats.AttentionFormat`): this kernel
matches it up to the order of fp32 sums and the rare code that flips at a rounding boundary.

Shapes and layouts:
- q (B, Hq, L, D), k (B, Hkv, S, D), v (B, Hkv, S, Dv): any strides; Hq a multiple of Hkv (GQA:
  q head h reads kv head h // (Hq // Hkv), never a repeated copy). D, Dv <= 256 (padded to powers of
  two in registers; D = 64 and 128 are the tuned cases).
- attn_mask: None, bool (True keeps) or float (added), broadcastable to (B, Hq, L, S) (read with
  stride 0 along broadcast dims). is_causal is top-left aligned, as SDPA: query i sees keys j <= i.
- out: (B, Hq, L, Dv) contiguous, in the op's out dtype; a fully masked row is 0, as SDPA.

Quantization, per (batch, head, token block):
- Q: one scale per `q_fmt.block_rows` tokens. A tile holds whole Q blocks (BLOCK_M a multiple of
  the block: the scale is a max over aligned groups of rows of the tile) or, at prefill, is a whole
  fraction of one (it reads the block's other rows once for the scale).
- K, V: one scale per `block_rows` keys (KV_SCALE_ROWS). In the loop a K/V tile is exactly one
  block (BLOCK_N = KV_SCALE_ROWS); over pre-quantized K/V a tile may be part of a block. With K
  smoothing the per-channel mean of K's first block is subtracted first (`reference.smooth_keys`).
- P: exp2(s - m) with m the running row max rounded up to an integer, so P is in (0, 1] and the
  online-softmax rescale factors are powers of two; P * 448 is cast to fp8 e4m3 for the PV product.

Two launch shapes, chosen from static sizes (never from a dynamic length, so no guard):
- prefill: one program per (BLOCK_M query rows, batch, q head); K/V tiles before the causal
  diagonal and inside S run without masks, the rest with them.
- decode (L * next_pow2(Hq / Hkv) <= 64, L <= Q block): one program per (batch, kv head, KV split);
  its rows are the L queries of every q head of the group (GQA: K/V are read once per group, and a
  decode step fills 4-16 rows instead of 1 of 128). Splits write fp32 partials and row stats; a
  second kernel combines them (split-KV / flash-decoding), exactly since the maxima are integers.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is optional
    triton = None
    tl = None

from lowbit_compile.formats import AttentionFormat, ElementType, Granularity, get_attention_format

LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 256
MIN_HEAD_DIM = 32  # 8-bit MMA reduces over at least 32 elements
DECODE_MAX_ROWS = 64  # packed decode tiles: L * next_pow2(group) rows at most
# Prefill: K/V quantized once by `quantize_kv_kernel` (every query block of a head reads each K/V
# tile; quantizing it in each of them cost ~8x the MMA time, benchmarks/NOTES-attention.md v1).
PREQUANTIZE_PREFILL = True
# FOLD_V: PV accumulates in the MMA, acc kept in units of the V tile's scale (fewer registers) or
# not (one multiply-add fewer per element): the prefill autotuner tries both; other launches use this.
FOLD_V_SCALE = True
# Decode: KV splits to give every SM this many programs (one program of the decode tile fills an
# SM's shared memory; more splits add programs that wait, and combine work).
DECODE_PROGRAMS_PER_SM = 1  # measured (NOTES v3, v6): 1 -> 0.74-0.77x of bf16, 2 -> 0.63x, 8 -> 0.71-0.74x
# The K/V pre-pass, measured on H100 at B4 H32 S4096 D128 (NOTES-attention.md v6): 16 blocks per
# program and 128 registers (two 8-warp programs per SM) 2.73 TB/s; 4 blocks uncapped 2.49 TB/s.
QUANTIZE_KV_BLOCKS_PER_PROGRAM = 16
QUANTIZE_KV_SPLIT = True  # K and V blocks in programs of their own
QUANTIZE_KV_WARPS = 8  # for tiles over 8192 elements
QUANTIZE_KV_MAXNREG: int | None = 128  # a register cap (None: the compiler's choice)
MAX_SPLITS = 16
# Causal prefill: the launch order of Q blocks, in groups of this many (batch, head) pairs, each
# group longest rows first (1: one head at a time, as before the eleventh session).
CAUSAL_HEAD_GROUP = 8  # measured (NOTES v8): 8 -> 1.37-1.39x of bf16, 1 -> 1.35-1.37x, 128 -> 1.21-1.27x
# Decode of one query per head (L == 1, GQA group <= attention_decode.MAX_GROUP): the FMA kernel of
# `attention_decode.py` (products on the FMA pipes, tiles in their load's registers) instead of the
# packed MMA tile; DECODE_FMA_PROGRAMS_PER_SM sizes its KV splits. Off: measured on H100 (NOTES v7) at
# 0.22x of bf16 SDPA (B16, Hq32/Hkv8, KV 8192) against 0.74-0.76x for the packed MMA tile; kept opt-in.
DECODE_FMA = False
DECODE_FMA_PROGRAMS_PER_SM = 1
# Decode through the op (`ops.block_attention_triton`): launches that would pack a decode tile (a
# static query length, L x group <= DECODE_MAX_ROWS) run bf16 SDPA on the unquantized operands. With
# K/V arriving in bf16, a decode step reads the same bytes either way and the quantization only adds
# work: on H100 (B16 Hq32/Hkv8, KV 8192) the packed tile runs at 0.74-0.76x of SDPA and a kernel that
# only reads the bf16 K/V at 1.025x (NOTES-attention.md v7, RESULTS.md tenth session); this path
# measured 1.04x (twelfth session). `run` itself keeps the kernel unless asked (`bf16_decode=True`);
# the report names the decode path.
DECODE_SDPA = True
MASK_NONE, MASK_FLOAT, MASK_BOOL = 0, 1, 2


def supports(fmt: AttentionFormat) -> str | None:
    """None if the kernel runs this attention format, else why not."""
    q_fmt, k_fmt, v_fmt = fmt.formats
    if not fmt.quantize_probabilities:
        return f"{fmt.name}: the kernel quantizes P for an 8-bit PV product"
    for name, f in (("q", q_fmt), ("k", k_fmt), ("v", v_fmt)):
        if f.granularity is not Granularity.TOKEN_BLOCK:
            return f"{fmt.name}: the kernel quantizes per token block, not {name} as {f.name}"
        if f.block_rows > 128:
            return f"{fmt.name}: token blocks of at most 128 rows, not {f.block_rows}"
    if {q_fmt.element, k_fmt.element} not in ({ElementType.FP8_E4M3}, {ElementType.INT8}):
        return f"{fmt.name}: QK^T needs fp8 e4m3 x fp8 e4m3 or int8 x int8"
    if v_fmt.element is not ElementType.FP8_E4M3:
        return f"{fmt.name}: PV runs in fp8 e4m3, not {v_fmt.element}"
    if k_fmt.block_rows != v_fmt.block_rows:
        return f"{fmt.name}: K and V blocks must be the same tile (BLOCK_N)"
    return None


if triton is not None:

    @triton.jit
    def _max_nan(a, b):
        return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)

    @triton.jit
    def _round_to_e4m3(x):
        """x (fp32, |x| <= 448) rounded half to even onto the e4m3 grid, in fp32 arithmetic. Only
        under Triton's interpreter, whose fp32 -> fp8 cast rounds wrongly (31.1 -> 16, 17 -> 18)."""
        bits = x.to(tl.int32, bitcast=True)
        exponent = tl.maximum(((bits >> 23) & 0xFF) - 127, -6)  # below 2**-6: e4m3 subnormals, step 2**-9
        step = ((exponent - 3 + 127) << 23).to(tl.float32, bitcast=True)
        return ((x / step + 12582912.0) - 12582912.0) * step  # x / step is exact (a power of two)

    @triton.jit
    def _quantize(x, inverse_scale, INT8: tl.constexpr, QMAX: tl.constexpr, SOFT_FP8: tl.constexpr):
        """fp32 values times 1/scale -> int8 codes (half to even) or fp8 e4m3, clamped to the range."""
        v = x * inverse_scale
        # one return: Triton 3.6 rejects returns of different types even in pruned constexpr branches
        if INT8:
            v = (v + 12582912.0) - 12582912.0  # round half to even (1.5 * 2**23), exact for |v| < 2**22
            v = tl.minimum(tl.maximum(v, -QMAX - 1.0), QMAX)
            codes = tl.where(v != v, 0.0, v).to(tl.int8)  # NaN only where the scale is NaN, which carries it
        else:
            v = tl.minimum(tl.maximum(v, -QMAX), QMAX)
            if SOFT_FP8:
                v = _round_to_e4m3(v)
            codes = v.to(tl.float8e4nv)
        return codes

    @triton.jit
    def _tile_amax(x):
        """max |x| over a whole tile, NaN-propagating. One flat reduction (the order of a max does not
        change it): each thread folds its own elements first and the tile then costs one cross-lane
        and one cross-warp step, where row-then-column reductions paid a shuffle tree per row.
        (`axis=None` flattens in any order inside Triton; `tl.reshape(can_reorder=True)`, which did
        the same here, is deprecated and goes in Triton 3.10.)"""
        return tl.reduce(tl.abs(x), None, _max_nan)

    @triton.jit
    def _inverse(scale):
        """1 / scale (IEEE), 0 for an all-zero block (its codes are then 0, as the reference's)."""
        return tl.where(scale == 0, 0.0, tl.math.div_rn(scale * 0.0 + 1.0, scale))  # scale may be a scalar

    @triton.jit
    def _softmax_pv(
        qk, k_scale, n0, acc, row_sum, row_max, v_unit,
        q_scale, rows_l, q_head, row_valid, v_base, mask_base, vc_base, vs_base, S, S_PAD,
        stride_vs, stride_vd, stride_mh, stride_ml, stride_ms, offs_dv, dv_valid, qk_scale,
        BOUNDARY: tl.constexpr, IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, V_QMAX: tl.constexpr,
        SOFT_FP8: tl.constexpr, PREQUANT: tl.constexpr, FOLD_V: tl.constexpr,
        HEAD_DIM_V: tl.constexpr, BLOCK_N: tl.constexpr, KV_SCALE_ROWS: tl.constexpr,
    ):  # fmt: skip
        """One K/V tile after QK^T: scale and mask the scores, online softmax, P cast, PV product.
        FOLD_V: acc is kept in units of the current V tile's scale (v_unit = v_scale / 448), so
        the PV product accumulates into acc inside the MMA."""
        offs_n = n0 + tl.arange(0, BLOCK_N)
        kv_valid = offs_n < S
        s = qk * (q_scale[:, None] * (k_scale * qk_scale))  # scores in base 2
        if MASK_KIND != 0:
            m_ptrs = mask_base + q_head[:, None] * stride_mh + rows_l[:, None] * stride_ml
            m_ptrs += offs_n[None, :] * stride_ms
            m_valid = row_valid[:, None] & kv_valid[None, :]
            if MASK_KIND == 1:  # a finite fill (finfo.min) stays finite: see reference._mask_in_base_2
                mv = tl.load(m_ptrs, mask=m_valid, other=0.0).to(tl.float32)
                s += tl.where(mv == float("-inf"), mv, tl.maximum(mv * 1.4426950408889634, -3.4028234663852886e38))
            else:
                s = tl.where(tl.load(m_ptrs, mask=m_valid, other=0) != 0, s, float("-inf"))
        if BOUNDARY:
            keep = kv_valid[None, :]
            if IS_CAUSAL:
                keep = keep & (offs_n[None, :] <= rows_l[:, None])
            s = tl.where(keep, s, float("-inf"))
        new_max = _max_nan(row_max, tl.math.ceil(tl.reduce(s, 1, _max_nan)))
        safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)  # nothing seen yet: P = 0
        alpha = tl.math.exp2(row_max - safe_max)  # a power of two (or 0)
        p = tl.math.exp2(s - safe_max[:, None])
        row_sum = row_sum * alpha + tl.sum(p, 1)
        if PREQUANT:
            vt8 = tl.load(vc_base + tl.arange(0, HEAD_DIM_V)[:, None] * S_PAD + offs_n[None, :])
            v_scale = tl.load(vs_base + n0 // KV_SCALE_ROWS)
            v8 = tl.trans(vt8)
        else:
            if BOUNDARY:
                v_load_mask = kv_valid[:, None] & dv_valid[None, :]
            else:
                v_load_mask = dv_valid[None, :]
            v_ptrs = v_base + offs_n[:, None] * stride_vs + offs_dv[None, :] * stride_vd
            v = tl.load(v_ptrs, mask=v_load_mask, other=0.0).to(tl.float32)
            v_scale = _tile_amax(v) * (1.0 / V_QMAX)
            v8 = _quantize(v, _inverse(v_scale), False, V_QMAX, SOFT_FP8)
        p8 = _quantize(p, V_QMAX, False, V_QMAX, SOFT_FP8)  # P * 448: codes with scale 1/448
        if FOLD_V:
            # acc (in units of v_unit) re-expressed in the units of this tile; an all-zero tile
            # (scale 0) adds nothing and keeps the units
            unit = tl.where(v_scale == 0, v_unit, v_scale * (1.0 / V_QMAX))
            acc = acc * (alpha * tl.math.div_rn(v_unit, unit))[:, None]
            acc = tl.dot(p8, v8, acc)
            v_unit = unit
        else:
            acc = acc * alpha[:, None]
            acc += tl.dot(p8, v8) * (v_scale * (1.0 / V_QMAX))
        return acc, row_sum, new_max, v_unit

    @triton.jit
    def _qk_codes(q8, kc_base, n0, QK_INT8: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr):
        """Q K^T of one pre-quantized K tile (codes), unscaled, fp32."""
        offs_n = n0 + tl.arange(0, BLOCK_N)
        k8 = tl.load(kc_base + offs_n[:, None] * HEAD_DIM + tl.arange(0, HEAD_DIM)[None, :])
        if QK_INT8:
            qk = tl.dot(q8, tl.trans(k8), out_dtype=tl.int32).to(tl.float32)
        else:
            qk = tl.dot(q8, tl.trans(k8))
        return qk

    @triton.jit
    def _attend_tiles(
        acc, row_sum, row_max, v_unit,
        q8, q_scale, k_mean, rows_l, q_head, row_valid,
        k_base, v_base, mask_base, kc_base, ks_base, vc_base, vs_base,
        n_begin, n_end, S, S_PAD,
        stride_ks, stride_kd, stride_vs, stride_vd, stride_mh, stride_ml, stride_ms,
        offs_d, offs_dv, d_valid, dv_valid, qk_scale,
        BOUNDARY: tl.constexpr, IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr,
        QK_INT8: tl.constexpr, QK_QMAX: tl.constexpr, V_QMAX: tl.constexpr,
        SMOOTH_K: tl.constexpr, SOFT_FP8: tl.constexpr, PREQUANT: tl.constexpr, FOLD_V: tl.constexpr,
        HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_N: tl.constexpr, KV_SCALE_ROWS: tl.constexpr,
    ):  # fmt: skip
        """Online softmax over the K/V tiles in [n_begin, n_end); BOUNDARY tiles may hold keys past
        S or past the causal diagonal and are masked element by element.

        PREQUANT: K and V come as codes written by `quantize_kv_kernel` (K (S_PAD, HEAD_DIM), V
        transposed (HEAD_DIM_V, S_PAD), zero padded, one fp32 scale per tile), so a tile is two
        plain loads that Triton pipelines into shared memory; otherwise each tile is loaded in high
        precision and quantized here."""
        for n0 in range(n_begin, n_end, BLOCK_N):
            if PREQUANT:
                qk = _qk_codes(q8, kc_base, n0, QK_INT8, HEAD_DIM, BLOCK_N)
                k_scale = tl.load(ks_base + n0 // KV_SCALE_ROWS)
            else:
                offs_n = n0 + tl.arange(0, BLOCK_N)
                if BOUNDARY:
                    k_load_mask = (offs_n < S)[:, None] & d_valid[None, :]
                else:
                    k_load_mask = d_valid[None, :]
                k = tl.load(
                    k_base + offs_n[:, None] * stride_ks + offs_d[None, :] * stride_kd, mask=k_load_mask,
                    other=0.0,
                )  # fmt: skip
                k = k.to(tl.float32)
                if SMOOTH_K:
                    k = tl.where(k_load_mask, k - k_mean[None, :], 0.0)
                k_scale = _tile_amax(k) * (1.0 / QK_QMAX)
                k8 = _quantize(k, _inverse(k_scale), QK_INT8, QK_QMAX, SOFT_FP8)
                if QK_INT8:
                    qk = tl.dot(q8, tl.trans(k8), out_dtype=tl.int32).to(tl.float32)
                else:
                    qk = tl.dot(q8, tl.trans(k8))
            acc, row_sum, row_max, v_unit = _softmax_pv(
                qk, k_scale, n0, acc, row_sum, row_max, v_unit,
                q_scale, rows_l, q_head, row_valid, v_base, mask_base, vc_base, vs_base, S, S_PAD,
                stride_vs, stride_vd, stride_mh, stride_ml, stride_ms, offs_dv, dv_valid, qk_scale,
                BOUNDARY, IS_CAUSAL, MASK_KIND, V_QMAX, SOFT_FP8, PREQUANT, FOLD_V, HEAD_DIM_V, BLOCK_N, KV_SCALE_ROWS,
            )  # fmt: skip
        return acc, row_sum, row_max, v_unit

    @triton.jit
    def _first_block_mean(
        k_base, S, stride_ks, stride_kd, offs_d, d_valid, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr
    ):
        """Per-channel mean of K's first min(S, BLOCK_N) keys (reference.smooth_keys)."""
        offs_n = tl.arange(0, BLOCK_N)
        first = tl.load(
            k_base + offs_n[:, None] * stride_ks + offs_d[None, :] * stride_kd,
            mask=(offs_n[:, None] < S) & d_valid[None, :], other=0.0,
        ).to(tl.float32)
        count = tl.full((HEAD_DIM,), 1.0, tl.float32) * tl.minimum(S, BLOCK_N).to(tl.float32)
        return tl.math.div_rn(tl.sum(first, 0), count)

    @triton.jit
    def _block_tile(src, block, last_block, S, stride_s, stride_d, DIM: tl.constexpr, DIM_VALID, BLOCK_N: tl.constexpr):
        """The high-precision tile of one K or V block (zeros past S, past DIM_VALID, and for a
        block at or past last_block) and its load mask."""
        offs_n = block * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, DIM)
        mask = (offs_n < S)[:, None] & (offs_d < DIM_VALID)[None, :] & (offs_n < last_block * BLOCK_N)[:, None]
        return tl.load(src + offs_n[:, None] * stride_s + offs_d[None, :] * stride_d, mask=mask, other=0.0), mask

    @triton.jit
    def _quantize_blocks(
        src, codes_ptr, scales_ptr, kv_row, first_block, last_block, S, S_PAD, stride_s, stride_d, mean,
        x_next, mask,
        IS_K: tl.constexpr, INT8: tl.constexpr, QMAX: tl.constexpr, SMOOTH: tl.constexpr, SOFT_FP8: tl.constexpr,
        DIM: tl.constexpr, DIM_VALID, BLOCK_N: tl.constexpr,
    ):  # fmt: skip
        """Blocks [first_block, last_block) of one K or V (BLOCK_N tokens each): codes and one scale
        per block; `x_next`, `mask`: the first block's tile (`_block_tile`), loaded by the caller
        before its other loads. The next block's tile is loaded before this one is quantized, so a
        load is in flight while the program reduces and casts (without that, a program's loads and
        its math took turns: 1.77 TB/s on H100, benchmarks/NOTES-attention.md v6)."""
        offs_d = tl.arange(0, DIM)
        offs_n = first_block * BLOCK_N + tl.arange(0, BLOCK_N)
        for block in range(first_block, last_block):
            x = x_next.to(tl.float32)
            offs = offs_n
            valid = mask
            offs_n = offs_n + BLOCK_N
            x_next, mask = _block_tile(src, block + 1, last_block, S, stride_s, stride_d, DIM, DIM_VALID, BLOCK_N)
            if SMOOTH:
                x = tl.where(valid, x - mean[None, :], 0.0)
            scale = _tile_amax(x) * (1.0 / QMAX)
            codes = _quantize(x, _inverse(scale), INT8, QMAX, SOFT_FP8)
            if IS_K:  # (S_PAD, DIM)
                tl.store(codes_ptr + (kv_row * S_PAD + offs[:, None]) * DIM + offs_d[None, :], codes)
            else:  # transposed: (DIM, S_PAD)
                tl.store(codes_ptr + (kv_row * DIM + offs_d[None, :]) * S_PAD + offs[:, None], codes)
            tl.store(scales_ptr + kv_row * (S_PAD // BLOCK_N) + block, scale)

    @triton.jit
    def quantize_kv_kernel(
        k_ptr, v_ptr, kc_ptr, ks_ptr, vc_ptr, vs_ptr,
        S, D, DV, H_KV, S_PAD, blocks_per_program,
        stride_kb, stride_kh, stride_ks, stride_kd,
        stride_vb, stride_vh, stride_vs, stride_vd,
        HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
        K_INT8: tl.constexpr, K_QMAX: tl.constexpr, V_QMAX: tl.constexpr, SMOOTH_K: tl.constexpr,
        SOFT_FP8: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_KV: tl.constexpr,
    ):  # fmt: skip
        """K and V of one (batch, kv head), `blocks_per_program` token blocks from program_id(1) on,
        quantized once for every query block that reads them: K codes (S_PAD, HEAD_DIM) and V codes
        transposed (HEAD_DIM_V, S_PAD), both zero padded (the K-major operands of the 8-bit MMAs),
        and one fp32 scale per block. The same arithmetic as the in-kernel path of `_attend_tiles`.
        SPLIT_KV: program_id(2) is 0 for K's blocks and 1 for V's (twice the programs), else a
        program does both."""
        pid_bh = tl.program_id(0)
        b = pid_bh // H_KV
        kv_head = pid_bh % H_KV
        kv_row = pid_bh.to(tl.int64)
        blocks = S_PAD // BLOCK_N
        first_block = tl.program_id(1) * blocks_per_program
        last_block = tl.minimum(first_block + blocks_per_program, blocks)
        which = tl.program_id(2)
        if SPLIT_KV:
            do_k = which == 0
            do_v = which == 1
        else:
            do_k = which == 0
            do_v = which == 0
        if do_k:
            k_base = k_ptr + b * stride_kb + kv_head * stride_kh
            k_first, k_mask = _block_tile(k_base, first_block, last_block, S, stride_ks, stride_kd, HEAD_DIM, D, BLOCK_N)
            offs_d = tl.arange(0, HEAD_DIM)
            if SMOOTH_K:
                k_mean = _first_block_mean(k_base, S, stride_ks, stride_kd, offs_d, offs_d < D, HEAD_DIM, BLOCK_N)
            else:
                k_mean = tl.zeros((HEAD_DIM,), dtype=tl.float32)
            _quantize_blocks(
                k_base, kc_ptr, ks_ptr, kv_row, first_block, last_block, S, S_PAD, stride_ks, stride_kd, k_mean,
                k_first, k_mask, True, K_INT8, K_QMAX, SMOOTH_K, SOFT_FP8, HEAD_DIM, D, BLOCK_N,
            )  # fmt: skip
        if do_v:
            v_base = v_ptr + b * stride_vb + kv_head * stride_vh
            v_first, v_mask = _block_tile(v_base, first_block, last_block, S, stride_vs, stride_vd, HEAD_DIM_V, DV, BLOCK_N)
            _quantize_blocks(
                v_base, vc_ptr, vs_ptr, kv_row, first_block, last_block, S, S_PAD, stride_vs, stride_vd,
                tl.zeros((HEAD_DIM_V,), dtype=tl.float32), v_first, v_mask,
                False, False, V_QMAX, False, SOFT_FP8, HEAD_DIM_V, DV, BLOCK_N,
            )  # fmt: skip

    @triton.jit
    def attention_kernel(
        q_ptr, k_ptr, v_ptr, mask_ptr, out_ptr, partial_ptr, stats_ptr, kc_ptr, ks_ptr, vc_ptr, vs_ptr,
        L, S, D, DV, H_Q, H_KV, GROUP, rows_total, split_len, S_PAD, qk_scale,
        stride_qb, stride_qh, stride_ql, stride_qd,
        stride_kb, stride_kh, stride_ks, stride_kd,
        stride_vb, stride_vh, stride_vs, stride_vd,
        stride_mb, stride_mh, stride_ml, stride_ms,
        Q_BUCKET, KV_BUCKET,  # autotuning keys only
        HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
        IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr,
        QK_INT8: tl.constexpr, QK_QMAX: tl.constexpr, V_QMAX: tl.constexpr, SMOOTH_K: tl.constexpr,
        Q_SCALE_ROWS: tl.constexpr, PACK_ROWS: tl.constexpr, SPLITS: tl.constexpr, SOFT_FP8: tl.constexpr,
        SCALE_FROM_D: tl.constexpr, PREQUANT: tl.constexpr, FOLD_V: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, KV_SCALE_ROWS: tl.constexpr,
        HEAD_GROUP: tl.constexpr = 1,
    ):  # fmt: skip
        # K/V tiles of BLOCK_N keys within blocks of KV_SCALE_ROWS (one scale each): smaller tiles
        # only over pre-quantized K/V (the in-loop path quantizes a whole block per tile)
        tl.static_assert(KV_SCALE_ROWS == BLOCK_N or (PREQUANT and KV_SCALE_ROWS % BLOCK_N == 0))
        tl.static_assert(
            BLOCK_M % Q_SCALE_ROWS == 0 or (PACK_ROWS == 0 and Q_SCALE_ROWS % BLOCK_M == 0),
            "a tile holds whole Q blocks or a whole fraction of one: BLOCK_M % Q_SCALE_ROWS == 0",
        )
        # The scale in base 2, as fp32 whatever the launcher passed: Inductor's wrapper passes a
        # Python float as fp64 (an fp64 scale would promote the scores and acc to fp64), and a
        # default scale from a symbolic head dim cannot be a host float at all (SCALE_FROM_D:
        # log2(e) / sqrt(D) here, in fp64 with IEEE sqrt and division, which rounds to the same fp32
        # as the host's D ** -0.5 * log2(e) for every D <= 4096; checked on the host).
        if SCALE_FROM_D:
            d64 = (tl.program_id(0) * 0 + D).to(tl.float64)
            qk_scale = ((1.0 / tl.sqrt(d64)) * 1.4426950408889634).to(tl.float32)  # fp64: IEEE / and sqrt
        else:
            qk_scale = (tl.program_id(0) * 0.0 + qk_scale).to(tl.float32)  # also a constexpr 1 (Inductor)
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        if IS_CAUSAL and PACK_ROWS == 0:
            # The longest rows (most K/V tiles) first, a shorter tail: programs are taken in launch
            # order (axis 0 fastest) as groups of HEAD_GROUP (batch, head) pairs, each group's Q
            # blocks longest first across its heads, so the last programs of the launch are short
            # ones of the last group; a group's K/V stay in L2 while its programs run.
            n_m = tl.num_programs(0)
            n_bh = tl.num_programs(1)
            order = pid_bh * n_m + pid_m
            group_first = order // (HEAD_GROUP * n_m) * HEAD_GROUP
            heads_here = tl.minimum(HEAD_GROUP, n_bh - group_first)
            in_group = order - group_first * n_m
            pid_m = n_m - 1 - in_group // heads_here
            pid_bh = group_first + in_group % heads_here
        split = tl.program_id(2)
        rows = tl.arange(0, BLOCK_M)
        if PACK_ROWS > 0:  # decode: rows are (q head of the group, query) pairs, PACK_ROWS queries per head
            b = pid_bh // H_KV
            kv_head = pid_bh % H_KV
            group_index = rows // PACK_ROWS
            rows_l = rows % PACK_ROWS
            q_head = kv_head * GROUP + group_index
            row_valid = (group_index < GROUP) & (rows_l < L)
            first_l = 0
            last_l = L - 1
        else:
            b = pid_bh // H_Q
            head = pid_bh % H_Q
            kv_head = head // GROUP
            rows_l = pid_m * BLOCK_M + rows
            q_head = head + rows * 0
            row_valid = rows_l < L
            first_l = pid_m * BLOCK_M
            last_l = tl.minimum(first_l + BLOCK_M, L) - 1
        rows_l = tl.where(row_valid, rows_l, 0)
        q_head = tl.where(row_valid, q_head, 0)
        offs_d = tl.arange(0, HEAD_DIM)
        offs_dv = tl.arange(0, HEAD_DIM_V)
        d_valid = offs_d < D
        dv_valid = offs_dv < DV

        # Q: load, one scale per aligned group of Q_SCALE_ROWS rows (a Q block), cast in registers.
        q_ptrs = q_ptr + b * stride_qb + q_head[:, None] * stride_qh + rows_l[:, None] * stride_ql
        q_ptrs += offs_d[None, :] * stride_qd
        q = tl.load(q_ptrs, mask=row_valid[:, None] & d_valid[None, :], other=0.0).to(tl.float32)
        if BLOCK_M >= Q_SCALE_ROWS:
            row_amax = tl.reduce(tl.abs(q), 1, _max_nan)
            groups = tl.reduce(tl.reshape(row_amax, (BLOCK_M // Q_SCALE_ROWS, Q_SCALE_ROWS)), 1, _max_nan)
            q_amax = tl.reshape(tl.broadcast_to(groups[:, None], (BLOCK_M // Q_SCALE_ROWS, Q_SCALE_ROWS)), (BLOCK_M,))
        else:  # the tile is part of a Q block: the block's amax reads its other rows too (Q only)
            block_first = (first_l // Q_SCALE_ROWS) * Q_SCALE_ROWS
            block_amax = tl.max(tl.zeros((BLOCK_M,), dtype=tl.float32), 0)
            for part in tl.static_range(Q_SCALE_ROWS // BLOCK_M):
                part_rows = block_first + part * BLOCK_M + rows
                part_ptrs = q_ptr + b * stride_qb + head * stride_qh + part_rows[:, None] * stride_ql
                part_ptrs += offs_d[None, :] * stride_qd
                part_q = tl.load(part_ptrs, mask=(part_rows < L)[:, None] & d_valid[None, :], other=0.0)
                block_amax = _max_nan(block_amax, _tile_amax(part_q.to(tl.float32)))
            q_amax = tl.zeros((BLOCK_M,), dtype=tl.float32) + block_amax
        q_scale = q_amax * (1.0 / QK_QMAX)
        q8 = _quantize(q, _inverse(q_scale)[:, None], QK_INT8, QK_QMAX, SOFT_FP8)

        k_base = k_ptr + b * stride_kb + kv_head * stride_kh
        v_base = v_ptr + b * stride_vb + kv_head * stride_vh
        mask_base = mask_ptr + b * stride_mb
        kv_row = (b * H_KV + kv_head).to(tl.int64)  # (batch, kv head) row of the pre-quantized codes
        kc_base = kc_ptr + kv_row * S_PAD * HEAD_DIM
        vc_base = vc_ptr + kv_row * S_PAD * HEAD_DIM_V
        ks_base = ks_ptr + kv_row * (S_PAD // KV_SCALE_ROWS)
        vs_base = vs_ptr + kv_row * (S_PAD // KV_SCALE_ROWS)
        if SMOOTH_K and not PREQUANT:  # per-channel mean of K's first block (reference.smooth_keys)
            k_mean = _first_block_mean(k_base, S, stride_ks, stride_kd, offs_d, d_valid, HEAD_DIM, BLOCK_N)
        else:
            k_mean = tl.zeros((HEAD_DIM,), dtype=tl.float32)

        n_begin = split * split_len
        n_end = tl.minimum(S, n_begin + split_len)
        if IS_CAUSAL:
            n_end = tl.minimum(n_end, last_l + 1)
            full_end = tl.minimum(n_end, ((first_l + 1) // BLOCK_N) * BLOCK_N)  # tiles every row sees whole
        else:
            full_end = n_begin + ((n_end - n_begin) // BLOCK_N) * BLOCK_N
        full_end = tl.maximum(full_end, n_begin)

        acc = tl.zeros((BLOCK_M, HEAD_DIM_V), dtype=tl.float32)
        row_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
        row_max = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
        v_unit = qk_scale * 0.0 + 1.0  # FOLD_V: the scale acc is expressed in (any until a tile is added)
        acc, row_sum, row_max, v_unit = _attend_tiles(
            acc, row_sum, row_max, v_unit, q8, q_scale, k_mean, rows_l, q_head, row_valid,
            k_base, v_base, mask_base, kc_base, ks_base, vc_base, vs_base,
            n_begin, full_end, S, S_PAD, stride_ks, stride_kd, stride_vs, stride_vd, stride_mh, stride_ml, stride_ms,
            offs_d, offs_dv, d_valid, dv_valid, qk_scale,
            False, IS_CAUSAL, MASK_KIND, QK_INT8, QK_QMAX, V_QMAX, SMOOTH_K, SOFT_FP8, PREQUANT, FOLD_V,
            HEAD_DIM, HEAD_DIM_V, BLOCK_N, KV_SCALE_ROWS,
        )  # fmt: skip
        acc, row_sum, row_max, v_unit = _attend_tiles(
            acc, row_sum, row_max, v_unit, q8, q_scale, k_mean, rows_l, q_head, row_valid,
            k_base, v_base, mask_base, kc_base, ks_base, vc_base, vs_base,
            full_end, n_end, S, S_PAD, stride_ks, stride_kd, stride_vs, stride_vd, stride_mh, stride_ml, stride_ms,
            offs_d, offs_dv, d_valid, dv_valid, qk_scale,
            True, IS_CAUSAL, MASK_KIND, QK_INT8, QK_QMAX, V_QMAX, SMOOTH_K, SOFT_FP8, PREQUANT, FOLD_V,
            HEAD_DIM, HEAD_DIM_V, BLOCK_N, KV_SCALE_ROWS,
        )  # fmt: skip
        if FOLD_V:
            acc = acc * v_unit

        out_rows = (b * H_Q + q_head) * L + rows_l  # row of the contiguous (B, Hq, L, Dv) output
        store_mask = row_valid[:, None] & dv_valid[None, :]
        if SPLITS == 1:
            out = tl.math.div_rn(acc, tl.broadcast_to(row_sum[:, None], (BLOCK_M, HEAD_DIM_V)))
            out = tl.where(row_sum[:, None] == 0, 0.0, out)  # fully masked row: 0, as SDPA
            out_ptrs = out_ptr + out_rows[:, None] * DV + offs_dv[None, :]
            tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=store_mask)
        else:
            part_rows = split * rows_total + out_rows
            tl.store(partial_ptr + part_rows[:, None] * DV + offs_dv[None, :], acc, mask=store_mask)
            tl.store(stats_ptr + part_rows * 2, row_max, mask=row_valid)
            tl.store(stats_ptr + part_rows * 2 + 1, row_sum, mask=row_valid)

    @triton.jit
    def combine_splits_kernel(
        partial_ptr, stats_ptr, out_ptr, rows_total, DV, SPLITS: tl.constexpr, HEAD_DIM_V: tl.constexpr
    ):
        """out[row] = sum_s 2**(m_s - M) acc_s / sum_s 2**(m_s - M) l_s over the splits of one row."""
        row = tl.program_id(0)
        offs = tl.arange(0, HEAD_DIM_V)
        valid = offs < DV
        top = tl.load(stats_ptr + row * 2)
        for s in tl.static_range(1, SPLITS):
            top = _max_nan(top, tl.load(stats_ptr + (s * rows_total + row) * 2))
        safe_top = tl.where(top == float("-inf"), 0.0, top)
        acc = tl.zeros((HEAD_DIM_V,), dtype=tl.float32)
        total = 0.0
        for s in tl.static_range(SPLITS):
            weight = tl.math.exp2(tl.load(stats_ptr + (s * rows_total + row) * 2) - safe_top)
            total += weight * tl.load(stats_ptr + (s * rows_total + row) * 2 + 1)
            acc += weight * tl.load(partial_ptr + (s * rows_total + row) * DV + offs, mask=valid, other=0.0)
        out = tl.math.div_rn(acc, tl.full((HEAD_DIM_V,), 1.0, tl.float32) * total)
        out = tl.where(total == 0, 0.0, out)
        tl.store(out_ptr + row * DV + offs, out.to(out_ptr.dtype.element_ty), mask=valid)

    # Measured candidates for H100 (benchmarks/bench_attention.py); autotuned per head dim, causal,
    # mask kind, formats and length buckets (eager calls; Inductor tunes once per compiled graph).
    PREFILL_CONFIGS = [
        triton.Config({"BLOCK_M": m, "FOLD_V": f}, num_warps=w, num_stages=s)
        for m in (128, 64) for w in (8, 4) for s in (3, 2) for f in (True, False)
        if (m, w) != (128, 4)  # 128 x 128 on one warpgroup spills (benchmarks/NOTES-attention.md)
    ] + [
        # three 64-row programs per SM (168 registers x 128 threads): programs not tied by one
        # barrier overlap one's softmax with another's MMAs (v4, NOTES)
        triton.Config({"BLOCK_M": 64, "FOLD_V": True}, num_warps=4, num_stages=2, maxnreg=168),
    ]  # fmt: skip
    # (two 8-warp configs capped at 128 registers, two programs per SM, lost to these at every split
    # count: 0.63-0.67x of bf16 against 0.74x, NOTES-attention.md v6; L == 1 runs attention_decode.py)
    DECODE_CONFIGS = [triton.Config({}, num_warps=w, num_stages=s) for w in (4, 8) for s in (3, 2)]
    _TUNING_KEY = [
        "HEAD_DIM", "HEAD_DIM_V", "IS_CAUSAL", "MASK_KIND", "QK_INT8", "SMOOTH_K", "PREQUANT", "FOLD_V",
        "KV_SCALE_ROWS", "Q_BUCKET", "KV_BUCKET",
    ]  # fmt: skip
    _PREFILL_KERNELS: dict = {}

    def _with_kv_tile(config, block_n: int):
        kwargs = {"BLOCK_N": block_n, **config.kwargs}
        return triton.Config(kwargs, num_warps=config.num_warps, num_stages=config.num_stages, maxnreg=config.maxnreg)

    def prefill_configs(q_rows: int, kv_rows: int | None = None) -> list:
        """The prefill candidates for Q blocks of q_rows and K/V blocks of kv_rows (default q_rows):
        tiles holding whole Q blocks (BLOCK_M a multiple of q_rows) or a whole fraction of one whose
        programs read the rest of the block for its scale (those with a `maxnreg`: the small tiles
        for several programs per SM); K/V tiles of one block (BLOCK_N = kv_rows), or smaller inside
        larger blocks (an explicit config only). Each (Q, K/V) block pair gets its own autotuner over
        only these, so no launch path can pair a tile with a block it cannot scale."""
        kv_rows = q_rows if kv_rows is None else kv_rows

        def fits(c):
            block_m = c.kwargs["BLOCK_M"]
            return block_m % q_rows == 0 or (c.maxnreg is not None and q_rows % block_m == 0)

        # (64-key tiles inside 128-key blocks, register-capped for 2-4 programs per SM, lost to the
        # 64 x 128 tile on the H100 at every case of bench_attention: NOTES v5; a config may still
        # set BLOCK_N below the block)
        kept = [_with_kv_tile(c, kv_rows) for c in PREFILL_CONFIGS if fits(c)]
        return kept or [
            triton.Config(
                {"BLOCK_M": max(16, q_rows), "BLOCK_N": kv_rows, "FOLD_V": FOLD_V_SCALE}, num_warps=4, num_stages=2
            )
        ]

    def attention_kernel_prefill(q_rows: int, kv_rows: int | None = None):
        key = (q_rows, q_rows if kv_rows is None else kv_rows)
        if key not in _PREFILL_KERNELS:
            _PREFILL_KERNELS[key] = triton.autotune(configs=prefill_configs(*key), key=_TUNING_KEY)(attention_kernel)
        return _PREFILL_KERNELS[key]

    attention_kernel_decode = triton.autotune(configs=DECODE_CONFIGS, key=[*_TUNING_KEY, "PACK_ROWS", "SPLITS"])(
        attention_kernel
    )

    _PREPASS_KERNELS: dict = {}

    def quantize_kv_kernel_capped(num_warps: int, maxnreg: int):
        """`quantize_kv_kernel` with a register cap: a one-config autotuner, the form in which
        Inductor's wrapper passes `maxnreg` (a plain launch keyword would be taken for an argument)."""
        key = (num_warps, maxnreg)
        if key not in _PREPASS_KERNELS:
            config = triton.Config({}, num_warps=num_warps, maxnreg=maxnreg)
            _PREPASS_KERNELS[key] = triton.autotune(configs=[config], key=[])(quantize_kv_kernel)
        return _PREPASS_KERNELS[key]


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _bucket(n) -> int:
    """A power-of-two length bucket for autotuning keys; 0 for a symbolic length (no guard)."""
    return triton.next_power_of_2(n) if isinstance(n, int) else 0


def _padded_dim(d: int) -> int:
    return max(MIN_HEAD_DIM, triton.next_power_of_2(d))


def decode_rows(query_len, group: int, q_block: int) -> int | None:
    """Rows of a packed decode tile (L * next_pow2(group), at least 16), or None for prefill tiles.
    Only static lengths pack: a dynamic L never picks a path (no guard on it)."""
    if not isinstance(query_len, int) or query_len > q_block:
        return None
    pad = triton.next_power_of_2(query_len)
    rows = pad * triton.next_power_of_2(group)
    return max(16, rows) if rows <= DECODE_MAX_ROWS else None


def _splits(batch, kv_heads, kv_len, block_n: int, device: torch.device, per_sm: int | None = None) -> int:
    """KV splits of a decode launch: per_sm (default DECODE_PROGRAMS_PER_SM) programs per SM, at
    least a tile each."""
    if not all(isinstance(n, int) for n in (batch, kv_heads, kv_len)):
        return 8
    per_sm = DECODE_PROGRAMS_PER_SM if per_sm is None else per_sm
    programs = max(1, batch * kv_heads)
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    return max(1, min(MAX_SPLITS, triton.cdiv(per_sm * sms, programs), triton.cdiv(kv_len, block_n)))


def fma_decode(query_len, group: int) -> bool:
    """Whether a launch of these static sizes runs the FMA decode kernel (`attention_decode.py`)."""
    from lowbit_compile.kernels import attention_decode

    return DECODE_FMA and query_len == 1 and triton.next_power_of_2(group) <= attention_decode.MAX_GROUP


def _run_fma_decode(q4, k4, v4, mask, mask_strides, out, constants: dict, wrap, config: dict | None, qk_scale: float):
    """The L == 1 decode launch of `attention_decode.decode_attention_kernel` (+ the split combine)."""
    from lowbit_compile.kernels import attention_decode

    batch, q_heads, _, head_dim = q4.shape
    kv_heads, kv_len, value_dim = k4.shape[1], k4.shape[2], v4.shape[3]
    group = q_heads // kv_heads
    block_n = constants["KV_SCALE_ROWS"]
    splits = _splits(batch, kv_heads, kv_len, block_n, q4.device, DECODE_FMA_PROGRAMS_PER_SM)
    split_len = triton.cdiv(triton.cdiv(kv_len, splits), block_n) * block_n
    rows_total = batch * q_heads
    if splits > 1:
        partial = torch.empty((splits, rows_total, value_dim), dtype=torch.float32, device=q4.device)
        stats = torch.empty((splits, rows_total, 2), dtype=torch.float32, device=q4.device)
    else:
        partial, stats = out, out
    launch = {
        name: constants[name]
        for name in (
            "HEAD_DIM", "HEAD_DIM_V", "IS_CAUSAL", "MASK_KIND", "QK_INT8", "QK_QMAX", "V_QMAX", "SMOOTH_K",
            "SOFT_FP8", "SCALE_FROM_D",
        )
    }  # fmt: skip
    launch.update(GROUP_PAD=triton.next_power_of_2(group), SPLITS=splits, BLOCK_N=block_n)
    if config is not None:
        kernel = attention_decode.decode_attention_kernel
        launch.update(PREFETCH=config.get("PREFETCH", True), num_warps=config.get("num_warps", 4))
        launch.update(num_stages=1, **({"maxnreg": config["maxnreg"]} if config.get("maxnreg") else {}))
    else:
        kernel = attention_decode.decode_attention_kernel_tuned
    if wrap is not None:
        kernel = wrap(kernel)
    kernel[(batch * kv_heads, splits)](
        q4, k4, v4, mask, out, partial, stats,
        kv_len, head_dim, value_dim, kv_heads, group, rows_total, split_len, qk_scale,
        q4.stride(0), q4.stride(1), q4.stride(3), *k4.stride(), *v4.stride(),
        mask_strides[0], mask_strides[1], mask_strides[3], _bucket(kv_len), **launch,
    )  # fmt: skip
    if splits > 1:
        combine = wrap(combine_splits_kernel) if wrap is not None else combine_splits_kernel
        combine[(rows_total,)](partial, stats, out, rows_total, value_dim, SPLITS=splits, HEAD_DIM_V=launch["HEAD_DIM_V"])
    return out


def _quantize_kv(k4, v4, attention_format, block_n: int, constants: dict, wrap) -> tuple:
    """K and V codes and per-block scales for a PREQUANT launch, by `quantize_kv_kernel`:
    (k codes (B*Hkv, S_PAD, HEAD_DIM), k scales (B*Hkv * S_PAD / BLOCK_N,) row-major, v codes
    transposed (B*Hkv, HEAD_DIM_V, S_PAD), v scales)."""
    _, k_fmt, v_fmt = attention_format.formats
    batch, kv_heads, kv_len, head_dim = k4.shape
    value_dim = v4.shape[3]
    blocks = (kv_len + block_n - 1) // block_n
    s_pad = blocks * block_n
    rows = batch * kv_heads
    k_int8 = k_fmt.element is ElementType.INT8
    device = k4.device
    k_dtype = torch.int8 if k_int8 else torch.float8_e4m3fn
    k_codes = torch.empty((rows, s_pad, constants["HEAD_DIM"]), dtype=k_dtype, device=device)
    v_codes = torch.empty((rows, constants["HEAD_DIM_V"], s_pad), dtype=torch.float8_e4m3fn, device=device)
    # flat: a (rows, blocks) tensor's contiguity check asks whether blocks == 1, a guard on the
    # sequence length (a second graph for lengths within one block under dynamic=True)
    k_scales = torch.empty((rows * blocks,), dtype=torch.float32, device=device)
    v_scales = torch.empty((rows * blocks,), dtype=torch.float32, device=device)
    per_program = QUANTIZE_KV_BLOCKS_PER_PROGRAM
    num_warps = QUANTIZE_KV_WARPS if block_n * constants["HEAD_DIM"] > 8192 else 4
    if QUANTIZE_KV_MAXNREG is None or interpreting():
        kernel, launch = quantize_kv_kernel, {"num_warps": num_warps}
    else:
        kernel, launch = quantize_kv_kernel_capped(num_warps, QUANTIZE_KV_MAXNREG), {}
    kernel = wrap(kernel) if wrap is not None else kernel
    kernel[(rows, (blocks + per_program - 1) // per_program, 2 if QUANTIZE_KV_SPLIT else 1)](
        k4, v4, k_codes, k_scales, v_codes, v_scales,
        kv_len, head_dim, value_dim, kv_heads, s_pad, per_program,
        *k4.stride(), *v4.stride(),
        HEAD_DIM=constants["HEAD_DIM"], HEAD_DIM_V=constants["HEAD_DIM_V"], K_INT8=k_int8,
        K_QMAX=float(k_fmt.qmax), V_QMAX=float(v_fmt.qmax), SMOOTH_K=attention_format.smooth_k,
        SOFT_FP8=constants["SOFT_FP8"], BLOCK_N=block_n, SPLIT_KV=QUANTIZE_KV_SPLIT, **launch,
    )  # fmt: skip
    return k_codes, k_scales, v_codes, v_scales


def _sdpa_decode(q4, k4, v4, mask, is_causal: bool, scale: float | None, out: torch.Tensor) -> None:
    """Unquantized attention into `out` (contiguous (B, Hq, L, Dv)) by SDPA: the GQA group by
    `enable_gqa` (K/V not repeated), a float mask in the operands' dtype as SDPA requires."""
    if mask is not None and mask.dtype != torch.bool and mask.dtype != q4.dtype:
        mask = mask.to(q4.dtype)
    gqa = q4.shape[1] != k4.shape[1]
    if not isinstance(gqa, bool):  # symbolic head counts (no guard on them): the GQA form serves both
        gqa = True
    result = torch.nn.functional.scaled_dot_product_attention(
        q4, k4, v4, attn_mask=mask, is_causal=is_causal, scale=scale, enable_gqa=gqa
    )
    out.copy_(result)


def run(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None,
    is_causal: bool,
    scale: float | None,
    enable_gqa: bool,
    fmt: str,
    out_dtype: torch.dtype,
    wrap=None,
    config: dict | None = None,
    out: torch.Tensor | None = None,
    bf16_decode: bool = False,
) -> torch.Tensor:
    """The op body: `reference.attention(q, k, v, ...)` by the kernel, out (..., Hq, L, Dv) contiguous.
    `bf16_decode`: decode launches (those that would pack a decode tile) run unquantized SDPA instead
    (`DECODE_SDPA`), unless the opt-in FMA decode kernel takes them.

    `config` ({"BLOCK_M", "num_warps", "num_stages"}) launches the undecorated kernel with it (the
    interpreter, tests); otherwise the autotuned kernel runs (GPU). `out`: a contiguous (B, Hq, L, Dv)
    tensor to write into (tests poison it), else a new one."""
    attention_format = get_attention_format(fmt)
    q_fmt, k_fmt, v_fmt = attention_format.formats
    lead = q.shape[:-3]
    q4 = q.reshape(-1, *q.shape[-3:]) if q.dim() != 4 else q
    k4 = k.reshape(-1, *k.shape[-3:]) if k.dim() != 4 else k
    v4 = v.reshape(-1, *v.shape[-3:]) if v.dim() != 4 else v
    batch, q_heads, query_len, head_dim = q4.shape
    kv_heads, kv_len, value_dim = k4.shape[1], k4.shape[2], v4.shape[3]
    group = q_heads // kv_heads
    if out is None:
        out = torch.empty((batch, q_heads, query_len, value_dim), dtype=out_dtype, device=q.device)
    if attn_mask is None:
        mask, mask_kind, mask_strides = q4, MASK_NONE, (0, 0, 0, 0)
    else:
        mask = attn_mask.expand(*lead, q_heads, query_len, kv_len) if attn_mask.dim() < q.dim() else attn_mask
        mask = mask.reshape(-1, *mask.shape[-3:]) if mask.dim() != 4 else mask
        mask = mask.expand(batch, q_heads, query_len, kv_len)
        mask_kind = MASK_BOOL if mask.dtype == torch.bool else MASK_FLOAT
        mask_strides = tuple(mask.stride())
    block_n = k_fmt.block_rows
    scale_from_d = scale is None  # the kernel computes log2(e) / sqrt(D): D may be symbolic here
    softmax_scale = 1.0 if scale is None else scale
    packed = decode_rows(query_len, group, q_fmt.block_rows)
    rows_total = batch * q_heads * query_len
    constants = dict(
        HEAD_DIM=_padded_dim(head_dim),
        HEAD_DIM_V=_padded_dim(value_dim),
        IS_CAUSAL=bool(is_causal),
        MASK_KIND=mask_kind,
        QK_INT8=q_fmt.element is ElementType.INT8,
        QK_QMAX=float(q_fmt.qmax),
        V_QMAX=float(v_fmt.qmax),
        SMOOTH_K=attention_format.smooth_k,
        SOFT_FP8=interpreting(),
        SCALE_FROM_D=scale_from_d,
        KV_SCALE_ROWS=block_n,
    )
    if packed is not None and fma_decode(query_len, group):
        qk_scale = 0.0 if scale_from_d else softmax_scale * LOG2E
        _run_fma_decode(q4, k4, v4, mask, mask_strides, out, constants, wrap, config, qk_scale)
        return out.reshape(*lead, q_heads, query_len, value_dim)
    if packed is not None and bf16_decode:
        _sdpa_decode(q4, k4, v4, None if attn_mask is None else mask, is_causal, scale, out)
        return out.reshape(*lead, q_heads, query_len, value_dim)
    prequant = packed is None and PREQUANTIZE_PREFILL
    constants.update(PREQUANT=prequant, HEAD_GROUP=CAUSAL_HEAD_GROUP if packed is None and is_causal else 1)
    if packed is not None or config is not None:  # else tuning parameters of the prefill configs
        constants.update(FOLD_V=(config or {}).get("FOLD_V", FOLD_V_SCALE))
        constants.update(BLOCK_N=(config or {}).get("BLOCK_N", block_n) if packed is None else block_n)
    if packed is None:
        splits, split_len = 1, kv_len
        constants.update(Q_SCALE_ROWS=q_fmt.block_rows, PACK_ROWS=0, SPLITS=1)
        partial, stats = out, out
    else:
        splits = _splits(batch, kv_heads, kv_len, block_n, q.device)
        split_len = triton.cdiv(triton.cdiv(kv_len, splits), block_n) * block_n
        pad = triton.next_power_of_2(query_len)
        constants.update(Q_SCALE_ROWS=pad, PACK_ROWS=pad, SPLITS=splits, BLOCK_M=packed)
        if splits > 1:
            partial = torch.empty((splits, rows_total, value_dim), dtype=torch.float32, device=q.device)
            stats = torch.empty((splits, rows_total, 2), dtype=torch.float32, device=q.device)
        else:
            partial, stats = out, out
    if prequant:
        kv_codes = _quantize_kv(k4, v4, attention_format, block_n, constants, wrap)
        s_pad = kv_codes[0].shape[1]
    else:
        kv_codes, s_pad = (q4, q4, q4, q4), block_n
    args = (
        q4, k4, v4, mask, out, partial, stats, *kv_codes,
        query_len, kv_len, head_dim, value_dim, q_heads, kv_heads, group, rows_total, split_len, s_pad,
        0.0 if scale_from_d else softmax_scale * LOG2E,
        *q4.stride(), *k4.stride(), *v4.stride(), *mask_strides,
        _bucket(query_len), _bucket(kv_len),
    )  # fmt: skip
    if packed is not None:
        grid = (1, batch * kv_heads, splits)
    elif config is not None:
        grid = (triton.cdiv(query_len, config["BLOCK_M"]), batch * q_heads, 1)
    else:

        def grid(meta):
            return ((query_len + meta["BLOCK_M"] - 1) // meta["BLOCK_M"], batch * q_heads, 1)

    if config is not None:
        kernel = attention_kernel
        launch = {**constants, **({} if packed is not None else {"BLOCK_M": config["BLOCK_M"]})}
        launch.update(num_warps=config.get("num_warps", 4), num_stages=config.get("num_stages", 2))
        if config.get("maxnreg") is not None:
            launch["maxnreg"] = config["maxnreg"]
    else:
        kernel = (
            attention_kernel_decode if packed is not None else attention_kernel_prefill(q_fmt.block_rows, block_n)
        )
        launch = constants
    if wrap is not None:
        kernel = wrap(kernel)
    kernel[grid](*args, **launch)
    if splits > 1:
        combine = wrap(combine_splits_kernel) if wrap is not None else combine_splits_kernel
        combine[(rows_total,)](
            partial, stats, out, rows_total, value_dim, SPLITS=splits, HEAD_DIM_V=_padded_dim(value_dim)
        )
    return out.reshape(*lead, q_heads, query_len, value_dim)


def default_config(fmt: str) -> dict:
    """The config the interpreter (and `LOWBIT_AUTOTUNE=0`) launches: one Q block per tile."""
    q_fmt = get_attention_format(fmt).formats[0]
    return {"BLOCK_M": max(16, q_fmt.block_rows), "num_warps": 4, "num_stages": 2}


__all__ = [
    "DECODE_SDPA", "MAX_HEAD_DIM", "attention_kernel", "combine_splits_kernel", "default_config", "quantize_kv_kernel",
    "run",
    "supports",
]
