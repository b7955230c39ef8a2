"""Scaled GEMM with int4 weights converted to fp8 in registers: the compute-bound half of `w4-auto`.

    y[M, N] = x_scale[M] * sum_g (x_q[M, K_g] @ c[N, K_g].T) * w_scale[N, g] + bias[N]

x_q are per-token fp8 e4m3 activation codes, c the weight's int4 codes, g the 128-wide K groups.
Each int4 code (an integer in [-8, 7]) is exact in e4m3, so it is converted to fp8 in registers and
meets the activation on the fp8 tensor cores (fp32 accumulation); the group scale multiplies each K
group's product before it is added (one FMA per accumulator element and step, as the fp8 block-scale
kernel does), the row scale and the bias are applied in the epilogue. The weight is read as the
weight-only kernel reads it, so one stored weight serves both halves of `w4-auto` and 4 bits per
weight stream from memory in either regime.

Shapes and layouts (the reference layouts of `lowbit_compile.reference`; nothing is repacked):
- x_data: (M, K) float8_e4m3fn, row-major; x_scale: fp32 (M, 1) (per token, `fp8_e4m3_row`).
- w_data: uint8 (N, K//2), element 2i of a row in the low nibble, 2i+1 in the high nibble, stored as
  code + 8 (symmetric int4, `int4_g*`); w_scale: fp32 (N, K//GROUP).
- bias: (N,) any float dtype, or absent. out: (M, N) in the op's out dtype.
Constraints: symmetric int4 (an asymmetric format's zero points are floats after the weight search,
so c - z is not an integer; see DESIGN-NOTES "w4-auto"); K % GROUP == 0 (the format guarantees it)
and BLOCK_K divides GROUP, so every K step is whole (no masks along K) and lies in one group.

Code paths, by tile config (`Int4ScaledConfig`): plain tiles (BLOCK_M rows x BLOCK_N channels), and
SPLIT_K > 1, where programs take K slices (whole groups) and write fp32 partials summed by
`common.splitk_sum_kernel`. A static M in the compute-bound bucket (groups of 128, sm_90) instead
converts the codes to fp8 bytes in one pass (`codes_to_fp8_kernel`) and runs cuBLAS's 1x128 x 1x128
block-scaled GEMM on them (`cublas_mm`, `kernels/cublas_blockwise.py`): the same products and scales.
"""

from __future__ import annotations

import dataclasses
import functools
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


def supports(x_fmt: Format, w_fmt: Format) -> str | None:
    """None if this kernel runs the pair (per-token fp8 e4m3 x symmetric int4 groups), else why not."""
    if x_fmt.element is not ElementType.FP8_E4M3 or x_fmt.granularity is not Granularity.ROW:
        return f"int4 x fp8 kernels need per-token fp8 e4m3 activations, not {x_fmt.name}"
    if w_fmt.element is not ElementType.INT4 or w_fmt.granularity is not Granularity.GROUP:
        return f"int4 x fp8 kernels need int4 group weights, not {w_fmt.name}"
    if not w_fmt.symmetric:
        return f"int4 x fp8 kernels need symmetric int4 (integer codes exact in fp8), not {w_fmt.name}"
    if w_fmt.group_size < 32:
        return f"int4 x fp8 kernels need groups of >= 32 along K (one fp8 MMA step), not {w_fmt.name}"
    for fmt in (x_fmt, w_fmt):
        if fmt.scale_type is not ScaleType.FP32 or fmt.global_scale:
            return f"int4 x fp8 kernels need fp32 scales, not {fmt.name}"
    return None


@dataclass(frozen=True)
class Int4ScaledConfig:
    """One tile configuration (BLOCK_K divides the group size)."""

    BLOCK_M: int
    BLOCK_N: int
    BLOCK_K: int
    num_warps: int = 4
    num_stages: int = 3
    SPLIT_K: int = 1  # programs along K per output tile; > 1 writes fp32 partials, summed by a second kernel
    # 1: the accumulator is rescaled to the next group's scale and the MMA accumulates into it (one
    # accumulator, so larger tiles fit); 0: each step's product is scaled and added (two)
    RESCALE: int = 0

    def as_tuple(self) -> tuple[int, ...]:
        return dataclasses.astuple(self)

    @classmethod
    def from_tuple(cls, values: tuple[int, ...] | list[int]) -> Int4ScaledConfig:
        return cls(*values)


_PLAN_FIELDS = 2 + len(dataclasses.fields(Int4ScaledConfig))


if triton is not None:

    @triton.jit
    def _int4_to_fp8(nibble):
        """uint8 code + 8 (0..15) -> fp8 e4m3 of the code (-8..7), exactly: the nibble OR-ed into
        fp16's 1024 (0x6400 + c is exactly 1024 + c), minus 1032, then fp16 -> fp8 (a packed
        conversion on sm_89+; exact, every integer of [-8, 7] being an e4m3 value)."""
        value = (nibble.to(tl.int16) | 0x6400).to(tl.float16, bitcast=True) - 1032.0
        return value.to(tl.float8e4nv)

    @triton.jit
    def codes_to_fp8_kernel(w_ptr, out_ptr, numel, BLOCK: tl.constexpr):
        """out (N, K) fp8 e4m3 bytes = the int4 codes of w (N, K//2 packed bytes, contiguous), exactly:
        byte i gives elements 2i (low nibble) and 2i + 1 (high)."""
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < numel
        packed = tl.load(w_ptr + offs, mask=mask, other=0)
        low = _int4_to_fp8(packed & 0xF).to(tl.uint8, bitcast=True)
        high = _int4_to_fp8(packed >> 4).to(tl.uint8, bitcast=True)
        out_offs = tl.reshape(tl.join(2 * offs, 2 * offs + 1), (2 * BLOCK,))
        out_mask = tl.reshape(tl.join(mask, mask), (2 * BLOCK,))
        tl.store(out_ptr + out_offs, tl.reshape(tl.join(low, high), (2 * BLOCK,)), mask=out_mask)

    @triton.jit
    def int4_scaled_mm_kernel(
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
        stride_wn,  # bytes between two weight rows (K // 2 when contiguous)
        stride_ws,  # w scale: elements between two channels' group scales
        stride_om,
        stride_os,  # split-K: elements between the partial outputs of two K slices
        K_SLICE,  # split-K: K elements per slice, a multiple of GROUP (K when SPLIT_K == 1)
        HAS_BIAS: tl.constexpr,
        GROUP: tl.constexpr,  # elements per weight scale along K
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,  # divides GROUP
        GROUP_M: tl.constexpr,  # row tiles that share a sweep over N (L2 reuse of weight tiles)
        SPLIT_K: tl.constexpr,
        RESCALE: tl.constexpr,  # the accumulator is kept in units of the current group's scale
    ):
        HALF_K: tl.constexpr = BLOCK_K // 2
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
        offs_m_safe = tl.where(m_mask, offs_m, 0)  # rows and channels past the edge read row 0; never stored
        offs_n_safe = tl.where(n_mask, offs_n, 0)
        x_ptrs = x_ptr + offs_m_safe[:, None] * stride_xm + (k_begin + tl.arange(0, BLOCK_K))[None, :]
        w_ptrs = w_ptr + offs_n_safe[:, None] * stride_wn + (k_begin // 2 + tl.arange(0, HALF_K))[None, :]
        w_scale_ptrs = w_scale_ptr + offs_n_safe * stride_ws

        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        unit = tl.full((BLOCK_N,), 1.0, dtype=tl.float32)  # RESCALE: the scale acc is counted in
        for k0 in range(k_begin, k_end, BLOCK_K):
            x = tl.load(x_ptrs)
            packed = tl.load(w_ptrs)  # [BLOCK_N, HALF_K] bytes: elements 2i (low) and 2i + 1 (high)
            codes = tl.reshape(tl.join(packed & 0xF, packed >> 4), (BLOCK_N, BLOCK_K))  # natural K order
            w = _int4_to_fp8(codes)
            w_scale = tl.load(w_scale_ptrs + k0 // GROUP)
            if RESCALE:
                # acc * s_prev / s + P = (sum of the earlier groups' s_j P_j) / s + P: one accumulator,
                # which the MMA adds into. An all-zero group (scale 0, product 0) keeps any scale: 1.
                w_scale = tl.where(w_scale == 0.0, 1.0, w_scale)
                acc = tl.dot(x, tl.trans(w), acc * (unit / w_scale)[None, :])
                unit = w_scale
            else:
                acc += tl.dot(x, tl.trans(w)) * w_scale[None, :]
            x_ptrs += BLOCK_K
            w_ptrs += HALF_K

        if RESCALE:
            acc = acc * unit[None, :]
        acc = acc * tl.load(x_scale_ptr + offs_m_safe)[:, None]
        if HAS_BIAS and pid_k == 0:  # split-K: the bias joins the first slice's partial only
            acc += tl.load(bias_ptr + offs_n_safe).to(tl.float32)[None, :]
        out_ptrs = out_ptr + pid_k * stride_os + offs_m[:, None] * stride_om + offs_n[None, :]
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


# -- launch parameters ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Int4ScaledMeta:
    """What the kernel needs to know about a folded weight (static)."""

    n: int
    k: int
    group: int

    @classmethod
    def of(cls, x_fmt: Format, w_fmt: Format, w_data: torch.Tensor) -> Int4ScaledMeta:
        return cls(n=w_data.shape[0], k=w_data.shape[-1] * 2, group=w_fmt.group_size)


def config_is_valid(config: Int4ScaledConfig, meta: Int4ScaledMeta) -> bool:
    """fp8 MMA steps of >= 32, inside one group; tiles of >= 16 (tl.dot's smallest)."""
    return config.BLOCK_K % 32 == 0 and meta.group % config.BLOCK_K == 0 and min(config.BLOCK_M, config.BLOCK_N) >= 16


def kernel_arguments(meta: Int4ScaledMeta, config: Int4ScaledConfig, has_bias: bool) -> dict[str, int | bool]:
    return dict(
        HAS_BIAS=has_bias,
        GROUP=meta.group,
        BLOCK_M=config.BLOCK_M,
        BLOCK_N=config.BLOCK_N,
        BLOCK_K=config.BLOCK_K,
        GROUP_M=8,
        SPLIT_K=config.SPLIT_K,
        RESCALE=config.RESCALE,
    )


def k_slice(meta: Int4ScaledMeta, config: Int4ScaledConfig) -> int:
    """K elements per split-K slice: whole groups, spread evenly (a slice may be empty)."""
    groups = meta.k // meta.group
    return triton.cdiv(groups, config.SPLIT_K) * meta.group


def _candidates(bucket_m: int, meta: Int4ScaledMeta) -> list[Int4ScaledConfig]:
    """Tile configs worth trying for a bucket; the first is the default (tuning off, interpreter).

    Not yet measured on a GPU: every tile of the 17-128 and > 128 buckets compiles for sm_90 (Triton
    3.6) without spills, fp8 wgmma for BLOCK_M >= 64 (tests/test_int4_scaled_mm_compile_sm90.py).
    Two accumulators (RESCALE=0: the scaled product is added) spill from 128x128 / 8 warps with
    128-wide steps on; with one (RESCALE=1) 128x256 and 256x128 (64-wide steps) fit. Mid-size M splits
    K so that the N / BLOCK_N tiles fill the SMs. Under `w4-auto` only the buckets at or above the
    switch M run (and are tuned)."""
    C = Int4ScaledConfig
    if bucket_m <= 16:
        configs = [C(16, 64, 128, 4, 4, 1, 1), C(16, 64, 128, 4, 4, 2, 1), C(16, 64, 128, 4, 4, 4, 1)]
        configs += [C(16, 128, 128, 4, 4, 2, 1), C(16, 128, 128, 4, 4, 4, 1), C(16, 64, 64, 4, 4, 4, 1)]
    elif bucket_m <= 128:
        configs = [C(64, 128, 128, 4, 4, 1, 1), C(64, 64, 128, 4, 4), C(64, 128, 128, 4, 4, 2, 1)]
        configs += [C(64, 64, 128, 4, 4, 2), C(64, 128, 128, 4, 3, 4, 1), C(32, 128, 128, 4, 4, 2, 1)]
        configs += [C(64, 256, 128, 4, 3, 1, 1), C(64, 64, 128, 4, 4, 4), C(64, 128, 128, 4, 4)]
    else:
        configs = [C(128, 128, 128, 8, 3, 1, 1), C(128, 256, 128, 8, 3, 1, 1), C(128, 256, 64, 8, 4, 1, 1)]
        configs += [C(256, 128, 64, 8, 3, 1, 1), C(64, 256, 128, 8, 3, 1, 1), C(128, 128, 128, 4, 3, 1, 1)]
        configs += [C(128, 128, 64, 8, 4), C(128, 64, 128, 4, 4), C(64, 256, 128, 8, 3)]
    max_n = max(16, triton.next_power_of_2(meta.n))
    clamped = [
        dataclasses.replace(c, BLOCK_N=min(c.BLOCK_N, max_n), BLOCK_K=min(c.BLOCK_K, meta.group)) for c in configs
    ]
    return [c for c in dict.fromkeys(clamped) if config_is_valid(c, meta)]


def default_config(bucket_m: int, meta: Int4ScaledMeta) -> Int4ScaledConfig:
    return _candidates(bucket_m, meta)[0]


def grid(m, n: int, config: Int4ScaledConfig) -> object:
    tiles_m = (m + config.BLOCK_M - 1) // config.BLOCK_M
    return tiles_m * triton.cdiv(n, config.BLOCK_N) * config.SPLIT_K


def launch(
    x2d: torch.Tensor,
    x_scale: torch.Tensor,
    w_data: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out: torch.Tensor,
    meta: Int4ScaledMeta,
    config: Int4ScaledConfig,
    active=1,
    max_rows: int | None = None,
    wrap=None,
) -> None:
    """The launches for all rows of `x2d` (M, K fp8) into `out` (M, N, contiguous); `x_scale` (M, 1).
    `active`, `max_rows` and `wrap` as in `weight_only.launch`."""
    m = x2d.shape[0]
    kernel = common.runner(int4_scaled_mm_kernel, config.num_warps, config.num_stages)
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
        w_scale.stride(0),
        meta.n,
        split_stride,
        k_slice(meta, config),
        **kernel_arguments(meta, config, bias is not None),
    )
    if config.SPLIT_K > 1:
        common.sum_partials(target, out, config.SPLIT_K, split_stride, active=active, wrap=wrap)


# -- tuning -----------------------------------------------------------------------------------------


def random_weight(meta: Int4ScaledMeta, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(data, scale) of a random int4 weight like `meta`, for timing candidates."""
    data = torch.randint(0, 256, (meta.n, meta.k // 2), dtype=torch.uint8, device=device)
    return data, torch.rand(meta.n, meta.k // meta.group, device=device) / 64


def plan(
    meta: Int4ScaledMeta, out_dtype: torch.dtype, has_bias: bool, device: torch.device, min_rows: int = 1
) -> list[int]:
    """Per M bucket, the tile config to launch, flattened for the op's `int[]` argument: (first row,
    last row or -1, *Int4ScaledConfig fields) per bucket. Buckets wholly below `min_rows` (the switch
    M of `w4-auto`: another kernel runs them) are not tuned and keep the default config."""
    from lowbit_compile.kernels import tuning

    return list(_plan(meta, out_dtype, has_bias, device, tuning.tuning_enabled() and device.type == "cuda", min_rows))


@functools.cache
def _plan(meta, out_dtype, has_bias, device, tune: bool, min_rows: int) -> tuple[int, ...]:
    from lowbit_compile.kernels import tuning

    @common.once_per_key
    def weight_copies() -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Random weights like `meta`, in copies that together exceed L2, made once per plan."""
        copies = max(1, min(8, -(-common.L2_BYTES // (meta.n * meta.k // 2))))
        return [random_weight(meta, device) for _ in range(copies)]

    @common.once_per_key
    def operands(m: int) -> tuple:
        """Activations, bias and output of a bucket's timed launches (shared by its candidates)."""
        x = torch.randn(m, meta.k, device=device).to(torch.float8_e4m3fn)
        x_scale = torch.rand(m, 1, device=device) / 64
        bias = torch.randn(meta.n, dtype=out_dtype, device=device) if has_bias else None
        return (x, x_scale), bias, torch.empty(m, meta.n, dtype=out_dtype, device=device)

    return tuning.bucket_plan(
        "int4_scaled_mm", __file__, f"n{meta.n}k{meta.k}g{meta.group}", out_dtype, has_bias, device, tune,
        lambda bucket_m: _candidates(bucket_m, meta),
        lambda m, config: common.timed_launch(launch, weight_copies(), *operands(m), meta, config),
        lambda bucket_m: default_config(bucket_m, meta), Int4ScaledConfig,
        tunes_bucket=lambda last: last is None or last >= min_rows,
    )  # fmt: skip


# -- cuBLAS for a static M in the compute-bound bucket -------------------------------------------------

# The weight's codes as fp8 bytes take N * K bytes per call (twice the packed weight); above this many
# elements (an LM head) the Triton tiles run instead of holding such a copy.
CUBLAS_MAX_WEIGHT_ELEMENTS = 2**26
CONVERT_BLOCK = 1024


def uses_cublas(meta: Int4ScaledMeta, m, device: torch.device) -> bool:
    """Whether a call of `m` rows runs `cublas_mm`: a static M in the compute-bound bucket, groups
    of 128 (cuBLAS's 1x128 weight scales), a weight of at most `CUBLAS_MAX_WEIGHT_ELEMENTS`, and
    shapes and a device cuBLAS takes. Measured on H100 (RESULTS.md, fifteenth session): the GEMM
    1.27-1.37x of bf16 at M >= 2048, where the Triton tiles run at 0.67-0.78x."""
    if meta.group != cublas_blockwise.GROUP or meta.n * meta.k > CUBLAS_MAX_WEIGHT_ELEMENTS:
        return False
    if not isinstance(m, int) or m < common.M_BUCKETS[-1][0]:
        return False
    return cublas_blockwise.usable(m, meta.n, meta.k, device)


def codes_to_fp8(w_data: torch.Tensor, wrap=None) -> torch.Tensor:
    """The int4 codes of `w_data` (N, K//2 packed, stored as code + 8) as fp8 e4m3 (N, K), exact."""
    n, half_k = w_data.shape
    out = torch.empty((n, 2 * half_k), dtype=torch.uint8, device=w_data.device)
    kernel = wrap(codes_to_fp8_kernel) if wrap is not None else codes_to_fp8_kernel
    numel = n * half_k
    kernel[(triton.cdiv(numel, CONVERT_BLOCK),)](w_data.contiguous(), out, numel, BLOCK=CONVERT_BLOCK)
    return out.view(torch.float8_e4m3fn)


def cublas_mm(
    x_data: torch.Tensor,
    x_scale: torch.Tensor,
    w_data: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
    wrap=None,
) -> torch.Tensor:
    """(M, N): per-token fp8 x (scales (M, 1)) times the int4 weight, as cuBLAS's 1x128 x 1x128
    block-scaled GEMM on the weight's codes converted to fp8 (`codes_to_fp8`) with its group scales,
    and the token's scale repeated over the K groups: the same products and scales as the tiles."""
    groups = w_scale.shape[1]
    x_groups = x_scale.reshape(-1, 1).expand(-1, groups)
    w_fp8 = codes_to_fp8(w_data, wrap=wrap)
    return cublas_blockwise.mm(x_data, x_groups, w_fp8, w_scale, bias, out_dtype, weight_block_rows=1)


def unflatten_plan(flat: list[int]) -> list[tuple[int, int | None, Int4ScaledConfig]]:
    buckets = common.unflatten_plan(flat, _PLAN_FIELDS)
    return [(first, last, Int4ScaledConfig.from_tuple(c)) for first, last, c in buckets]


def launch_plan(
    x2d, x_scale2d, w_data, w_scale, bias, out, meta: Int4ScaledMeta, flat_plan: list[int], wrap=None
) -> None:
    """Each bucket's launch into `out` (M, N), with a grid that is empty unless M is in the bucket."""
    for active, last, config in common.active_buckets(x2d.shape[0], unflatten_plan(flat_plan)):
        launch(x2d, x_scale2d, w_data, w_scale, bias, out, meta, config, active=active, max_rows=last, wrap=wrap)


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
    """The `scaled_mm` op body for this pair: one launch per M bucket, output in x's leading shape."""
    from lowbit_compile.formats import get_format

    meta = Int4ScaledMeta.of(get_format(x_fmt), get_format(w_fmt), w_data)
    x2d = x_data.contiguous().reshape(-1, meta.k)
    if uses_cublas(meta, x2d.shape[0], x_data.device):
        out = cublas_mm(x2d, x_scale, w_data, w_scale, bias, out_dtype, wrap)
        return out.reshape(*x_data.shape[:-1], meta.n)
    out = torch.empty((x2d.shape[0], meta.n), dtype=out_dtype, device=x_data.device)
    launch_plan(x2d, x_scale.contiguous().reshape(-1, 1), w_data, w_scale, bias, out, meta, flat_plan, wrap=wrap)
    return out.reshape(*x_data.shape[:-1], meta.n)
