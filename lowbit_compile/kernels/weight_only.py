"""Weight-only GEMM (A16W4 / A16W8) in Triton: y[M, N] = x[M, K] @ dequantize(w)[N, K].T + bias.

Shapes and layouts (the weight is read in the reference layout of `lowbit_compile.reference`, so
no repacking is needed and the CPU and GPU share one folded weight):
- x:      (M, K) bf16 or fp16, row-major (the launcher flattens leading dims).
- w_data: int4: uint8 (N, K//2), element 2i of a row in the low nibble, 2i+1 in the high nibble;
          symmetric codes stored as code + 8, asymmetric as 0..15 with a zero point.
          8-bit: int8 or float8_e4m3fn (N, K).
- scale:  fp32 (N, K//GROUP) for groups, (N, 1) per channel.
- zero:   fp32 (N, K//GROUP) for int4 with zero point, else unused.
- bias:   (N,) in x's dtype, or absent. out: (M, N) in x's dtype, fp32 accumulation.
Constraints: K % GROUP == 0 (the formats guarantee it), GROUP >= 32 for int4.

How 4-bit is made cheap. x is split into its even and odd columns (`tl.split`), so the low and
high nibbles of each byte meet their activations without interleaving the weight. A nibble c
becomes the exact value MAGIC + c by OR-ing it into the bit pattern of MAGIC (128 for bf16, 1024
for fp16), one integer op per element. When a K tile lies inside one quantization group, the group's
scale s and zero point z leave the inner product:
    sum_k x_k (c_k - z) s = s * (dot(x, MAGIC + c) - (MAGIC + z) * sum_k x_k)
so the tensor cores see raw codes and the scale costs one FMA per output per tile. Tiles that span
several groups (and the 8-bit formats at large tiles) dequantize in registers instead.

Code paths, chosen per M bucket by tile config (`WeightOnlyConfig`):
- GEMV (BLOCK_M == 1): one row per program, products and sums on the CUDA cores; decode. Wide K
  tiles keep enough bytes in flight (about N * BLOCK_K / 2 per step, whatever BLOCK_N is).
- tensor-core tiles (BLOCK_M >= 16): `tl.dot` on the codes (scale after the dot) or on dequantized
  tiles (scale before the dot, when BLOCK_K spans several groups). With SWAP_AB the tile computes
  out^T = W @ x^T, the weight tile being the MMA's A operand in natural order (faster at M <= 128).
- SPLIT_K > 1 (any path): programs take K slices and write fp32 partials, which
  `common.splitk_sum_kernel` sums into the output.
- DEQUANT (compute-bound buckets, M > 128): `dequantize_kernel` writes the weight's values in x's
  dtype (in chunks of rows for large weights), then the tile runs as a plain 16-bit GEMM on them
  (BITS=16); `run` hands a static M in such a bucket to cuBLAS instead (`F.linear`). The tuner
  picks it where it beats the fused tiles, pass included (RESULTS.md, thirteenth session).

K-major int4 (opt-in, `LOWBIT_INT4_KMAJOR=1`; `ops.weight_packing` decides, folding packs with
`pack_kmajor`: int32 words [K/8, N], scales [K/G + 1, N] x 2**-16 whose last row holds split-K
counters, zero points [K/G, N] x 2**16). The M = 1 bucket then runs `gemv_kmajor_kernel` (1.17-1.26x
faster than the GEMV above on H100) and the tensor-core tiles read the words (`KMAJOR`), which is
slower than the reference layout at M >= 16 (RESULTS.md, 2026-11-24 sixth session); one folded
weight serves every M, hence opt-in.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import dataclass

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is an optional dependency (CPU installs run the reference)
    triton = None
    tl = None

from lowbit_compile.formats import ElementType, Format, Granularity
from lowbit_compile.kernels import common

# Formats this kernel family runs, by element and granularity (formats are data: any registered
# record that matches runs here).
SUPPORTED_ACTIVATIONS = (torch.bfloat16, torch.float16)


def supports(fmt: Format) -> str | None:
    """None if the weight-only kernels run `fmt`, else why not."""
    if fmt.element is ElementType.INT4:
        if fmt.granularity is not Granularity.GROUP or fmt.group_size < 32:
            return f"int4 kernels need groups of >= 32 along K, not {fmt.name}"
        return None
    if fmt.element in (ElementType.INT8, ElementType.FP8_E4M3):
        if fmt.granularity is not Granularity.ROW or not fmt.symmetric:
            return f"8-bit weight-only kernels run per-channel scales only, not {fmt.name}"
        return None
    return f"no weight-only kernel for {fmt.element.value} elements"


@dataclass(frozen=True)
class WeightOnlyConfig:
    """One tile configuration; `BLOCK_M == 1` selects the GEMV path."""

    BLOCK_M: int
    BLOCK_N: int
    BLOCK_K: int
    num_warps: int = 4
    num_stages: int = 3
    SPLIT_K: int = 1  # programs along K per output tile; > 1 writes fp32 partials, summed by a second kernel
    # tensor-core tiles: 1 computes out^T = W @ x^T (the weight tile is the MMA's A operand); 2 also
    # applies int4 group scales after the dot at any BLOCK_M (else only up to 16 rows)
    SWAP_AB: int = 0
    # 1: dequantize the whole weight to x's dtype first (`dequantize_kernel`, one pass over it), then
    # run this tile as a plain 16-bit GEMM on it; for compute-bound M, where dequantizing inside the
    # GEMM's loop costs more than the pass
    DEQUANT: int = 0

    def as_tuple(self) -> tuple[int, ...]:
        return dataclasses.astuple(self)

    @classmethod
    def from_tuple(cls, values: tuple[int, ...] | list[int]) -> WeightOnlyConfig:
        return cls(*values)


if triton is not None:

    @triton.jit
    def _unpack_magic(byte, DTYPE: tl.constexpr):
        """uint8 codes (one nibble or 8-bit) -> MAGIC + code, exactly, in DTYPE (bf16: 128, fp16: 1024)."""
        MAGIC_BITS: tl.constexpr = 0x6400 if DTYPE == tl.float16 else 0x4300
        return (byte.to(tl.int16) | MAGIC_BITS).to(DTYPE, bitcast=True)

    @triton.jit
    def _codes_f32(byte):
        """uint8 nibble 0..15 -> exact float32 via the 2**23 bit pattern (an OR and a subtract, no I2F)."""
        return (byte.to(tl.int32) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0

    @triton.jit
    def _int8_f32(q):
        """int8 -> exact float32 via the 1.5 * 2**23 bit pattern (an add and a subtract, no I2F)."""
        return (q.to(tl.int32) + 0x4B400000).to(tl.float32, bitcast=True) - 12582912.0

    @triton.jit
    def _kmajor_bytes(w_ptr, offs_n_safe, k0, K, stride_wk, EVEN_K: tl.constexpr, BLOCK_K: tl.constexpr):
        """The [BLOCK_N, BLOCK_K/2] byte tile of the reference layout, read from K-major int32 words
        [K/8, N] (byte b of word i of column n is reference byte 4i + b of row n): a [BLOCK_K/8,
        BLOCK_N] word tile, transposed, its four bytes joined back in order."""
        offs_kw = k0 // 8 + tl.arange(0, BLOCK_K // 8)
        w_ptrs = w_ptr + offs_kw[:, None] * stride_wk + offs_n_safe[None, :]
        if EVEN_K:
            words = tl.load(w_ptrs)
        else:
            words = tl.load(w_ptrs, mask=(offs_kw < K // 8)[:, None], other=0)
        words = tl.trans(words)
        b0 = words & 0xFF
        b1 = (words >> 8) & 0xFF
        b2 = (words >> 16) & 0xFF
        b3 = (words >> 24) & 0xFF
        # join(join(b0, b2), join(b1, b3))[..., p, q] is byte 2p + q
        both = tl.join(tl.join(b0, b2), tl.join(b1, b3))
        return tl.reshape(both, (words.shape[0], BLOCK_K // 2)).to(tl.uint8)

    @triton.jit
    def _group_scales(scale_ptr, zero_ptr, offs, mask, ZERO_POINT: tl.constexpr, KMAJOR: tl.constexpr):
        """(scales, zero points) of int4 groups at `offs`, as fp32 values (K-major ones are stored
        times 2**-16 and 2**16: undone here, exactly); without zero points the scales twice."""
        s = tl.load(scale_ptr + offs, mask=mask, other=0.0)
        if KMAJOR:
            s = s * 65536.0
        z = s
        if ZERO_POINT:
            z = tl.load(zero_ptr + offs, mask=mask, other=0.0)
            if KMAJOR:
                z = z * 0.0000152587890625
        return s, z

    @triton.jit
    def _load_step(
        w_ptr, x_ptr, scale_ptr, zero_ptr, offs_m, offs_n_safe, pid_m, k0, M, K,
        stride_xm, stride_wn, stride_sn, stride_sg,
        GROUP: tl.constexpr, BITS: tl.constexpr, ZERO_POINT: tl.constexpr, EVEN_K: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SWAP_AB: tl.constexpr,
        KMAJOR: tl.constexpr,
    ):  # fmt: skip
        """Every load of the K step at k0: weight codes [BLOCK_N, BLOCK_K (/2 for int4)], activations
        ([BLOCK_K] for the int4 GEMV, [BLOCK_N, BLOCK_K] broadcast for the 8-bit one, [BLOCK_K,
        BLOCK_M] when SWAP_AB, else [BLOCK_M, BLOCK_K]), and for int4 the group scales and zero
        points ([BLOCK_N] inside one group; [BLOCK_N, groups] for a GEMV tile spanning groups; one
        per element for a larger tile spanning groups). Without zero
        points `z` repeats `s` (unused); 8-bit formats return dummies for both (their scale is per
        channel, applied in the epilogue)."""
        HALF_K: tl.constexpr = BLOCK_K // 2
        offs_k = k0 + tl.arange(0, BLOCK_K)
        if KMAJOR:  # int32 words [K/8, N] (`pack_kmajor`): stride_wn is a word row's stride
            w = _kmajor_bytes(w_ptr, offs_n_safe, k0, K, stride_wn, EVEN_K, BLOCK_K)
        elif BITS == 4:
            offs_kb = k0 // 2 + tl.arange(0, HALF_K)  # byte columns of this tile
            w_ptrs = w_ptr + offs_n_safe[:, None] * stride_wn + offs_kb[None, :]
            if EVEN_K:
                w = tl.load(w_ptrs)
            else:
                w = tl.load(w_ptrs, mask=(offs_kb < K // 2)[None, :], other=0)
        else:
            w_ptrs = w_ptr + offs_n_safe[:, None] * stride_wn + offs_k[None, :]
            if EVEN_K:
                w = tl.load(w_ptrs)
            else:
                w = tl.load(w_ptrs, mask=(offs_k < K)[None, :], other=0)
        if BLOCK_M == 1 and BITS == 8:
            # x loaded straight into the weight tile's shape: a [BLOCK_K] x broadcast into the tile
            # is a layout conversion through shared memory with barriers (NOTES-weight-only.md v10)
            x_ptrs = x_ptr + pid_m * stride_xm + offs_k[None, :] + 0 * offs_n_safe[:, None]
            if EVEN_K:
                x = tl.load(x_ptrs)
            else:
                x = tl.load(x_ptrs, mask=(offs_k < K)[None, :], other=0.0)
        elif BLOCK_M == 1:
            x_ptrs = x_ptr + pid_m * stride_xm + offs_k
            if EVEN_K:
                x = tl.load(x_ptrs)
            else:
                x = tl.load(x_ptrs, mask=offs_k < K, other=0.0)
        elif SWAP_AB:  # transposed: [BLOCK_K, BLOCK_M]; rows past M read as zeros
            x_ptrs = x_ptr + offs_m[None, :] * stride_xm + offs_k[:, None]
            if EVEN_K:
                x = tl.load(x_ptrs, mask=(offs_m < M)[None, :], other=0.0)
            else:
                x = tl.load(x_ptrs, mask=(offs_m < M)[None, :] & (offs_k < K)[:, None], other=0.0)
        else:  # rows past M read as zeros
            x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :]
            if EVEN_K:
                x = tl.load(x_ptrs, mask=(offs_m < M)[:, None], other=0.0)
            else:
                x = tl.load(x_ptrs, mask=(offs_m < M)[:, None] & (offs_k < K)[None, :], other=0.0)
        if BITS == 4:
            if BLOCK_K <= GROUP:
                s_offs = offs_n_safe * stride_sn + (k0 // GROUP) * stride_sg
                s_mask = offs_n_safe >= 0  # (all true; one load form for both cases)
            else:
                if BLOCK_M == 1:
                    offs_g = k0 // GROUP + tl.arange(0, BLOCK_K // GROUP)
                else:
                    offs_g = (k0 + 2 * tl.arange(0, HALF_K)) // GROUP
                s_offs = offs_n_safe[:, None] * stride_sn + offs_g[None, :] * stride_sg
                s_mask = (offs_g < K // GROUP)[None, :]  # the K tail has no scales
            s, z = _group_scales(scale_ptr, zero_ptr, s_offs, s_mask, ZERO_POINT, KMAJOR)
        else:
            s = tl.zeros((BLOCK_N,), dtype=tl.float32)
            z = s
        return w, x, s, z

    @triton.jit
    def weight_only_kernel(
        x_ptr,
        w_ptr,
        scale_ptr,
        zero_ptr,
        bias_ptr,
        out_ptr,
        M,
        N,
        K,
        stride_xm,
        stride_wn,  # the data's row stride: a row of N (K/2 bytes, or K), or of K-major words (N)
        stride_sn,  # scales and zero points: between output channels
        stride_sg,  # and between groups along K
        stride_om,
        stride_os,  # split-K: elements between the partial outputs of two K slices
        K_SLICE,  # split-K: K elements per slice, a multiple of BLOCK_K (K when SPLIT_K == 1)
        out_col0,  # the weight's rows are output (and bias) columns out_col0.. (a chunk of a dequantized weight)
        GROUP: tl.constexpr,  # elements per scale along K; 0 = one scale per output channel
        BITS: tl.constexpr,  # 4 (packed, two per byte), 8, or 16 (dequantized already: x's dtype)
        FLOAT_CODES: tl.constexpr,  # 8-bit codes are fp8 e4m3 (else int8)
        ZERO_POINT: tl.constexpr,  # int4 codes 0..15 with a zero point (else code + 8)
        HAS_BIAS: tl.constexpr,
        EVEN_K: tl.constexpr,  # K % BLOCK_K == 0: no masks along K
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr,  # row tiles that share a sweep over N (L2 reuse of weight tiles)
        SPLIT_K: tl.constexpr,  # > 1: each program covers one K slice and writes fp32 partial sums
        SWAP_AB: tl.constexpr,  # tensor-core tiles compute out^T = W @ x^T (small M: W fills the MMA's M)
        SCALE_AFTER_ANY_M: tl.constexpr,  # int4 tiles inside one group scale after the dot at any BLOCK_M
        KMAJOR: tl.constexpr,  # int4 read from `pack_kmajor`'s words and scaled scales
    ):
        DTYPE: tl.constexpr = x_ptr.dtype.element_ty
        MAGIC: tl.constexpr = 1024.0 if DTYPE == tl.float16 else 128.0
        PER_CHANNEL: tl.constexpr = GROUP == 0 and BITS != 16  # BITS 16: a dequantized weight, no scales
        # The tile lies inside one group: apply the scale after the dot (see the module docstring).
        # Only for small row tiles: with many rows the per-tile correction of the whole accumulator
        # costs as much as the MMA and stalls its pipeline, so large tiles dequantize first.
        SCALE_AFTER: tl.constexpr = PER_CHANNEL or (BLOCK_K <= GROUP and (BLOCK_M <= 16 or SCALE_AFTER_ANY_M))
        HALF_K: tl.constexpr = BLOCK_K // 2

        pid = tl.program_id(0)
        # Split-K: neighbouring programs take the K slices of one output tile (they share x in L2).
        pid_k = pid % SPLIT_K
        pid = pid // SPLIT_K
        k_begin = pid_k * K_SLICE
        k_end = tl.minimum(k_begin + K_SLICE, K)
        num_pid_m = tl.cdiv(M, BLOCK_M)
        num_pid_n = tl.cdiv(N, BLOCK_N)
        # Grouped ordering: GROUP_M row tiles walk the N tiles together, so weight tiles stay in L2.
        num_pid_in_group = GROUP_M * num_pid_n
        group_id = pid // num_pid_in_group
        first_pid_m = group_id * GROUP_M
        group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
        pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
        pid_n = (pid % num_pid_in_group) // group_size_m

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_mask = offs_m < M
        n_mask = offs_n < N
        offs_n_safe = tl.where(n_mask, offs_n, 0)  # masked rows read row 0 instead of masking every load

        if BLOCK_M == 1:
            acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
            # GEMV partial products stay elementwise across the K loop and are reduced once at the
            # end (no cross-thread reduction per tile); `offset` collects the zero-point terms.
            ACC_K: tl.constexpr = HALF_K if BITS == 4 else BLOCK_K
            acc_tile = tl.zeros((BLOCK_N, ACC_K), dtype=tl.float32)
            offset = tl.zeros((BLOCK_N,), dtype=tl.float32)
        elif SWAP_AB:
            acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)  # the transposed output tile
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)

        for k0 in range(k_begin, k_end, BLOCK_K):
            # (Issuing step k+1's loads before step k's math was measured: no faster, more registers.)
            w_tile, x, s, z = _load_step(
                w_ptr, x_ptr, scale_ptr, zero_ptr, offs_m, offs_n_safe, pid_m, k0, M, K,
                stride_xm, stride_wn, stride_sn, stride_sg, GROUP, BITS, ZERO_POINT, EVEN_K, BLOCK_M, BLOCK_N, BLOCK_K,
                SWAP_AB, KMAJOR,
            )  # fmt: skip
            if BITS == 4:
                if not ZERO_POINT:
                    z = 8.0  # symmetric codes are stored as code + 8
                low = w_tile & 0xF  # [BLOCK_N, HALF_K]: elements k0 + 2i
                high = w_tile >> 4  # elements k0 + 2i + 1
                if BLOCK_M == 1:
                    x = x.to(tl.float32)
                    x_even, x_odd = tl.split(tl.reshape(x, (HALF_K, 2)))
                    if SCALE_AFTER:  # one scale per row in this tile: fold it into x
                        acc_tile += _codes_f32(low) * (s[:, None] * x_even[None, :])
                        acc_tile += _codes_f32(high) * (s[:, None] * x_odd[None, :])
                        offset += z * s * tl.sum(x, axis=0)
                    else:  # s, z: [BLOCK_N, groups in the tile]
                        prod = _codes_f32(low) * x_even[None, :] + _codes_f32(high) * x_odd[None, :]
                        GROUPS: tl.constexpr = BLOCK_K // GROUP
                        per_group = tl.sum(tl.reshape(prod, (BLOCK_N, GROUPS, GROUP // 2)), axis=2)
                        x_sum = tl.sum(tl.reshape(x, (GROUPS, GROUP)), axis=1)
                        acc += tl.sum((per_group - z * x_sum[None, :]) * s, axis=1)
                elif SWAP_AB:  # acc[BLOCK_N, BLOCK_M] += W tile @ x tile^T: the weight tile is the
                    # MMA's A operand in its natural order (low and high nibbles joined back), no
                    # transposed weight tile and no split of x
                    if SCALE_AFTER:
                        w = tl.reshape(tl.join(_unpack_magic(low, DTYPE), _unpack_magic(high, DTYPE)), (BLOCK_N, BLOCK_K))
                        part = tl.dot(w, x)
                        x_sum = tl.sum(x.to(tl.float32), axis=0)
                        if ZERO_POINT:
                            acc += (part - (z + MAGIC)[:, None] * x_sum[None, :]) * s[:, None]
                        else:
                            acc += (part - (z + MAGIC) * x_sum[None, :]) * s[:, None]
                    else:
                        if BLOCK_K <= GROUP:
                            s = s[:, None]
                            if ZERO_POINT:
                                z = z[:, None]
                        w_even = ((_codes_f32(low) - z) * s).to(DTYPE)
                        w_odd = ((_codes_f32(high) - z) * s).to(DTYPE)
                        acc = tl.dot(tl.reshape(tl.join(w_even, w_odd), (BLOCK_N, BLOCK_K)), x, acc)
                else:
                    x_even, x_odd = tl.split(tl.reshape(x, (BLOCK_M, HALF_K, 2)))
                    if SCALE_AFTER:
                        part = tl.dot(x_even, tl.trans(_unpack_magic(low, DTYPE)))
                        part = tl.dot(x_odd, tl.trans(_unpack_magic(high, DTYPE)), part)
                        x_sum = tl.sum(x.to(tl.float32), axis=1)
                        if ZERO_POINT:
                            acc += (part - x_sum[:, None] * (z + MAGIC)[None, :]) * s[None, :]
                        else:
                            acc += (part - x_sum[:, None] * (z + MAGIC)) * s[None, :]
                    else:
                        if BLOCK_K <= GROUP:  # inside one group, many rows: one scale per row
                            s = s[:, None]
                            if ZERO_POINT:
                                z = z[:, None]
                        # else the tile spans groups: s and z hold one value per element (gathered)
                        w_even = ((_codes_f32(low) - z) * s).to(DTYPE)
                        w_odd = ((_codes_f32(high) - z) * s).to(DTYPE)
                        acc = tl.dot(x_even, tl.trans(w_even), acc)
                        acc = tl.dot(x_odd, tl.trans(w_odd), acc)
            else:  # 8-bit codes, one scale per output channel (applied in the epilogue), or 16-bit values
                if BITS == 16:  # the weight dequantized in x's dtype (`dequantize_kernel`)
                    w = w_tile
                elif FLOAT_CODES:  # fp8 e4m3 bytes (passed as uint8)
                    w = w_tile.to(tl.float8e4nv, bitcast=True).to(tl.float32)
                else:
                    w = _int8_f32(w_tile)
                if BLOCK_M == 1:  # x: [BLOCK_N, BLOCK_K], loaded broadcast
                    acc_tile += w * x.to(tl.float32)
                elif SWAP_AB:
                    acc = tl.dot(w.to(DTYPE), x, acc)
                else:
                    acc = tl.dot(x, tl.trans(w.to(DTYPE)), acc)

        if BLOCK_M == 1:
            acc += tl.sum(acc_tile, axis=1) - offset
        if PER_CHANNEL:
            channel_scale = tl.load(scale_ptr + offs_n_safe * stride_sn)
            if BLOCK_M == 1:
                acc = acc * channel_scale
            elif SWAP_AB:
                acc = acc * channel_scale[:, None]
            else:
                acc = acc * channel_scale[None, :]
        if HAS_BIAS and pid_k == 0:  # split-K: the bias joins the first slice's partial only
            bias = tl.load(bias_ptr + out_col0 + offs_n_safe).to(tl.float32)
            if BLOCK_M == 1:
                acc += bias
            elif SWAP_AB:
                acc += bias[:, None]
            else:
                acc += bias[None, :]
        out_ptr += pid_k * stride_os + out_col0
        if BLOCK_M == 1:
            tl.store(out_ptr + pid_m * stride_om + offs_n, acc.to(out_ptr.dtype.element_ty), mask=n_mask)
        elif SWAP_AB:
            out_ptrs = out_ptr + offs_m[None, :] * stride_om + offs_n[:, None]
            tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_mask[None, :] & n_mask[:, None])
        else:
            out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
            tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])

    @triton.jit
    def dequantize_kernel(
        w_ptr, scale_ptr, zero_ptr, out_ptr, N0, ROWS, K, stride_wn, stride_sn, stride_sg, stride_on,
        GROUP: tl.constexpr, BITS: tl.constexpr, FLOAT_CODES: tl.constexpr, ZERO_POINT: tl.constexpr,
        KMAJOR: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        """out[ROWS, K] (out's dtype) = the values of the weight's rows N0..N0 + ROWS - 1, (code - z) * s,
        from any layout the GEMM reads (the reference layout or `pack_kmajor`'s words); one
        [BLOCK_N, BLOCK_K] tile per program, BLOCK_K a multiple of the group (int4) or any width
        (8-bit, per channel)."""
        tiles_k = tl.cdiv(K, BLOCK_K)
        pid_n = tl.program_id(0) // tiles_k
        k0 = (tl.program_id(0) % tiles_k) * BLOCK_K
        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # rows of out
        n_mask = rows < ROWS
        offs_n_safe = N0 + tl.where(n_mask, rows, 0)  # rows of the weight
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        if BITS == 4:
            HALF_K: tl.constexpr = BLOCK_K // 2
            if KMAJOR:
                w = _kmajor_bytes(w_ptr, offs_n_safe, k0, K, stride_wn, False, BLOCK_K)
            else:
                offs_kb = k0 // 2 + tl.arange(0, HALF_K)
                w_ptrs = w_ptr + offs_n_safe[:, None] * stride_wn + offs_kb[None, :]
                w = tl.load(w_ptrs, mask=(offs_kb < K // 2)[None, :], other=0)
            codes = tl.reshape(tl.join(_codes_f32(w & 0xF), _codes_f32(w >> 4)), (BLOCK_N, BLOCK_K))
            GROUPS: tl.constexpr = BLOCK_K // GROUP
            offs_g = k0 // GROUP + tl.arange(0, GROUPS)
            s_offs = offs_n_safe[:, None] * stride_sn + offs_g[None, :] * stride_sg
            s_mask = (offs_g < K // GROUP)[None, :]
            s, z = _group_scales(scale_ptr, zero_ptr, s_offs, s_mask, ZERO_POINT, KMAJOR)
            if not ZERO_POINT:
                z = tl.zeros((BLOCK_N, GROUPS), tl.float32) + 8.0  # symmetric codes are stored as code + 8
            values = (tl.reshape(codes, (BLOCK_N, GROUPS, GROUP)) - z[:, :, None]) * s[:, :, None]
            values = tl.reshape(values, (BLOCK_N, BLOCK_K))
        else:
            w = tl.load(w_ptr + offs_n_safe[:, None] * stride_wn + offs_k[None, :], mask=k_mask[None, :], other=0)
            if FLOAT_CODES:  # fp8 e4m3 bytes (passed as uint8)
                codes = w.to(tl.float8e4nv, bitcast=True).to(tl.float32)
            else:
                codes = _int8_f32(w)
            values = codes * tl.load(scale_ptr + offs_n_safe * stride_sn)[:, None]
        out_ptrs = out_ptr + rows[:, None] * stride_on + offs_k[None, :]
        tl.store(out_ptrs, values.to(out_ptr.dtype.element_ty), mask=n_mask[:, None] & k_mask[None, :])

    # -- int4 GEMV on the K-major word layout (`pack_kmajor`) ------------------------------------

    @triton.jit
    def _and_or_magic(v, MASK: tl.constexpr, ASM: tl.constexpr):
        """(v & MASK) | the bits of 2**23: one LOP3 (Triton's code is two, an and and an or)."""
        if ASM:
            return tl.inline_asm_elementwise(
                f"lop3.b32 $0, $1, {MASK}, 1258291200, 0xea;", "=r,r", [v], dtype=tl.int32, is_pure=True, pack=1
            )
        else:
            return (v & MASK) | 0x4B000000

    @triton.jit
    def _add_nibble_products(lo, hi, w, xj, J: tl.constexpr, ASM: tl.constexpr):
        """Nibble J of the words `w` as 2**23 + c * 2**p, times xj, added to `lo` (p = 12) or `hi`
        (p = 16): one of four shifts of the word moves the nibble (and a neighbour) to bit 12 or 16."""
        if J == 0:
            v = w << 12
        elif J <= 2:
            v = w << 8
        elif J <= 4:
            v = w
        elif J <= 6:
            v = w >> 8
        else:
            v = w >> 12
        if J == 0 or J == 1 or J == 3 or J == 5:  # now at bit 12
            lo += _and_or_magic(v, 0xF000, ASM).to(tl.float32, bitcast=True) * xj
        else:  # at bit 16
            hi += _and_or_magic(v, 0xF0000, ASM).to(tl.float32, bitcast=True) * xj
        return lo, hi

    @triton.jit
    def gemv_kmajor_kernel(
        x_ptr, w_ptr, s_ptr, z_ptr, bias_ptr, out_ptr, part_ptr,
        M, N, K, stride_xm, stride_om, KW_SLICE,
        GROUP: tl.constexpr, ZERO_POINT: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr, SPLIT_K: tl.constexpr, ASM: tl.constexpr,
    ):  # fmt: skip
        """y[m, n] = sum_k x[m, k] (c[k, n] - z) s for int4 codes packed K-major (`pack_kmajor`):
        w int32 [K/8, N] (word i of column n: elements 8i..8i+7, nibble j = element 8i + j), scales
        [K/G + 1, N] fp32 times 2**-16 (the last row: split-K counters, zero between calls), zero
        points [K/G, N] times 2**16. Programs take [BLOCK_KW, BLOCK_N] word tiles; a thread holds
        words of one K position for several columns, so x is loaded once per thread for all of them
        (as a [BLOCK_KW, 1] tensor: fewer elements than threads, so no layout conversion). A nibble
        becomes 2**23 + c * 2**p by one and-or (p = 12 or 16, placed by one of four shifts of the
        word); the 2**23 x terms and the zero point are subtracted once per word:
            sum_j c_j x_j = (16 lo + hi - 2**23 (16 x_lo + x_hi)) / 2**16
        with lo / hi the products of the nibbles at bit 12 / 16 and x_lo / x_hi the sums of their
        activations. SPLIT_K > 1: programs write fp32 partials and the last to finish a tile (an
        atomic counter) sums them and writes the output, so there is one launch."""
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
        for kw0 in range(kw_begin, kw_end, BLOCK_KW):
            kw = kw0 + tl.arange(0, BLOCK_KW)
            if EVEN:
                mask = n_mask[None, :]
                kw_ok = kw >= 0
            else:
                kw_ok = kw < kw_end
                mask = kw_ok[:, None] & n_mask[None, :]
            w = tl.load(w_ptr + kw[:, None] * N + offs_n[None, :], mask=mask, other=0)
            if BLOCK_KW * 8 <= GROUP:  # one group: a row of scales, loaded straight into the tile's layout
                s_offs = (kw0 * 8 // GROUP) * N + offs_n[None, :]
                s_mask = n_mask[None, :] & ((offs_n * 0 + kw0) < kw_end)[None, :]
            else:
                s_offs = (kw * 8 // GROUP)[:, None] * N + offs_n[None, :]
                s_mask = mask
            s = tl.load(s_ptr + s_offs, mask=s_mask, other=0.0)
            x_ptrs = x_row + kw * 8
            x_lo = tl.zeros((BLOCK_KW, 1), tl.float32)
            x_hi = tl.zeros((BLOCK_KW, 1), tl.float32)
            for j in tl.static_range(8):
                xj = tl.load(x_ptrs + j, mask=kw_ok, other=0.0).to(tl.float32)[:, None]
                if j == 0 or j == 1 or j == 3 or j == 5:
                    x_lo += xj
                else:
                    x_hi += xj
            magic = -8388608.0 * (16.0 * x_lo + x_hi)
            if ZERO_POINT:
                z = tl.load(z_ptr + s_offs, mask=s_mask, other=0.0)
                hi = magic - z * (x_lo + x_hi)
            else:  # symmetric codes are stored as code + 8: z' = 8 * 2**16
                hi = tl.broadcast_to(magic - 524288.0 * (x_lo + x_hi), (BLOCK_KW, BLOCK_N))
            lo = tl.zeros((BLOCK_KW, BLOCK_N), tl.float32)
            for j in tl.static_range(8):
                xj = tl.load(x_ptrs + j, mask=kw_ok, other=0.0).to(tl.float32)[:, None]  # (loaded once)
                lo, hi = _add_nibble_products(lo, hi, w, xj, j, ASM)
            acc += s * (16.0 * lo + hi)
        total = tl.sum(acc, axis=0)
        out_ptrs = out_ptr + pid_m * stride_om + offs_n
        if SPLIT_K == 1:
            if HAS_BIAS:
                total += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
            tl.store(out_ptrs, total.to(out_ptr.dtype.element_ty), mask=n_mask)
        else:
            # partials [tiles, SPLIT_K, BLOCK_N]; the last program of the tile to arrive sums them
            # (the barrier and the release order every thread's partial before the counter)
            tl.store(part_ptr + (tile * SPLIT_K + pid_k) * BLOCK_N + tl.arange(0, BLOCK_N), total)
            tl.debug_barrier()
            count_ptr = (s_ptr + (K // GROUP) * N).to(tl.pointer_type(tl.int32), bitcast=True) + tile
            arrived = tl.atomic_add(count_ptr, 1, sem="acq_rel", scope="gpu")
            if arrived == SPLIT_K - 1:
                summed = tl.zeros((BLOCK_N,), tl.float32)
                for i in tl.static_range(SPLIT_K):  # .cg: past L1, which may hold stale lines
                    part = part_ptr + (tile * SPLIT_K + i) * BLOCK_N + tl.arange(0, BLOCK_N)
                    summed += tl.load(part, cache_modifier=".cg")
                if HAS_BIAS:
                    summed += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
                tl.store(out_ptrs, summed.to(out_ptr.dtype.element_ty), mask=n_mask)
                tl.atomic_xchg(count_ptr, 0, sem="relaxed", scope="gpu")  # ready for the next call


# -- launch parameters ----------------------------------------------------------------------------


@dataclass(frozen=True)
class WeightMeta:
    """What the kernel needs to know about a folded weight (all static at compile time)."""

    n: int
    k: int
    bits: int
    group: int  # 0: per channel
    float_codes: bool
    zero_point: bool
    kmajor: bool = False  # int4 packed by `pack_kmajor` (int32 words [K/8, N])

    @classmethod
    def of(cls, fmt: Format, w_data: torch.Tensor) -> WeightMeta:
        bits = fmt.bits
        group = fmt.group_size if fmt.granularity is Granularity.GROUP else 0
        kmajor = is_kmajor(w_data)
        if kmajor:
            n, k = w_data.shape[1], w_data.shape[0] * 8
        else:
            n, k = w_data.shape[0], w_data.shape[-1] * (2 if bits == 4 else 1)
        return cls(n=n, k=k, bits=bits, group=group, float_codes=fmt.is_float, zero_point=not fmt.symmetric, kmajor=kmajor)


def config_is_valid(config: WeightOnlyConfig, meta: WeightMeta) -> bool:
    """Whether the kernel can run `config` on this weight (tile/group compatibility, K coverage)."""
    if config.DEQUANT:  # a 16-bit GEMM after the dequantizing pass: tensor-core tiles, one K slice
        return config.BLOCK_M >= 16 and config.SPLIT_K == 1 and config.SWAP_AB == 0 and config.BLOCK_K % 16 == 0
    if meta.kmajor and config.BLOCK_M == 1:  # the K-major GEMV: whole words, any group
        return config.BLOCK_K % 8 == 0 and config.BLOCK_K <= max(8, triton.next_power_of_2(meta.k))
    if config.BLOCK_K % 32 or config.BLOCK_K > max(32, triton.next_power_of_2(meta.k) if triton else meta.k):
        return False
    if meta.bits == 4:
        group = meta.group
        inside_group = config.BLOCK_K <= group and group % config.BLOCK_K == 0
        spans_groups = config.BLOCK_K % group == 0
        if not (inside_group or spans_groups):
            return False
    return True


def kernel_arguments(meta: WeightMeta, config: WeightOnlyConfig, has_bias: bool) -> dict[str, int | bool]:
    """The constexpr arguments of one launch (warps and stages travel with `common.runner`)."""
    return dict(
        GROUP=meta.group,
        BITS=meta.bits,
        FLOAT_CODES=meta.float_codes,
        ZERO_POINT=meta.zero_point,
        HAS_BIAS=has_bias,
        EVEN_K=meta.k % config.BLOCK_K == 0,
        BLOCK_M=config.BLOCK_M,
        BLOCK_N=config.BLOCK_N,
        BLOCK_K=config.BLOCK_K,
        GROUP_M=8,
        SPLIT_K=config.SPLIT_K,
        SWAP_AB=bool(config.SWAP_AB) and config.BLOCK_M > 1,
        SCALE_AFTER_ANY_M=config.SWAP_AB == 2,
        # every constexpr is passed, none left to its default: Inductor's launcher for a user kernel
        # miscounts its arguments when one is left out ("launcher() missing ... '_grid_2'")
        KMAJOR=meta.kmajor,
    )


def grid(m, n: int, config: WeightOnlyConfig) -> tuple:
    """Programs for M rows (an int or SymInt): row tiles x column tiles x K slices."""
    tiles_m = (m + config.BLOCK_M - 1) // config.BLOCK_M
    return tiles_m * triton.cdiv(n, config.BLOCK_N) * config.SPLIT_K


def k_slice(meta: WeightMeta, config: WeightOnlyConfig) -> int:
    """K elements per split-K slice: whole tiles, spread evenly over the slices."""
    tiles = triton.cdiv(meta.k, config.BLOCK_K)
    return triton.cdiv(tiles, config.SPLIT_K) * config.BLOCK_K


# -- M buckets and tuning -----------------------------------------------------------------------

# `common.M_BUCKETS` with the compute-bound rows split in two: dequantizing the weight in one pass
# and running a 16-bit GEMM on it (`DEQUANT`) competes with the fused tiles there, and the pass
# weighs far more at a few hundred rows than at a few thousand, so each part is tuned apart.
M_BUCKETS: tuple[tuple[int, int | None, int], ...] = common.M_BUCKETS[:-1] + ((129, 1024, 512), (1025, None, 4096))

def _candidates(bucket_m: int, meta: WeightMeta) -> list[WeightOnlyConfig]:
    """Tile configs worth trying for a bucket, pruned by shape: tiles are clamped to the weight
    (no BLOCK_N or BLOCK_K far beyond N or K), invalid ones dropped, duplicates removed."""
    C = WeightOnlyConfig
    wide_k = (512, 256) if meta.bits == 4 else (256, 128)
    # The first config of each bucket is the default (tuning off, or the interpreter): a modest
    # tile that fits any GPU's shared memory. Configs that do not fit are skipped when tuning.
    # Decode is latency bound: the bytes in flight are about N * BLOCK_K / 2 (int4) per K step,
    # whatever BLOCK_N is, so small-M configs take wide K tiles or split K over more programs.
    # Measured on H100 (benchmarks/sweep_weight_only.py, RESULTS.md): decode wants wide K tiles
    # (the bytes in flight per K step are about N * BLOCK_K / 2 for int4, whatever BLOCK_N is);
    # tensor-core tiles win with the weight as the MMA's A operand (SWAP_AB) and split K.
    if bucket_m == 1 and meta.kmajor:  # `gemv_kmajor_kernel`: BLOCK_K = 8 * BLOCK_KW, one stage
        configs = [C(1, c.BLOCK_N, 8 * c.BLOCK_KW, c.num_warps, 1, c.SPLIT_K) for c in KMAJOR_GEMV_CANDIDATES]
    elif bucket_m == 1:
        configs = [C(1, 8, wide_k[1], 4, 3)]
        decode_tiles = ((8, 2048), (8, 4096), (4, 4096), (8, 1024), (4, 1024), (8, 512), (16, 256))
        configs += [C(1, bn, bk, 4, 2) for bn, bk in decode_tiles]
        configs += [C(1, 8, wide_k[0], 4, 3, s) for s in (2, 4)]
    elif bucket_m <= 16:
        configs = [C(16, 32, 128, 4, 3)]
        configs += [C(16, 64, 128, 4, 3, s, 1) for s in (1, 2, 4, 8)]
        configs += [C(16, 128, 128, 4, 3, s, 1) for s in (2, 4, 8)]
        configs += [C(16, 32, 128, 4, 3, 4), C(16, 64, 128, 4, 4, 1), C(16, 64, 64, 4, 3, 2, 1)]
    elif bucket_m <= 128:
        configs = [C(64, 64, 64, 4, 3)]
        configs += [C(128, 64, 128, 4, 3, s, swap) for s in (1, 2) for swap in (1, 2)]
        configs += [C(128, 128, 128, 8, 3, 1, 1), C(64, 64, 128, 4, 3, 1, 1), C(128, 64, 64, 4, 4, 4)]
    else:
        configs = [C(128, 128, 64, 8, 3)]
        configs += [C(128, bn, bk, 8, s) for bn, bk, s in ((128, 64, 4), (128, 128, 3), (256, 64, 3))]
        configs += [C(64, 256, 64, 8, 3), C(128, 128, 32, 4, 4), C(64, 128, 64, 4, 4)]
        configs += [C(128, 64, 128, 4, 3, 1, 1), C(128, 64, 128, 4, 3, 1, 2), C(128, 128, 128, 8, 3, 1, 1)]
        # dequantize, then a 16-bit GEMM (cuBLAS where M is static). The tiles: the best of a sweep
        # on H100 (RESULTS.md, thirteenth session: 0.80-0.90x of cuBLAS; 128x256 tiles 0.43-0.75x)
        dense = ((256, 128, 64, 8, 3), (256, 128, 64, 8, 4), (128, 128, 64, 8, 4), (128, 128, 64, 4, 4))
        configs += [C(bm, bn, bk, w, st, DEQUANT=1) for bm, bn, bk, w, st in dense]
    max_n = max(8 if bucket_m == 1 else 16, triton.next_power_of_2(meta.n))  # tl.dot needs N >= 16
    max_k = max(8 if bucket_m == 1 and meta.kmajor else 32, triton.next_power_of_2(meta.k))
    clamped = [dataclasses.replace(c, BLOCK_N=min(c.BLOCK_N, max_n), BLOCK_K=min(c.BLOCK_K, max_k)) for c in configs]
    return [c for c in dict.fromkeys(clamped) if config_is_valid(c, meta)]


def default_config(bucket_m: int, meta: WeightMeta) -> WeightOnlyConfig:
    """A config that runs everywhere (the interpreter, or with tuning off): the first valid candidate."""
    return _candidates(bucket_m, meta)[0]


def launch(
    x2d: torch.Tensor,
    w_data: torch.Tensor,
    w_scale: torch.Tensor,
    w_zero_point: torch.Tensor,
    bias: torch.Tensor | None,
    out: torch.Tensor,
    meta: WeightMeta,
    config: WeightOnlyConfig,
    active=1,
    max_rows: int | None = None,
    wrap=None,
) -> None:
    """The launches for all rows of `x2d` into `out` (M, N, contiguous). `active` (0 or 1, possibly a
    SymInt) multiplies the grids: 0 launches nothing. `max_rows` bounds the rows a split-K config's
    fp32 partials hold (the bucket's last row). `wrap` is `torch.library.wrap_triton` when traced."""
    if meta.kmajor and config.BLOCK_M == 1:
        gemv = KMajorGemvConfig(config.BLOCK_N, config.BLOCK_K // 8, config.SPLIT_K, config.num_warps)
        zero = w_zero_point if meta.zero_point else w_zero_point[:0]  # the GEMV reads zero points if present
        launch_gemv_kmajor(x2d, w_data, w_scale, zero, bias, out, meta.group, gemv, active, max_rows, wrap)
        return
    if config.DEQUANT:
        _launch_dequant_gemm(x2d, w_data, w_scale, w_zero_point, bias, out, meta, config, active, wrap)
        return
    _launch_tile(x2d, w_data, w_scale, w_zero_point, bias, out, meta, config, active, max_rows, wrap)


def _launch_dequant_gemm(x2d, w_data, w_scale, w_zero_point, bias, out, meta, config, active, wrap) -> None:
    """A DEQUANT config: per chunk of at most `DEQUANT_CHUNK_ELEMENTS` weight rows, the rows in x's
    dtype (`dequantize_kernel`), then the 16-bit tile writes their output columns. The chunk buffer
    has a static size (a size with `active` in it would put a guard on a dynamic M)."""
    step = dequant_chunk_rows(meta)
    for n0 in range(0, meta.n, step):
        rows = min(step, meta.n - n0)
        dense = torch.empty((rows, meta.k), dtype=x2d.dtype, device=x2d.device)
        launch_dequantize(w_data, w_scale, w_zero_point, dense, meta, active, wrap, n0=n0)
        chunk = dataclasses.replace(dense_meta(meta), n=rows)
        _launch_tile(x2d, dense, dense, dense, bias, out, chunk, config, active, None, wrap, out_col0=n0)


def _launch_tile(
    x2d, w_data, w_scale, w_zero_point, bias, out, meta, config, active, max_rows, wrap, out_col0: int = 0
) -> None:
    """One config's launches (not DEQUANT) into `out`; the weight's rows are out's columns out_col0..."""
    m = x2d.shape[0]
    kernel = common.runner(weight_only_kernel, config.num_warps, config.num_stages)
    if wrap is not None:
        kernel = wrap(kernel)
    programs = grid(m, meta.n, config)
    constexprs = kernel_arguments(meta, config, bias is not None)
    if config.SPLIT_K > 1:
        rows = m if max_rows is None else torch.sym_min(m, max_rows)
        target = torch.empty((config.SPLIT_K, rows, meta.n), dtype=torch.float32, device=out.device)
        split_stride = rows * meta.n
    else:
        target, split_stride = out, 0
    kernel[(programs * active,)](
        x2d,
        w_data.view(torch.uint8) if meta.float_codes else w_data,
        w_scale,
        w_zero_point if meta.zero_point else w_scale,
        bias if bias is not None else w_scale,
        target,
        m,
        meta.n,
        meta.k,
        x2d.stride(0),
        w_data.stride(0),
        *_scale_strides(meta, w_scale),
        target.stride(-2),
        split_stride,
        k_slice(meta, config),
        out_col0,
        **constexprs,
    )
    if config.SPLIT_K > 1:
        common.sum_partials(target, out, config.SPLIT_K, split_stride, active=active, wrap=wrap)


DEQUANT_BLOCK = (32, 256)  # dequantize_kernel's tile (rows, K): a multiple of every int4 group
# A DEQUANT config's 16-bit weight buffer holds at most this many elements (128 MB in bf16): an LM
# head (128256 x 4096) is dequantized and multiplied in chunks of rows instead of a 1 GB buffer.
DEQUANT_CHUNK_ELEMENTS = 2**26


def dequant_chunk_rows(meta: WeightMeta) -> int:
    """Weight rows per DEQUANT chunk: all of them, or a multiple of 256 under the element bound."""
    if meta.n * meta.k <= DEQUANT_CHUNK_ELEMENTS:
        return meta.n
    return max(256, DEQUANT_CHUNK_ELEMENTS // meta.k // 256 * 256)


def _scale_strides(meta: WeightMeta, w_scale: torch.Tensor) -> tuple[int, int]:
    """(between output channels, between groups along K) of the scales and zero points: [K/G (+1), N]
    K-major, else (N, K/G)."""
    return (1, meta.n) if meta.kmajor else (w_scale.stride(0), 1)


def dense_meta(meta: WeightMeta) -> WeightMeta:
    """The meta of `meta`'s weight once dequantized (`launch_dequantize`): 16-bit values (N, K)."""
    return WeightMeta(n=meta.n, k=meta.k, bits=16, group=0, float_codes=False, zero_point=False)


def launch_dequantize(
    w_data, w_scale, w_zero_point, out: torch.Tensor, meta: WeightMeta, active=1, wrap=None, n0: int = 0
) -> None:
    """out (R, K) = the values of the weight's rows n0..n0 + R - 1 in out's dtype, from either int4
    layout or 8-bit codes; the grid is multiplied by `active` (0 launches nothing)."""
    block_n, block_k = DEQUANT_BLOCK
    rows = out.shape[0]
    kernel = common.runner(dequantize_kernel, 4, 1)
    if wrap is not None:
        kernel = wrap(kernel)
    kernel[(triton.cdiv(rows, block_n) * triton.cdiv(meta.k, block_k) * active,)](
        w_data.view(torch.uint8) if meta.float_codes else w_data,
        w_scale,
        w_zero_point if meta.zero_point else w_scale,
        out,
        n0,
        rows,
        meta.k,
        w_data.stride(0),
        *_scale_strides(meta, w_scale),
        out.stride(0),
        GROUP=meta.group, BITS=meta.bits, FLOAT_CODES=meta.float_codes, ZERO_POINT=meta.zero_point,
        KMAJOR=meta.kmajor, BLOCK_N=block_n, BLOCK_K=block_k,
    )  # fmt: skip


# -- the K-major int4 layout (opt-in, see the module docstring) and its GEMV -----------------------

KMAJOR_SCALE = 2.0**-16  # K-major scales are stored times this and zero points divided by it (exact)


def pack_kmajor(data: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor):
    """The reference int4 layout -> the K-major GEMV's, exactly (`unpack_kmajor` inverts it):
    data (N, K/2) uint8 -> int32 words [K/8, N]; scale (N, K/G) -> [K/G + 1, N] times 2**-16, the
    last row zeros (the split-K counters, zero again after every call); zero (N, K/G) -> [K/G, N]
    times 2**16 (an empty zero point stays empty)."""
    n, half_k = data.shape
    if half_k % 4:
        raise ValueError(f"K-major packing needs K % 8 == 0, got K = {2 * half_k}")
    words = data.contiguous().view(torch.int32).t().contiguous()
    scale_t = torch.cat([scale.t() * KMAJOR_SCALE, scale.new_zeros(1, n)]).contiguous()
    zero_t = (zero.t() / KMAJOR_SCALE).contiguous() if zero.numel() else zero
    return words, scale_t, zero_t


def unpack_kmajor(words: torch.Tensor, scale_t: torch.Tensor, zero_t: torch.Tensor):
    """`pack_kmajor`'s inverse: (data (N, K/2) uint8, scale (N, K/G), zero (N, K/G) or empty)."""
    data = words.t().contiguous().view(torch.uint8)
    scale = (scale_t[:-1] / KMAJOR_SCALE).t().contiguous()
    zero = (zero_t * KMAJOR_SCALE).t().contiguous() if zero_t.numel() else zero_t
    return data, scale, zero


@dataclass(frozen=True)
class KMajorGemvConfig:
    BLOCK_N: int  # columns per program
    BLOCK_KW: int  # 32-bit words (8 elements each) along K per step
    SPLIT_K: int = 1  # programs per column tile, each a K slice (> 1: the last sums the partials)
    num_warps: int = 4


# Best configs of benchmarks/experiments/gemv_probe.py on H100 (RESULTS.md 2026-11-24, fifth session)
KMAJOR_GEMV_CANDIDATES = tuple(
    KMajorGemvConfig(*c) for c in ((64, 16, 16, 4), (64, 16, 4, 4), (64, 16, 8, 4), (64, 32, 8, 4), (64, 8, 16, 4))
)


def launch_gemv_kmajor(
    x2d: torch.Tensor,
    words: torch.Tensor,
    scale_t: torch.Tensor,
    zero_t: torch.Tensor,
    bias: torch.Tensor | None,
    out: torch.Tensor,
    group: int,
    config: KMajorGemvConfig,
    active=1,
    max_rows: int | None = None,
    wrap=None,
) -> None:
    """out (M, N) = x2d (M, K) @ the K-major int4 weight (`pack_kmajor`) + bias, one launch. `active`
    (0 or 1, possibly a SymInt) multiplies the grid; `max_rows` bounds M (the bucket's last row) for
    the split-K partials; `wrap` is `torch.library.wrap_triton` when traced."""
    m, k = x2d.shape
    n = words.shape[1]
    if words.shape[0] * 8 != k or scale_t.shape != (k // group + 1, n):
        raise ValueError(f"K-major int4 weight {tuple(words.shape)} / scales {tuple(scale_t.shape)} do not match K = {k}")
    tiles_n = triton.cdiv(n, config.BLOCK_N)
    rows = m if max_rows is None else torch.sym_min(m, max_rows)
    if config.SPLIT_K > 1 and isinstance(rows, int) and rows * tiles_n > n:
        raise ValueError(f"split-K GEMV: {rows * tiles_n} tiles need more counters than the scale tensor's last row has ({n})")
    kw_total = k // 8
    kw_slice = triton.cdiv(triton.cdiv(kw_total, config.BLOCK_KW), config.SPLIT_K) * config.BLOCK_KW
    if config.SPLIT_K > 1:
        part = torch.empty(rows * tiles_n * config.SPLIT_K * config.BLOCK_N, dtype=torch.float32, device=out.device)
    else:
        part = scale_t  # unused
    kernel = common.runner(gemv_kmajor_kernel, config.num_warps, 1)
    if wrap is not None:
        kernel = wrap(kernel)
    kernel[(m * tiles_n * config.SPLIT_K * active,)](
        x2d, words, scale_t, zero_t if zero_t.numel() else scale_t, bias if bias is not None else scale_t, out, part,
        m, n, k, x2d.stride(0), out.stride(0), kw_slice,
        GROUP=group, ZERO_POINT=zero_t.numel() > 0, HAS_BIAS=bias is not None,
        EVEN=kw_total % kw_slice == 0, BLOCK_N=config.BLOCK_N, BLOCK_KW=config.BLOCK_KW, SPLIT_K=config.SPLIT_K,
        ASM=os.environ.get("TRITON_INTERPRET") != "1",
    )  # fmt: skip


def is_kmajor(w_data: torch.Tensor) -> bool:
    """Whether folded int4 data is `pack_kmajor`'s int32 words (the reference layout is uint8)."""
    return w_data.dtype == torch.int32


def _random_weight(meta: WeightMeta, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random data, scale and zero point of a weight like `meta` (packed as `meta` says), for
    timing candidate configs."""
    groups = meta.k // meta.group if meta.group else 1
    if meta.bits == 4:
        data = torch.randint(0, 256, (meta.n, meta.k // 2), dtype=torch.uint8, device=device)
    elif meta.float_codes:
        data = torch.randn(meta.n, meta.k, device=device).to(torch.float8_e4m3fn)
    else:
        data = torch.randint(-127, 128, (meta.n, meta.k), dtype=torch.int8, device=device)
    scale = torch.rand(meta.n, groups, device=device) / 64
    zero = torch.randint(0, 16, (meta.n, groups), device=device).float()
    if meta.kmajor:
        return pack_kmajor(data, scale, zero if meta.zero_point else zero[:, :0])
    return data, scale, zero


def plan(meta: WeightMeta, dtype: torch.dtype, has_bias: bool, device: torch.device) -> list[int]:
    """Per M bucket, the tile config to launch, flattened for the op's `int[]` argument:
    (first row, last row or -1, BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages, SPLIT_K, SWAP_AB, DEQUANT)
    per bucket (`M_BUCKETS`).
    Computed once per weight shape, dtype and device (eager CUDA calls ask on every call)."""
    from lowbit_compile.kernels import tuning

    return list(_plan(meta, dtype, has_bias, device, tuning.tuning_enabled() and device.type == "cuda"))


@functools.cache
def _plan(meta: WeightMeta, dtype: torch.dtype, has_bias: bool, device: torch.device, tune: bool) -> tuple[int, ...]:
    from lowbit_compile.kernels import tuning

    @common.once_per_key
    def weight_copies() -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Random weights like `meta` for timing candidates, in copies that together exceed L2 (in
        a model no weight stays in L2 between calls): made once per plan, only if a bucket tunes."""
        weight_bytes = meta.n * meta.k * meta.bits // 8
        return [_random_weight(meta, device) for _ in range(max(1, min(8, -(-common.L2_BYTES // weight_bytes))))]

    @common.once_per_key
    def operands(m: int) -> tuple:
        """Activations, bias and output of a bucket's timed launches (shared by its candidates)."""
        x = torch.randn(m, meta.k, dtype=dtype, device=device)
        bias = torch.randn(meta.n, dtype=dtype, device=device) if has_bias else None
        return (x,), bias, torch.empty(m, meta.n, dtype=dtype, device=device)

    return tuning.bucket_plan(
        "weight_only", __file__,
        f"n{meta.n}k{meta.k}b{meta.bits}g{meta.group}f{int(meta.float_codes)}z{int(meta.zero_point)}"
        f"{'kmajor' if meta.kmajor else ''}", dtype, has_bias,
        device, tune, lambda bucket_m: _candidates(bucket_m, meta),
        lambda m, config: common.timed_launch(launch, weight_copies(), *operands(m), meta, config),
        lambda bucket_m: default_config(bucket_m, meta), WeightOnlyConfig, buckets=M_BUCKETS,
    )  # fmt: skip




_PLAN_FIELDS = 2 + len(dataclasses.fields(WeightOnlyConfig))


def unflatten_plan(flat: list[int]) -> list[tuple[int, int | None, WeightOnlyConfig]]:
    return [(first, last, WeightOnlyConfig.from_tuple(c)) for first, last, c in common.unflatten_plan(flat, _PLAN_FIELDS)]


def run(
    x: torch.Tensor,
    w_data: torch.Tensor,
    w_scale: torch.Tensor,
    w_zero_point: torch.Tensor,
    bias: torch.Tensor | None,
    w_fmt: str,
    out_dtype: torch.dtype,
    flat_plan: list[int],
    wrap=None,
) -> torch.Tensor:
    """The op body: one launch per M bucket (empty outside its bucket), output in x's leading shape."""
    from lowbit_compile.formats import get_format

    meta = WeightMeta.of(get_format(w_fmt), w_data)
    x2d = x.contiguous().reshape(-1, meta.k)
    buckets = list(common.active_buckets(x2d.shape[0], unflatten_plan(flat_plan)))
    only = buckets[0] if len(buckets) == 1 else None
    one_chunk = dequant_chunk_rows(meta) == meta.n
    if only is not None and isinstance(only[0], int) and only[0] == 1 and only[2].DEQUANT and one_chunk:
        # M is known to be in a DEQUANT bucket (a static M, or its only bucket): the 16-bit GEMM is
        # cuBLAS's (Inductor's own mm lowering under torch.compile), ahead of the Triton tile there
        dense = torch.empty((meta.n, meta.k), dtype=x2d.dtype, device=x.device)
        launch_dequantize(w_data, w_scale, w_zero_point, dense, meta, 1, wrap)
        return torch.nn.functional.linear(x2d, dense, bias).to(out_dtype).reshape(*x.shape[:-1], meta.n)
    out = torch.empty((x2d.shape[0], meta.n), dtype=out_dtype, device=x.device)
    _launch_buckets(x2d, w_data, w_scale, w_zero_point, bias, out, meta, buckets, wrap)
    return out.reshape(*x.shape[:-1], meta.n)


def launch_plan(x2d, w_data, w_scale, w_zero_point, bias, out, meta: WeightMeta, flat_plan: list[int], wrap=None) -> None:
    """Each bucket's launch into `out` (M, N), with a grid that is empty unless M is in the bucket.

    The K-major GEMV writes its split-K counters into the packed scales (and resets them). Under
    Inductor a kernel that writes a graph input is given a copy of it unless nothing reads that
    input after the kernel, so the writing launch goes last: no copy of the scales on any call."""
    buckets = list(common.active_buckets(x2d.shape[0], unflatten_plan(flat_plan)))
    _launch_buckets(x2d, w_data, w_scale, w_zero_point, bias, out, meta, buckets, wrap)


def _launch_buckets(x2d, w_data, w_scale, w_zero_point, bias, out, meta: WeightMeta, buckets: list, wrap) -> None:
    """`launch_plan` on buckets already unflattened and filtered (`common.active_buckets`)."""
    writes_scales = [meta.kmajor and config.BLOCK_M == 1 and config.SPLIT_K > 1 for _, _, config in buckets]
    order = sorted(range(len(buckets)), key=lambda i: writes_scales[i])  # stable: the writer last
    for active, last, config in (buckets[i] for i in order):
        launch(x2d, w_data, w_scale, w_zero_point, bias, out, meta, config, active=active, max_rows=last, wrap=wrap)
