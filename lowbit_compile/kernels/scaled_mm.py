"""Scaled GEMM (A8W8) in Triton: y[M, N] = (x_q[M, K] @ w_q[N, K].T) * scales + bias.

Operands are 8-bit on both sides and meet on 8-bit tensor cores (fp8 e4m3 -> fp32 accumulation,
int8 -> int32 accumulation); the scales and the bias are applied in the epilogue, so there is no
dequantization pass and no separate scaling kernel.

Shapes and layouts (the reference layouts of `lowbit_compile.reference`, shared with the CPU):
- x_data: (M, K) fp8 e4m3 or int8, row-major (the launcher flattens leading dims). The activation
  is quantized by the graph before this op (`lowbit::quantize` decomposes into aten ops, which
  Inductor fuses into the kernel that produces the activation).
- w_data: (N, K) of the same element type, row-major: K-major, as Hopper's 8-bit MMA wants.
- scales, fp32:
  * per token / per channel: x (M, 1), w (N, 1); per tensor: one element (read with stride 0);
  * blocks (`fp8-block`, the DeepSeek-V3 recipe): x (M, K//128) per 1x128 group, w (ceil(N/128),
    K//128) per 128x128 block; each 128-wide K step's partial product is scaled before it is added
    (BLOCK_K divides 128). Tiles with BLOCK_K = 128, BLOCK_N <= 128 and no swap run their own kernel,
    `scaled_mm_block_kernel`, where a tile's weight scale is one scalar per K step (see there).
- bias: (N,) any float dtype, or absent. out: (M, N) in the op's out dtype.

Code paths, chosen per M bucket by tile config (`ScaledMMConfig`):
- SWAP_AB: the tile computes out^T = W @ x^T, so the weight fills the MMA's 64-row side and a
  decode-sized M sits on its narrow side (M = 1..16 pads to 16 rows instead of 64).
- SPLIT_K > 1: programs take K slices and write fp32 partials, summed by `common.splitk_sum_kernel`.
- cuBLAS (fp8-block only): a static M in the compute-bound bucket runs cuBLAS's block-scaled GEMM
  (`kernels/cublas_blockwise.py`, sm_90; `uses_cublas`): 1.26-1.55x of bf16 at M >= 2048 on H100
  where the block kernel gets 0.73-1.12x (RESULTS.md, fifteenth session).
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
except ImportError:  # pragma: no cover - triton is optional
    triton = None
    tl = None

from lowbit_compile.formats import ElementType, Format, Granularity, ScaleType
from lowbit_compile.kernels import common, cublas_blockwise

BLOCK_SCALE_SIZE = 128  # the fp8-block recipe: 1x128 activation groups, 128x128 weight blocks


def supports(x_fmt: Format, w_fmt: Format) -> str | None:
    """None if the scaled-GEMM kernel runs this pair of formats, else why not."""
    elements = {x_fmt.element, w_fmt.element}
    if elements not in ({ElementType.FP8_E4M3}, {ElementType.INT8}):
        return f"scaled-GEMM kernels need fp8 e4m3 x fp8 e4m3 or int8 x int8, not {x_fmt.name} x {w_fmt.name}"
    for fmt in (x_fmt, w_fmt):
        if fmt.scale_type is not ScaleType.FP32 or fmt.global_scale or not fmt.symmetric:
            return f"scaled-GEMM kernels need symmetric fp32 scales, not {fmt.name}"
    per_row = (Granularity.ROW, Granularity.TENSOR)
    if x_fmt.granularity in per_row and w_fmt.granularity in per_row:
        return None
    if (
        x_fmt.granularity is Granularity.GROUP
        and x_fmt.group_size == BLOCK_SCALE_SIZE
        and w_fmt.granularity is Granularity.BLOCK
        and w_fmt.group_size == BLOCK_SCALE_SIZE
        and w_fmt.block_rows == BLOCK_SCALE_SIZE
    ):
        return None
    return f"scaled-GEMM kernels run row/tensor scales or 1x128 x 128x128 blocks, not {x_fmt.name} x {w_fmt.name}"


@dataclass(frozen=True)
class ScaledMMConfig:
    """One tile configuration."""

    BLOCK_M: int
    BLOCK_N: int
    BLOCK_K: int
    num_warps: int = 4
    num_stages: int = 3
    SPLIT_K: int = 1  # programs along K per output tile; > 1 writes fp32 partials, summed by a second kernel
    SWAP_AB: int = 0  # 1: compute out^T = W @ x^T (the weight tile is the MMA's A operand)
    # block kernel only: two K steps per iteration, the second one's MMA in flight across the loop edge;
    # 2: and issued before the first product is promoted (that promotion overlaps it)
    PAIRED: int = 0

    def as_tuple(self) -> tuple[int, ...]:
        return dataclasses.astuple(self)

    @classmethod
    def from_tuple(cls, values: tuple[int, ...] | list[int]) -> ScaledMMConfig:
        return cls(*values)


_PLAN_FIELDS = 2 + len(dataclasses.fields(ScaledMMConfig))


if triton is not None:

    @triton.jit
    def scaled_mm_kernel(
        x_ptr,
        x_scale_ptr,
        w_ptr,
        w_scale_ptr,
        bias_ptr,
        out_ptr,
        M,
        N,
        K,
        stride_xm,
        stride_wn,
        stride_xs,  # x scale: elements between two rows' scales (0: one per tensor)
        stride_ws,  # w scale: elements between two channels' (or 128-row blocks') scales (0: per tensor)
        stride_om,
        stride_os,  # split-K: elements between the partial outputs of two K slices
        K_SLICE,  # split-K: K elements per slice, a multiple of BLOCK_K (K when SPLIT_K == 1)
        BLOCK_SCALES: tl.constexpr,  # 1x128 x 128x128 block scales, applied per K step (else in the epilogue)
        INT8: tl.constexpr,  # int8 operands, int32 accumulation (else fp8 e4m3, fp32)
        HAS_BIAS: tl.constexpr,
        EVEN_K: tl.constexpr,  # K % BLOCK_K == 0: no masks along K
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr,  # row tiles that share a sweep over N (L2 reuse of weight tiles)
        SPLIT_K: tl.constexpr,
        SWAP_AB: tl.constexpr,
    ):
        pid = tl.program_id(0)
        pid_k = pid % SPLIT_K  # neighbouring programs take the K slices of one output tile
        pid = pid // SPLIT_K
        k_begin = pid_k * K_SLICE
        k_end = tl.minimum(k_begin + K_SLICE, K)
        num_pid_m = tl.cdiv(M, BLOCK_M)
        num_pid_n = tl.cdiv(N, BLOCK_N)
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
        # Rows and channels past the edge read row 0 (valid memory) instead of masking every load;
        # their results are never stored.
        offs_m_safe = tl.where(m_mask, offs_m, 0)
        offs_n_safe = tl.where(n_mask, offs_n, 0)
        offs_k = k_begin + tl.arange(0, BLOCK_K)
        x_ptrs = x_ptr + offs_m_safe[:, None] * stride_xm + offs_k[None, :]
        w_ptrs = w_ptr + offs_n_safe[:, None] * stride_wn + offs_k[None, :]
        if BLOCK_SCALES:
            x_scale_ptrs = x_scale_ptr + offs_m_safe * stride_xs + k_begin // 128
            w_scale_ptrs = w_scale_ptr + (offs_n_safe // 128) * stride_ws + k_begin // 128

        ACC_DTYPE: tl.constexpr = tl.int32 if INT8 else tl.float32
        if SWAP_AB:
            acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32 if BLOCK_SCALES else ACC_DTYPE)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32 if BLOCK_SCALES else ACC_DTYPE)

        for k0 in range(k_begin, k_end, BLOCK_K):
            if EVEN_K:
                x = tl.load(x_ptrs)
                w = tl.load(w_ptrs)
            else:
                k_mask = (k0 + tl.arange(0, BLOCK_K)) < K
                x = tl.load(x_ptrs, mask=k_mask[None, :], other=0.0)
                w = tl.load(w_ptrs, mask=k_mask[None, :], other=0.0)
            if BLOCK_SCALES:
                step = (k0 - k_begin) // 128
                xs = tl.load(x_scale_ptrs + step)
                ws = tl.load(w_scale_ptrs + step)
                if SWAP_AB:
                    acc += tl.dot(w, tl.trans(x)) * (ws[:, None] * xs[None, :])
                else:
                    acc += tl.dot(x, tl.trans(w)) * (xs[:, None] * ws[None, :])
            elif SWAP_AB:
                acc = tl.dot(w, tl.trans(x), acc, out_dtype=ACC_DTYPE)
            else:
                acc = tl.dot(x, tl.trans(w), acc, out_dtype=ACC_DTYPE)
            x_ptrs += BLOCK_K
            w_ptrs += BLOCK_K

        acc = acc.to(tl.float32)
        if not BLOCK_SCALES:
            xs = tl.load(x_scale_ptr + offs_m_safe * stride_xs)
            ws = tl.load(w_scale_ptr + offs_n_safe * stride_ws)
            if SWAP_AB:
                acc = acc * (ws[:, None] * xs[None, :])
            else:
                acc = acc * (xs[:, None] * ws[None, :])
        if HAS_BIAS and pid_k == 0:  # split-K: the bias joins the first slice's partial only
            bias = tl.load(bias_ptr + offs_n_safe).to(tl.float32)
            if SWAP_AB:
                acc += bias[:, None]
            else:
                acc += bias[None, :]
        out_ptr += pid_k * stride_os
        if SWAP_AB:
            out_ptrs = out_ptr + offs_m[None, :] * stride_om + offs_n[:, None]
            tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_mask[None, :] & n_mask[:, None])
        else:
            out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
            tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


    @triton.jit
    def _pin(x):
        """x unchanged, through an asm statement with side effects: arithmetic feeding it stays
        before the side-effecting statements (MMA issues) that follow it in the source."""
        return tl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=False, pack=1)

    @triton.jit
    def scaled_mm_block_kernel(
        x_ptr,
        x_scale_ptr,
        w_ptr,
        w_scale_ptr,
        bias_ptr,
        out_ptr,
        M,
        N,
        K,
        stride_xm,
        stride_wn,
        stride_xs,  # x scale (M, K//128): elements between two rows' scales
        stride_ws,  # w scale (N//128, K//128): elements between two 128-row blocks' scales
        stride_om,
        stride_os,  # split-K: elements between the partial outputs of two K slices
        K_SLICE,  # split-K: K elements per slice, a multiple of 128 (of 256 when PAIRED)
        HAS_BIAS: tl.constexpr,
        EVEN_K: tl.constexpr,  # every K step is whole (K % 128 == 0 and, when PAIRED, K slices hold pairs)
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,  # divides 128: the tile lies inside one 128-row weight block
        GROUP_M: tl.constexpr,
        SPLIT_K: tl.constexpr,
        PAIRED: tl.constexpr,
        PIN: tl.constexpr,  # PAIRED == 2: pin with inline asm (False in the interpreter, which runs no asm)
    ):
        """fp8 1x128 x 128x128 block scales, one 128-wide K step at a time (the DeepSeek-V3 recipe as
        DeepGEMM runs it): each step's MMA product starts from zero and is added to the fp32
        accumulator times x_scale[row] * w_scale, where the weight scale is one scalar for the tile
        (BLOCK_N <= 128). One FMA per accumulator element and step; the shared kernel's per-element
        scale tile (a multiply more, and a (BLOCK_M, BLOCK_N) operand in registers) is gone.

        PAIRED: two steps per iteration. The second product is handed to the next iteration without
        being read in this one, which lets Triton leave its MMA in flight (its result is read only
        after the next iteration's first MMA has been waited for): that MMA overlaps the loop's own
        work (waiting for loads, the barrier, addresses) instead of the tensor cores idling there."""
        BLOCK_K: tl.constexpr = 128
        pid = tl.program_id(0)
        pid_k = pid % SPLIT_K
        pid = pid // SPLIT_K
        k_begin = pid_k * K_SLICE
        k_end = tl.minimum(k_begin + K_SLICE, K)
        num_pid_m = tl.cdiv(M, BLOCK_M)
        num_pid_n = tl.cdiv(N, BLOCK_N)
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
        offs_m_safe = tl.where(m_mask, offs_m, 0)  # rows past the edge read row 0; never stored
        offs_n_safe = tl.where(n_mask, offs_n, 0)
        offs_k = k_begin + tl.arange(0, BLOCK_K)
        x_ptrs = x_ptr + offs_m_safe[:, None] * stride_xm + offs_k[None, :]
        w_ptrs = w_ptr + offs_n_safe[:, None] * stride_wn + offs_k[None, :]
        x_scale_ptrs = x_scale_ptr + offs_m_safe * stride_xs + k_begin // BLOCK_K
        w_scale_ptr += ((pid_n * BLOCK_N) // 128) * stride_ws + k_begin // BLOCK_K

        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if PAIRED == 2:
            # Overlapped pairs: the second product of a pair stays in flight across the loop edge (as
            # PAIRED == 1), and is issued BEFORE the first one is promoted, so that 64 FMAs per
            # thread run while the tensor cores work on it. Triton waits for both at the next
            # iteration's first MMA (it keeps only a loop-carried product in flight).
            held = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # the previous iteration's second product
            held_scale = tl.zeros((BLOCK_M,), dtype=tl.float32)
            for k0 in range(k_begin, k_end, 2 * BLOCK_K):
                step = (k0 - k_begin) // BLOCK_K
                if EVEN_K:
                    x0 = tl.load(x_ptrs)
                    w0 = tl.load(w_ptrs)
                    x1 = tl.load(x_ptrs + BLOCK_K)
                    w1 = tl.load(w_ptrs + BLOCK_K)
                    scale1 = tl.load(x_scale_ptrs + step + 1) * tl.load(w_scale_ptr + step + 1)
                else:
                    k_in = k0 + tl.arange(0, BLOCK_K)
                    x0 = tl.load(x_ptrs, mask=(k_in < k_end)[None, :], other=0.0)
                    w0 = tl.load(w_ptrs, mask=(k_in < k_end)[None, :], other=0.0)
                    x1 = tl.load(x_ptrs + BLOCK_K, mask=(k_in + BLOCK_K < k_end)[None, :], other=0.0)
                    w1 = tl.load(w_ptrs + BLOCK_K, mask=(k_in + BLOCK_K < k_end)[None, :], other=0.0)
                    last = tl.minimum(step + 1, (k_end - k_begin - 1) // BLOCK_K)  # as PAIRED == 1
                    scale1 = tl.load(x_scale_ptrs + last) * tl.load(w_scale_ptr + last)
                    scale1 = tl.where(k0 + BLOCK_K < k_end, scale1, 0.0)
                scale0 = tl.load(x_scale_ptrs + step) * tl.load(w_scale_ptr + step)
                product0 = tl.dot(x0, tl.trans(w0))
                acc += held * held_scale[:, None]
                # LLVM sinks that promotion (pure arithmetic) below the next MMA's issue; it then
                # copies the in-flight product's registers at the loop edge, and ptxas serializes
                # every wgmma (C7514). A side-effecting no-op on acc keeps it above.
                if PIN:
                    acc = _pin(acc)
                held = tl.dot(x1, tl.trans(w1))
                acc += product0 * scale0[:, None]
                held_scale = scale1
                x_ptrs += 2 * BLOCK_K
                w_ptrs += 2 * BLOCK_K
            acc += held * held_scale[:, None]
        elif PAIRED:
            held = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # the previous iteration's second product
            held_scale = tl.zeros((BLOCK_M,), dtype=tl.float32)
            for k0 in range(k_begin, k_end, 2 * BLOCK_K):
                step = (k0 - k_begin) // BLOCK_K
                if EVEN_K:
                    x0 = tl.load(x_ptrs)
                    w0 = tl.load(w_ptrs)
                    x1 = tl.load(x_ptrs + BLOCK_K)
                    w1 = tl.load(w_ptrs + BLOCK_K)
                    scale1 = tl.load(x_scale_ptrs + step + 1) * tl.load(w_scale_ptr + step + 1)
                else:
                    k_in = k0 + tl.arange(0, BLOCK_K)
                    x0 = tl.load(x_ptrs, mask=(k_in < k_end)[None, :], other=0.0)
                    w0 = tl.load(w_ptrs, mask=(k_in < k_end)[None, :], other=0.0)
                    x1 = tl.load(x_ptrs + BLOCK_K, mask=(k_in + BLOCK_K < k_end)[None, :], other=0.0)
                    w1 = tl.load(w_ptrs + BLOCK_K, mask=(k_in + BLOCK_K < k_end)[None, :], other=0.0)
                    # A slice with an odd number of steps ends on half a pair: its second product is
                    # zero (masked loads); its scale is read in range (the last step's) and zeroed.
                    last = tl.minimum(step + 1, (k_end - k_begin - 1) // BLOCK_K)
                    scale1 = tl.load(x_scale_ptrs + last) * tl.load(w_scale_ptr + last)
                    scale1 = tl.where(k0 + BLOCK_K < k_end, scale1, 0.0)
                scale0 = tl.load(x_scale_ptrs + step) * tl.load(w_scale_ptr + step)
                product0 = tl.dot(x0, tl.trans(w0))
                acc += held * held_scale[:, None]
                acc += product0 * scale0[:, None]
                held = tl.dot(x1, tl.trans(w1))
                held_scale = scale1
                x_ptrs += 2 * BLOCK_K
                w_ptrs += 2 * BLOCK_K
            acc += held * held_scale[:, None]
        else:
            for k0 in range(k_begin, k_end, BLOCK_K):
                step = (k0 - k_begin) // BLOCK_K
                if EVEN_K:
                    x = tl.load(x_ptrs)
                    w = tl.load(w_ptrs)
                else:
                    k_in = k0 + tl.arange(0, BLOCK_K)
                    x = tl.load(x_ptrs, mask=(k_in < k_end)[None, :], other=0.0)
                    w = tl.load(w_ptrs, mask=(k_in < k_end)[None, :], other=0.0)
                scale = tl.load(x_scale_ptrs + step) * tl.load(w_scale_ptr + step)
                acc += tl.dot(x, tl.trans(w)) * scale[:, None]
                x_ptrs += BLOCK_K
                w_ptrs += BLOCK_K

        if HAS_BIAS and pid_k == 0:
            acc += tl.load(bias_ptr + offs_n_safe).to(tl.float32)[None, :]
        out_ptrs = out_ptr + pid_k * stride_os + offs_m[:, None] * stride_om + offs_n[None, :]
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


    @triton.jit
    def quantize_rows_kernel(
        x_ptr, data_ptr, scale_ptr, K, stride_xm, QMIN: tl.constexpr, QMAX: tl.constexpr,
        INT8: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        """One row per program: scale = amax(|x|) / QMAX, data = x / scale rounded (int8: half to
        even, NaN to 0) or cast (fp8), clamped to the format's range; as `reference.quantize`. A NaN
        in the row makes its scale NaN, which carries it through the GEMM."""
        row = tl.program_id(0)
        x_ptr += row * stride_xm
        amax = tl.zeros((BLOCK,), dtype=tl.float32)
        nans = tl.zeros((BLOCK,), dtype=tl.int32)  # tl.maximum drops NaN: count them apart
        for k0 in range(0, K, BLOCK):
            offs = k0 + tl.arange(0, BLOCK)
            v = tl.abs(tl.load(x_ptr + offs, mask=offs < K, other=0.0).to(tl.float32))
            amax = tl.maximum(amax, v)
            nans += (v != v).to(tl.int32)
        row_max = tl.max(amax, axis=0)
        # As PyTorch on CUDA computes amax / qmax (times the fp32 reciprocal of a scalar divisor) and
        # x / scale (IEEE division; Triton's `/` is approximate on the GPU): codes match bit for bit.
        scale = tl.where(tl.sum(nans, axis=0) > 0, float("nan"), row_max * (1.0 / QMAX))
        tl.store(scale_ptr + row, scale)
        for k0 in range(0, K, BLOCK):
            offs = k0 + tl.arange(0, BLOCK)
            v = tl.load(x_ptr + offs, mask=offs < K, other=0.0).to(tl.float32)
            v = tl.where(scale == 0, 0.0, tl.math.div_rn(v, scale))
            if INT8:
                v = (v + 12582912.0) - 12582912.0  # round half to even (1.5 * 2**23), exact for |v| < 2**22
                v = tl.minimum(tl.maximum(v, QMIN), QMAX)
                v = tl.where(v != v, 0.0, v)
                tl.store(data_ptr + row * K + offs, v.to(tl.int8), mask=offs < K)
            else:
                v = tl.minimum(tl.maximum(v, QMIN), QMAX)
                tl.store(data_ptr + row * K + offs, v.to(tl.float8e4nv), mask=offs < K)


# -- launch parameters ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ScaledMeta:
    """What the kernel needs to know about a folded weight and the activation format (static)."""

    n: int
    k: int
    int8: bool
    block_scales: bool
    x_per_tensor: bool  # one activation scale (read with stride 0)
    w_per_tensor: bool

    @classmethod
    def of(cls, x_fmt: Format, w_fmt: Format, w_data: torch.Tensor) -> ScaledMeta:
        return cls(
            n=w_data.shape[0],
            k=w_data.shape[-1],
            int8=w_fmt.element is ElementType.INT8,
            block_scales=w_fmt.granularity is Granularity.BLOCK,
            x_per_tensor=x_fmt.granularity is Granularity.TENSOR,
            w_per_tensor=w_fmt.granularity is Granularity.TENSOR,
        )


def uses_block_kernel(meta: ScaledMeta, config: ScaledMMConfig) -> bool:
    """Whether `scaled_mm_block_kernel` runs this tile: block scales, one 128-wide K step per MMA,
    a tile inside one 128-row weight block (one weight scale per step), not swapped."""
    return (
        meta.block_scales
        and config.BLOCK_K == BLOCK_SCALE_SIZE
        and BLOCK_SCALE_SIZE % config.BLOCK_N == 0
        and not config.SWAP_AB
    )


def config_is_valid(config: ScaledMMConfig, meta: ScaledMeta) -> bool:
    if config.BLOCK_K % 32 or min(config.BLOCK_M, config.BLOCK_N) < 16:
        return False
    if config.PAIRED and not uses_block_kernel(meta, config):
        return False  # only the block kernel pairs its K steps
    if meta.block_scales and (BLOCK_SCALE_SIZE % config.BLOCK_K or k_slice(meta, config) % BLOCK_SCALE_SIZE):
        return False  # each K step lies inside one 128-wide scale block, each slice starts on one
    return True


def kernel_arguments(meta: ScaledMeta, config: ScaledMMConfig, has_bias: bool) -> dict[str, int | bool]:
    if uses_block_kernel(meta, config):
        pair = 2 * BLOCK_SCALE_SIZE if config.PAIRED else BLOCK_SCALE_SIZE
        return dict(
            HAS_BIAS=has_bias,
            EVEN_K=meta.k % pair == 0,  # K slices are whole pairs (k_slice): only K's end can cut one
            BLOCK_M=config.BLOCK_M,
            BLOCK_N=config.BLOCK_N,
            GROUP_M=8,
            SPLIT_K=config.SPLIT_K,
            PAIRED=config.PAIRED,
            PIN=os.environ.get("TRITON_INTERPRET") != "1",
        )
    return dict(
        BLOCK_SCALES=meta.block_scales,
        INT8=meta.int8,
        HAS_BIAS=has_bias,
        EVEN_K=meta.k % config.BLOCK_K == 0,
        BLOCK_M=config.BLOCK_M,
        BLOCK_N=config.BLOCK_N,
        BLOCK_K=config.BLOCK_K,
        GROUP_M=8,
        SPLIT_K=config.SPLIT_K,
        SWAP_AB=bool(config.SWAP_AB),
    )


def k_slice(meta: ScaledMeta, config: ScaledMMConfig) -> int:
    """K elements per split-K slice: whole tiles (whole 128-blocks with block scales), spread evenly."""
    unit = max(config.BLOCK_K, BLOCK_SCALE_SIZE) if meta.block_scales else config.BLOCK_K
    unit *= 2 if config.PAIRED else 1
    units = triton.cdiv(meta.k, unit)
    return triton.cdiv(units, config.SPLIT_K) * unit


def _candidates(bucket_m: int, meta: ScaledMeta) -> list[ScaledMMConfig]:
    """Tile configs worth trying for a bucket; the first is the default (tuning off, interpreter)."""
    C = ScaledMMConfig
    # Measured on H100 (benchmarks/sweep_scaled_mm.py, RESULTS.md 2026-11-24). Decode sizes are
    # memory bound: swapped tiles put M on the MMA's narrow side; wide K steps or split K keep the
    # weight streaming. Block scales rescale each 128-wide K step's product before adding it, which
    # holds a second accumulator: unswapped tiles of BLOCK_N <= 128 run the block kernel (one weight
    # scale per step). Large M (sm_90 compile, Triton 3.6, NOTES-scaled-mm.md v2): 128x128 on 8 warps
    # 177 registers (one program per SM); 64x128 on 4 warps 184 and 128x64 on 8 warps 109 (two per
    # SM); paired steps 251-254 (one). 64x256 is the shared kernel's best of v1, kept to compare.
    if meta.block_scales:
        if bucket_m <= 16:
            configs = [C(16, 64, 128, 4, 4, s, 1) for s in (4, 2, 8)] + [C(16, 128, 128, 4, 4, 2, 1), C(16, 64, 128, 4, 6, 1, 1)]
        elif bucket_m <= 128:
            configs = [C(64, 128, 128, 4, 4, 2), C(64, 64, 128, 4, 4, 2), C(64, 64, 128, 4, 4), C(64, 128, 128, 4, 4)]
            configs += [C(32, 128, 128, 4, 4, 1, 1), C(64, 128, 128, 8, 4, 2)]
        else:
            configs = [C(128, 128, 128, 8, 3), C(64, 128, 128, 4, 4), C(128, 128, 128, 8, 2, 1, 0, 1)]
            configs += [C(64, 128, 128, 4, 2, 1, 0, 1), C(128, 64, 128, 8, 4), C(128, 128, 128, 8, 4)]
            configs += [C(64, 128, 128, 4, 3), C(64, 256, 128, 8, 3)]
            # v3: overlapped pairs (PAIRED=2): 248 registers at 128x128 / 8 warps, 254 at 64x128 / 4
            configs += [C(128, 128, 128, 8, 3, 1, 0, 2), C(128, 128, 128, 8, 2, 1, 0, 2), C(64, 128, 128, 4, 3, 1, 0, 2)]
    elif bucket_m <= 16:
        configs = [C(16, 64, 128, 4, 4, 4, 1), C(16, 64, 512, 4, 3, 1, 1), C(16, 64, 128, 4, 6, 1, 1)]
        configs += [C(16, 64, 256, 4, 3, 2, 1), C(16, 128, 128, 4, 4, 2, 1), C(16, 64, 128, 4, 4, 2, 1)]
        configs += [C(16, 64, 256, 4, 4, 4, 1), C(16, 64, 512, 4, 3, 2, 1)]
    elif bucket_m <= 128:
        configs = [C(64, 128, 128, 4, 4), C(64, 64, 128, 4, 4), C(64, 128, 128, 4, 4, 1, 1), C(64, 64, 128, 4, 4, 2)]
        configs += [C(64, 128, 128, 4, 4, 2), C(32, 128, 128, 4, 4, 1, 1), C(64, 64, 128, 4, 6)]
        configs += [C(64, 128, 128, 4, 6, 1, 1), C(32, 128, 256, 4, 3, 1, 1)]
    else:
        configs = [C(128, 128, 128, 8, 3), C(128, 256, 128, 8, 3), C(256, 128, 128, 8, 3), C(128, 256, 64, 8, 4)]
        configs += [C(128, 128, 128, 4, 4), C(128, 256, 128, 8, 4), C(256, 128, 128, 8, 4)]
    max_n = max(16, triton.next_power_of_2(meta.n))
    max_k = max(32, triton.next_power_of_2(meta.k))
    clamped = [dataclasses.replace(c, BLOCK_N=min(c.BLOCK_N, max_n), BLOCK_K=min(c.BLOCK_K, max_k)) for c in configs]
    return [c for c in dict.fromkeys(clamped) if config_is_valid(c, meta)]


def default_config(bucket_m: int, meta: ScaledMeta) -> ScaledMMConfig:
    return _candidates(bucket_m, meta)[0]


def grid(m, n: int, config: ScaledMMConfig) -> object:
    tiles_m = (m + config.BLOCK_M - 1) // config.BLOCK_M
    return tiles_m * triton.cdiv(n, config.BLOCK_N) * config.SPLIT_K


def launch(
    x2d: torch.Tensor,
    x_scale: torch.Tensor,
    w_data: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out: torch.Tensor,
    meta: ScaledMeta,
    config: ScaledMMConfig,
    active=1,
    max_rows: int | None = None,
    wrap=None,
) -> None:
    """The launches for all rows of `x2d` into `out` (M, N, contiguous); `x_scale` is (M, 1), (M,
    K//128) or one element (as `meta` says). `active`, `max_rows` and `wrap` as in `weight_only.launch`."""
    m = x2d.shape[0]
    body = scaled_mm_block_kernel if uses_block_kernel(meta, config) else scaled_mm_kernel
    kernel = common.runner(body, config.num_warps, config.num_stages)
    if wrap is not None:
        kernel = wrap(kernel)
    if config.SPLIT_K > 1:
        rows = m if max_rows is None else torch.sym_min(m, max_rows)
        target = torch.empty((config.SPLIT_K, rows, meta.n), dtype=torch.float32, device=out.device)
        split_stride = rows * meta.n
    else:
        target, split_stride = out, 0
    kernel[(grid(m, meta.n, config) * active,)](
        x2d,
        x_scale,
        w_data,
        w_scale,
        bias if bias is not None else w_scale,
        target,
        m,
        meta.n,
        meta.k,
        x2d.stride(0),
        w_data.stride(0),
        0 if meta.x_per_tensor else x_scale.stride(0),
        0 if meta.w_per_tensor else w_scale.stride(0),
        meta.n,
        split_stride,
        k_slice(meta, config),
        **kernel_arguments(meta, config, bias is not None),
    )
    if config.SPLIT_K > 1:
        common.sum_partials(target, out, config.SPLIT_K, split_stride, active=active, wrap=wrap)


# -- tuning -----------------------------------------------------------------------------------------


def _random_operands(meta: ScaledMeta, rows: int, device: torch.device, weight: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(data, scale) of random 8-bit rows like `meta`'s activation (`rows` rows) or, with `weight`,
    its (N, K) weight, scales in the format's layout (block scales: one per 128 rows of a weight)."""
    k_blocks = triton.cdiv(meta.k, BLOCK_SCALE_SIZE)
    if meta.int8:
        data = torch.randint(-127, 128, (rows, meta.k), dtype=torch.int8, device=device)
    else:
        data = torch.randn(rows, meta.k, device=device).to(torch.float8_e4m3fn)
    scale_rows = triton.cdiv(rows, BLOCK_SCALE_SIZE) if weight and meta.block_scales else rows
    scale = torch.rand(scale_rows, k_blocks if meta.block_scales else 1, device=device) / 64
    return data, scale


def plan(meta: ScaledMeta, out_dtype: torch.dtype, has_bias: bool, device: torch.device) -> list[int]:
    """Per M bucket, the tile config to launch, flattened for the op's `int[]` argument:
    (first row, last row or -1, *ScaledMMConfig fields) per bucket."""
    from lowbit_compile.kernels import tuning

    return list(_plan(meta, out_dtype, has_bias, device, tuning.tuning_enabled() and device.type == "cuda"))


@functools.cache
def _plan(meta: ScaledMeta, out_dtype: torch.dtype, has_bias: bool, device: torch.device, tune: bool) -> tuple[int, ...]:
    from lowbit_compile.kernels import tuning

    @common.once_per_key
    def weight_copies() -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Random weights like `meta`, in copies that together exceed L2, made once per plan."""
        copies = max(1, min(8, -(-common.L2_BYTES // (meta.n * meta.k))))
        return [_random_operands(meta, meta.n, device, weight=True) for _ in range(copies)]

    @common.once_per_key
    def operands(m: int) -> tuple:
        """Activations, bias and output of a bucket's timed launches (shared by its candidates)."""
        bias = torch.randn(meta.n, dtype=out_dtype, device=device) if has_bias else None
        return _random_operands(meta, m, device), bias, torch.empty(m, meta.n, dtype=out_dtype, device=device)

    return tuning.bucket_plan(
        "scaled_mm", __file__, f"n{meta.n}k{meta.k}i{int(meta.int8)}b{int(meta.block_scales)}", out_dtype, has_bias,
        device, tune, lambda bucket_m: _candidates(bucket_m, meta),
        lambda m, config: common.timed_launch(launch, weight_copies(), *operands(m), meta, config),
        lambda bucket_m: default_config(bucket_m, meta), ScaledMMConfig,
    )  # fmt: skip


QUANTIZE_BLOCK = 1024


def quantize_rows(x2d: torch.Tensor, fmt: Format, active=1, wrap=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(data (M, K), scale (M, 1)) of `x2d` quantized per row as `fmt` (int8 or fp8 e4m3 rows), by
    one kernel whose grid is multiplied by `active` (0: nothing runs, as for a bucket's launch)."""
    m, k = x2d.shape
    data = torch.empty((m, k), dtype=fmt.storage_dtype, device=x2d.device)
    scale = torch.empty((m, 1), dtype=torch.float32, device=x2d.device)
    kernel = wrap(quantize_rows_kernel) if wrap is not None else quantize_rows_kernel
    kernel[(m * active,)](
        x2d, data, scale, k, x2d.stride(0), QMIN=float(fmt.qmin), QMAX=float(fmt.qmax),
        INT8=fmt.element is ElementType.INT8, BLOCK=QUANTIZE_BLOCK,
    )  # fmt: skip
    return data, scale


def unflatten_plan(flat: list[int]) -> list[tuple[int, int | None, ScaledMMConfig]]:
    return [(first, last, ScaledMMConfig.from_tuple(c)) for first, last, c in common.unflatten_plan(flat, _PLAN_FIELDS)]


def run(
    x_data: torch.Tensor,
    x_scale: torch.Tensor,
    w_data: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    x_fmt: str,
    w_fmt: str,
    out_dtype: torch.dtype,
    flat_plan: list[int],
    wrap=None,
) -> torch.Tensor:
    """The op body: one launch per M bucket (empty outside its bucket), output in x's leading shape."""
    from lowbit_compile.formats import get_format

    meta = ScaledMeta.of(get_format(x_fmt), get_format(w_fmt), w_data)
    x2d = x_data.contiguous().reshape(-1, meta.k)
    m = x2d.shape[0]
    x_scale2d = x_scale.reshape(1, 1) if meta.x_per_tensor else x_scale.contiguous().reshape(-1, x_scale.shape[-1])
    if uses_cublas(meta, m, x_data.device):
        out = cublas_blockwise.mm(x2d, x_scale2d, w_data, w_scale, bias, out_dtype, BLOCK_SCALE_SIZE)
        return out.reshape(*x_data.shape[:-1], meta.n)
    out = torch.empty((m, meta.n), dtype=out_dtype, device=x_data.device)
    launch_plan(x2d, x_scale2d, w_data, w_scale, bias, out, meta, flat_plan, wrap=wrap)
    return out.reshape(*x_data.shape[:-1], meta.n)


# Rows from which a static M of an fp8-block GEMM runs cuBLAS's block-scaled kernel (the first row of
# the compute-bound bucket): on H100 it measured 1.57-1.78x of bf16 at M >= 512 against 1.06-1.20x
# for `scaled_mm_block_kernel` (RESULTS.md, fifteenth session). A dynamic M stays on the Triton tiles:
# a call with a symbolic M cannot choose between an aten GEMM's output and the tiles' without a
# guard or a copy (DESIGN-NOTES "cuBLAS block-scaled GEMMs").
CUBLAS_MIN_ROWS = common.M_BUCKETS[-1][0]


def uses_cublas(meta: ScaledMeta, m, device: torch.device) -> bool:
    """Whether a call of `m` rows runs `cublas_blockwise.mm` (fp8-block, static M in
    the compute-bound bucket, whole 128-row weight blocks, shapes and device cuBLAS takes), not the
    Triton tiles."""
    if not meta.block_scales or meta.int8 or not isinstance(m, int) or m < CUBLAS_MIN_ROWS:
        return False
    if meta.n % BLOCK_SCALE_SIZE:  # torch 2.11's fake impl of `_scaled_mm_v2` wants N / 128 blocks, whole
        return False
    return cublas_blockwise.usable(m, meta.n, meta.k, device)


def launch_plan(x2d, x_scale2d, w_data, w_scale, bias, out, meta: ScaledMeta, flat_plan: list[int], wrap=None) -> None:
    """Each bucket's launch into `out` (M, N), with a grid that is empty unless M is in the bucket."""
    for active, last, config in common.active_buckets(x2d.shape[0], unflatten_plan(flat_plan)):
        launch(x2d, x_scale2d, w_data, w_scale, bias, out, meta, config, active=active, max_rows=last, wrap=wrap)
