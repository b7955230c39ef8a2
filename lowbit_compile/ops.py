"""The `torch.ops.lowbit` namespace: q/dq ops and fused low-bit matmul / attention ops.

Two families:

* `quantize` / `dequantize` are CompositeImplicitAutograd: they run the reference math of
  `lowbit_compile.reference` and decompose into ordinary aten pointwise/reduction ops when traced,
  so Inductor can fuse activation quantization into the op that produces the activation.
* `weight_only_mm`, `scaled_mm`, `auto_mm` and `attention` are opaque custom ops with a fake
  (meta) implementation and a reference implementation registered for every device: on CPU it is
  the implementation, on a GPU without a specialised kernel it is the (slow but correct) fallback.
  Kernels for specific devices register over the reference with `register_kernel`.

Absent optional quantization outputs (zero point, global scale) are passed as 0-element tensors so
every op has a fixed tensor signature. Formats are passed by registry name (`lowbit_compile.formats`).
"""

from __future__ import annotations

import os

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor

from lowbit_compile import reference
from lowbit_compile.formats import ElementType, Granularity, get_attention_format, get_format
from lowbit_compile.kernels import HAS_TRITON

NAMESPACE = "lowbit"
_library = torch.library.Library(NAMESPACE, "FRAGMENT")


def _absent(like: Tensor) -> Tensor:
    return torch.empty(0, dtype=torch.float32, device=like.device)


def _present(t: Tensor) -> Tensor | None:
    return None if t.numel() == 0 else t


def quantized_tensor(
    data: Tensor, scale: Tensor, zero_point: Tensor, global_scale: Tensor
) -> reference.QuantizedTensor:
    """The op-level parts (0-element tensors for absent ones) as a reference `QuantizedTensor`;
    parts packed for a kernel (`pack_weight`) are unpacked first."""
    data, scale, zero_point = unpacked(data, scale, zero_point)
    return reference.QuantizedTensor(data, scale, _present(zero_point), _present(global_scale))


# -- packed weight layouts --------------------------------------------------------------------------
# A kernel may read a folded weight in a layout of its own. The fold stage asks `weight_packing`
# which one a site's weight gets and applies `pack_weight` wherever it quantizes that weight; the
# packed parts say what they are (K-major int4 data is int32, the reference layout's is uint8), so
# every op and its reference read both. Packings by name:
#   "kmajor": `kernels/weight_only.pack_kmajor`: data int32 words [K/8, N], scales [K/G + 1, N]
#                  times 2**-16 (the last row: the GEMV's split-K counters), zero points [K/G, N] times 2**16.

PACKINGS = ("kmajor",)


KMAJOR_ENV = "LOWBIT_INT4_KMAJOR"


def weight_packing(kernel: str, x_dtype: torch.dtype, device: torch.device, w_fmt: str) -> str | None:
    """The packing a weight folded for a `kernel` site (a `policy.Kernel` value) gets on `device`
    with activations of `x_dtype`, or None (the reference layout). Only where the kernel that runs
    reads it: int4 weight-only GEMMs on CUDA; `auto_mm`'s int4 x fp8 kernel reads the reference layout.

    K-major int4 is opt-in (`LOWBIT_INT4_KMAJOR=1`): on H100 (benchmarks/RESULTS.md, 2026-11-24
    sixth session) it makes M = 1 decode 1.17-1.26x faster (2.11-2.65x of bf16) but its tensor-core
    tiles are slower (M = 16: 0.92-1.01x of bf16 against 1.59-1.76x for the reference layout), and
    one folded weight serves every M. Turn it on for batch-1 decode serving."""
    if kernel != "weight_only_mm" or weight_only_kernel(x_dtype, device, w_fmt) is None:
        return None
    if os.environ.get(KMAJOR_ENV, "0") != "1":
        return None
    return "kmajor" if get_format(w_fmt).element is ElementType.INT4 else None


def pack_weight(packing: str | None, parts: list[Tensor]) -> list[Tensor]:
    """A folded weight's (data, scale, zero_point, global_scale) in `packing`'s layout (None: as is)."""
    if packing is None:
        return parts
    if packing != "kmajor":
        raise ValueError(f"unknown weight packing {packing!r}; known: {', '.join(PACKINGS)}")
    from lowbit_compile.kernels.weight_only import pack_kmajor

    data, scale, zero_point, global_scale = parts
    return [*pack_kmajor(data, scale, zero_point), global_scale]


def unpacked(data: Tensor, scale: Tensor, zero_point: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(data, scale, zero_point) in the reference layout, whatever packing they are in."""
    from lowbit_compile.kernels.weight_only import is_kmajor, unpack_kmajor

    return unpack_kmajor(data, scale, zero_point) if is_kmajor(data) else (data, scale, zero_point)


# -- quantize / dequantize (decomposable) --------------------------------------------------------

_library.define("quantize(Tensor x, str fmt) -> (Tensor, Tensor, Tensor, Tensor)")
_library.define(
    "dequantize(Tensor data, Tensor scale, Tensor zero_point, Tensor global_scale, str fmt, ScalarType dtype) -> Tensor"
)


def _quantize_impl(x: Tensor, fmt: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    q = reference.quantize(x, get_format(fmt))
    zero_point = q.zero_point if q.zero_point is not None else _absent(x)
    global_scale = q.global_scale if q.global_scale is not None else _absent(x)
    return q.data, q.scale, zero_point, global_scale


def _dequantize_impl(
    data: Tensor, scale: Tensor, zero_point: Tensor, global_scale: Tensor, fmt: str, dtype: torch.dtype
) -> Tensor:
    return reference.dequantize(quantized_tensor(data, scale, zero_point, global_scale), get_format(fmt), dtype)


_library.impl("quantize", _quantize_impl, "CompositeImplicitAutograd")
_library.impl("dequantize", _dequantize_impl, "CompositeImplicitAutograd")

# A static (calibrated) activation scale: the scale is an input, not reduced from x per call.
_library.define("quantize_static(Tensor x, Tensor scale, str fmt) -> (Tensor, Tensor, Tensor, Tensor)")


def _quantize_static_impl(x: Tensor, scale: Tensor, fmt: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    q = reference.quantize_with_scale(x, scale, get_format(fmt))
    return q.data, q.scale, _absent(x), _absent(x)


_library.impl("quantize_static", _quantize_static_impl, "CompositeImplicitAutograd")


# -- fused ops (opaque) ---------------------------------------------------------------------------


def _linear_reference(x: Tensor, weight: Tensor, bias: Tensor | None, out_dtype: torch.dtype) -> Tensor:
    """fp32 accumulate, one rounding to the output dtype at the end (what the kernels do)."""
    out = F.linear(x.float(), weight.float(), None if bias is None else bias.float())
    return out.to(out_dtype).contiguous()  # what the fake impls promise, whatever x's strides


def _out_features(w_data: Tensor) -> int:
    from lowbit_compile.kernels.weight_only import is_kmajor

    return w_data.shape[1] if is_kmajor(w_data) else w_data.shape[0]  # K-major int4: [K/8, N]


@torch.library.custom_op("lowbit::weight_only_mm", mutates_args=())
def weight_only_mm(
    x: Tensor,
    w_data: Tensor,
    w_scale: Tensor,
    w_zero_point: Tensor,
    w_global_scale: Tensor,
    bias: Tensor | None,
    w_fmt: str,
    out_dtype: torch.dtype,
) -> Tensor:
    """y[..., N] = x[..., K] @ dequantize(w)[N, K].T + bias (A16 x low-bit weight).

    `out_dtype` is the dtype the original matmul produced (x.dtype, or autocast's dtype)."""
    return _weight_only_mm_reference(x, w_data, w_scale, w_zero_point, w_global_scale, bias, w_fmt, out_dtype)


def _weight_only_mm_reference(x, w_data, w_scale, w_zero_point, w_global_scale, bias, w_fmt, out_dtype) -> Tensor:
    weight = reference.dequantize(
        quantized_tensor(w_data, w_scale, w_zero_point, w_global_scale), get_format(w_fmt), torch.float32
    )
    return _linear_reference(x, weight, bias, out_dtype)


@weight_only_mm.register_fake
def _(x, w_data, w_scale, w_zero_point, w_global_scale, bias, w_fmt, out_dtype):
    return x.new_empty((*x.shape[:-1], _out_features(w_data)), dtype=out_dtype)


@torch.library.custom_op("lowbit::scaled_mm", mutates_args=())
def scaled_mm(
    x_data: Tensor,
    x_scale: Tensor,
    x_global_scale: Tensor,
    w_data: Tensor,
    w_scale: Tensor,
    w_global_scale: Tensor,
    bias: Tensor | None,
    x_fmt: str,
    w_fmt: str,
    out_dtype: torch.dtype,
) -> Tensor:
    """y[..., N] = dequantize(x)[..., K] @ dequantize(w)[N, K].T + bias (A8W8 / FP8 / block / MX)."""
    return _scaled_mm_reference(x_data, x_scale, x_global_scale, w_data, w_scale, w_global_scale, bias, x_fmt, w_fmt, out_dtype)


def _scaled_mm_reference(x_data, x_scale, x_global_scale, w_data, w_scale, w_global_scale, bias, x_fmt, w_fmt, out_dtype):
    empty = _absent(x_data)
    x = reference.dequantize(quantized_tensor(x_data, x_scale, empty, x_global_scale), get_format(x_fmt), torch.float32)
    weight = reference.dequantize(
        quantized_tensor(w_data, w_scale, empty, w_global_scale), get_format(w_fmt), torch.float32
    )
    return _linear_reference(x, weight, bias, out_dtype)


@scaled_mm.register_fake
def _(x_data, x_scale, x_global_scale, w_data, w_scale, w_global_scale, bias, x_fmt, w_fmt, out_dtype):
    return x_data.new_empty((*x_data.shape[:-1], _out_features(w_data)), dtype=out_dtype)


@torch.library.custom_op("lowbit::auto_mm", mutates_args=())
def auto_mm(
    x: Tensor,
    w_data: Tensor,
    w_scale: Tensor,
    w_zero_point: Tensor,
    w_global_scale: Tensor,
    bias: Tensor | None,
    w_fmt: str,
    x_fmt: str,
    weight_only_below_m: int,
    out_dtype: torch.dtype,
) -> Tensor:
    """Shape-aware: weight-only below `weight_only_below_m` rows, activation-quantized at or above.

    The choice is made here, at run time, from the actual row count, so a graph compiled with a
    dynamic M serves decode and prefill from the same stored weight without recompiling.
    """
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if rows < weight_only_below_m:
        return weight_only_mm(x, w_data, w_scale, w_zero_point, w_global_scale, bias, w_fmt, out_dtype)
    x_data, x_scale, _, x_global_scale = _quantize_impl(x, x_fmt)
    return scaled_mm(x_data, x_scale, x_global_scale, w_data, w_scale, w_global_scale, bias, x_fmt, w_fmt, out_dtype)


@auto_mm.register_fake
def _(x, w_data, w_scale, w_zero_point, w_global_scale, bias, w_fmt, x_fmt, weight_only_below_m, out_dtype):
    return x.new_empty((*x.shape[:-1], _out_features(w_data)), dtype=out_dtype)


@torch.library.custom_op("lowbit::attention", mutates_args=())
def attention(
    q_data: Tensor,
    q_scale: Tensor,
    k_data: Tensor,
    k_scale: Tensor,
    v_data: Tensor,
    v_scale: Tensor,
    attn_mask: Tensor | None,
    is_causal: bool,
    scale: float | None,
    enable_gqa: bool,
    fmt: str,
    out_dtype: torch.dtype,
) -> Tensor:
    """softmax(Q K^T * scale + mask) V with Q, K, V quantized per token along the head dim.

    Shapes as `F.scaled_dot_product_attention`: q (..., Hq, L, D), k/v (..., Hkv, S, D); the
    probabilities stay in fp32 and are not quantized.
    """
    fmt_ = get_format(fmt)
    empty = _absent(q_data)
    q, k, v = (
        reference.dequantize(quantized_tensor(d, s, empty, empty), fmt_, torch.float32)
        for d, s in ((q_data, q_scale), (k_data, k_scale), (v_data, v_scale))
    )
    mask = attn_mask if attn_mask is None or attn_mask.dtype == torch.bool else attn_mask.float()
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa
    )
    # The fake impl promises a contiguous result; SDPA's CUDA kernels return (B, L, H, D) memory
    # transposed to (B, H, L, D) (issue 7: Inductor's assert_size_stride failed on it).
    return out.to(out_dtype).contiguous()


@attention.register_fake
def _(q_data, q_scale, k_data, k_scale, v_data, v_scale, attn_mask, is_causal, scale, enable_gqa, fmt, out_dtype):
    value_dim = v_data.shape[-1] * (2 if get_format(fmt).bits == 4 else 1)
    return q_data.new_empty((*q_data.shape[:-1], value_dim), dtype=out_dtype)


@torch.library.custom_op("lowbit::block_attention", mutates_args=())
def block_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Tensor | None,
    is_causal: bool,
    scale: float | None,
    enable_gqa: bool,
    fmt: str,
    out_dtype: torch.dtype,
) -> Tensor:
    """softmax(Q K^T * scale + mask) V for an attention format (`formats.AttentionFormat`): q, k, v
    come in high precision and the op quantizes them itself, per token block (on GPU: Q and P inside
    the attention kernel; K and V inside it at decode, by one pre-pass at prefill). Shapes as
    `F.scaled_dot_product_attention`; the result is contiguous (..., Hq, L, Dv) in `out_dtype`.
    Reference: `reference.attention`."""
    return _block_attention_reference(q, k, v, attn_mask, is_causal, scale, enable_gqa, fmt, out_dtype)


def _block_attention_reference(q, k, v, attn_mask, is_causal, scale, enable_gqa, fmt, out_dtype) -> Tensor:
    out = reference.attention(q, k, v, attn_mask, is_causal, scale, enable_gqa, fmt)
    return out.to(out_dtype).contiguous()


@block_attention.register_fake
def _(q, k, v, attn_mask, is_causal, scale, enable_gqa, fmt, out_dtype):
    return q.new_empty((*q.shape[:-1], v.shape[-1]), dtype=out_dtype)


FUSED_OPS = {
    "weight_only_mm": torch.ops.lowbit.weight_only_mm.default,
    "scaled_mm": torch.ops.lowbit.scaled_mm.default,
    "auto_mm": torch.ops.lowbit.auto_mm.default,
    "attention": torch.ops.lowbit.attention.default,
    "block_attention": torch.ops.lowbit.block_attention.default,
}


@torch.library.custom_op("lowbit::fake_quantize_from_rows", mutates_args=())
def fake_quantize_from_rows(x: Tensor, fmt: str, min_rows: int) -> Tensor:
    """dequantize(quantize(x)) when x has at least `min_rows` rows, else x unchanged (a copy).

    The q/dq reference of `auto_mm`: whether activations are quantized depends on the row count,
    which is only known per call under dynamic shapes, so the choice is opaque to tracing.
    """
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if rows < min_rows:
        return x.clone()
    return _dequantize_impl(*_quantize_impl(x, fmt), fmt, x.dtype)


@fake_quantize_from_rows.register_fake
def _(x, fmt, min_rows):
    return torch.empty_like(x)


# -- device kernels ---------------------------------------------------------------------------------
# The one place that decides whether a kernel runs a fused-op call (by format, device and dtype).
# Eager CUDA calls dispatch here through `register_kernel("cuda")`; under Inductor the lowering
# stage asks `use_device_kernels` to swap the opaque op for the kernel's `triton_op`, so the Triton
# source lands in the output code. Formats or dtypes without a kernel run the reference.

_KERNEL_ACTIVATIONS = (torch.bfloat16, torch.float16)


def weight_only_kernel(x_dtype: torch.dtype, device: torch.device, w_fmt: str) -> str | None:
    """The name of the kernel that runs `weight_only_mm` for these inputs, or None (reference)."""
    if not HAS_TRITON or device.type != "cuda" or x_dtype not in _KERNEL_ACTIVATIONS:
        return None
    from lowbit_compile.kernels import weight_only

    fmt = get_format(w_fmt)
    if weight_only.supports(fmt) is not None:
        return None
    return f"triton:w{fmt.bits}a16"


def scaled_mm_kernel(out_dtype: torch.dtype, device: torch.device, x_fmt: str, w_fmt: str) -> str | None:
    """The name of the kernel that runs `scaled_mm` for these inputs, or None (reference)."""
    if not HAS_TRITON or device.type != "cuda" or out_dtype not in (*_KERNEL_ACTIVATIONS, torch.float32):
        return None
    from lowbit_compile.kernels import scaled_mm as scaled

    x_fmt_, w_fmt_ = get_format(x_fmt), get_format(w_fmt)
    if w_fmt_.element is ElementType.INT4:  # int4 weights meet fp8 activations (converted in registers)
        from lowbit_compile.kernels import int4_scaled_mm

        return "triton:int4_fp8" if int4_scaled_mm.supports(x_fmt_, w_fmt_) is None else None
    if scaled.supports(x_fmt_, w_fmt_) is not None:
        return None
    if w_fmt_.granularity is Granularity.BLOCK:
        return "triton:fp8_block"
    return "triton:int8" if w_fmt_.element is ElementType.INT8 else "triton:fp8"


def auto_mm_kernels(x_dtype: torch.dtype, device: torch.device, w_fmt: str, x_fmt: str) -> tuple[str, str] | None:
    """The kernels of both halves of `auto_mm` (weight-only, scaled), or None if either has none."""
    low = weight_only_kernel(x_dtype, device, w_fmt)
    high = scaled_mm_kernel(x_dtype, device, x_fmt, w_fmt)
    if get_format(x_fmt).granularity is not Granularity.ROW:  # the op quantizes x itself, by rows
        return None
    return None if low is None or high is None else (low, high)


def attention_kernel(dtype: torch.dtype, device: torch.device, fmt: str) -> str | None:
    """The name of the kernel that runs `block_attention` for these inputs, or None (reference)."""
    if not HAS_TRITON or device.type != "cuda" or dtype not in (*_KERNEL_ACTIVATIONS, torch.float32):
        return None
    from lowbit_compile.kernels import attention as attention_kernels

    attention_format = get_attention_format(fmt)
    if attention_kernels.supports(attention_format) is not None:
        return None
    return "triton:attn_int8" if attention_format.formats[0].element is ElementType.INT8 else "triton:attn_fp8"


def _attention_shapes_supported(q: Tensor, k: Tensor, v: Tensor) -> bool:
    """Head dims the kernel holds in registers, and whole GQA groups (checked per call)."""
    from lowbit_compile.kernels import attention as attention_kernels

    if q.dim() < 3 or k.dim() != q.dim() or v.dim() != q.dim():
        return False
    return (
        max(q.shape[-1], v.shape[-1]) <= attention_kernels.MAX_HEAD_DIM
        and k.shape[-3] > 0
        and q.shape[-3] % k.shape[-3] == 0
    )


def _weight_only_plan(x: Tensor, w_data: Tensor, w_fmt: str, bias: Tensor | None) -> list[int]:
    from lowbit_compile.kernels import weight_only

    meta = weight_only.WeightMeta.of(get_format(w_fmt), w_data)
    return weight_only.plan(meta, x.dtype, bias is not None, x.device)


def _scaled_kernels(x_fmt: str, w_fmt: str, w_data: Tensor):
    """(kernel module, static meta) of the scaled GEMM that runs this pair: int4 weights meet fp8
    activations in `kernels/int4_scaled_mm.py`, 8-bit pairs in `kernels/scaled_mm.py`."""
    from lowbit_compile.kernels import int4_scaled_mm
    from lowbit_compile.kernels import scaled_mm as scaled

    x_fmt_, w_fmt_ = get_format(x_fmt), get_format(w_fmt)
    if w_fmt_.element is ElementType.INT4:
        return int4_scaled_mm, int4_scaled_mm.Int4ScaledMeta.of(x_fmt_, w_fmt_, w_data)
    return scaled, scaled.ScaledMeta.of(x_fmt_, w_fmt_, w_data)


def _scaled_mm_plan(
    out_dtype: torch.dtype, device, w_data: Tensor, x_fmt: str, w_fmt: str, bias, min_rows: int = 1
) -> list[int]:
    """The scaled family's tile plan; `min_rows`: rows below it run another kernel (`auto_mm`), so
    the int4 family does not tune those buckets."""
    family, meta = _scaled_kernels(x_fmt, w_fmt, w_data)
    below = {"min_rows": min_rows} if get_format(w_fmt).element is ElementType.INT4 else {}
    return family.plan(meta, out_dtype, bias is not None, device, **below)


if HAS_TRITON:
    from lowbit_compile.kernels import analysis_cache as _analysis_cache
    from lowbit_compile.kernels import common as _common
    from lowbit_compile.kernels import scaled_mm as _scaled
    from lowbit_compile.kernels import weight_only as _weight_only

    # torch.compile re-derives which tensors a kernel writes at every launch it traces; ours are
    # memoised by what that analysis reads (kernels/analysis_cache.py)
    _analysis_cache.install()

    @torch.library.triton_op("lowbit::weight_only_mm_triton", mutates_args=())
    def weight_only_mm_triton(
        x: Tensor,
        w_data: Tensor,
        w_scale: Tensor,
        w_zero_point: Tensor,
        bias: Tensor | None,
        w_fmt: str,
        out_dtype: torch.dtype,
        plan: list[int],
    ) -> Tensor:
        """`weight_only_mm` by the Triton kernels of `kernels/weight_only.py`; `plan` holds the tile
        config of each M bucket (`weight_only.plan`), chosen at compile time."""
        return _weight_only.run(
            x, w_data, w_scale, w_zero_point, bias, w_fmt, out_dtype, plan, wrap=torch.library.wrap_triton
        )

    @torch.library.triton_op("lowbit::scaled_mm_triton", mutates_args=())
    def scaled_mm_triton(
        x_data: Tensor,
        x_scale: Tensor,
        w_data: Tensor,
        w_scale: Tensor,
        bias: Tensor | None,
        x_fmt: str,
        w_fmt: str,
        out_dtype: torch.dtype,
        plan: list[int],
    ) -> Tensor:
        """`scaled_mm` by the Triton kernels of `kernels/scaled_mm.py` (plan: `scaled_mm.plan`), or
        of `kernels/int4_scaled_mm.py` for int4 weights."""
        family, _ = _scaled_kernels(x_fmt, w_fmt, w_data)
        return family.run(
            x_data, x_scale, w_data, w_scale, bias, x_fmt, w_fmt, out_dtype, plan, wrap=torch.library.wrap_triton
        )

    @torch.library.triton_op("lowbit::auto_mm_triton", mutates_args=())
    def auto_mm_triton(
        x: Tensor,
        w_data: Tensor,
        w_scale: Tensor,
        w_zero_point: Tensor,
        bias: Tensor | None,
        w_fmt: str,
        x_fmt: str,
        weight_only_below_m: int,
        out_dtype: torch.dtype,
        weight_only_plan: list[int],
        scaled_plan: list[int],
    ) -> Tensor:
        """`auto_mm` by both kernel families into one output: the weight-only buckets below
        `weight_only_below_m` rows, the activation's row quantization and the scaled GEMM at or
        above (every grid is empty outside its rows, so no guard is put on M)."""
        w_meta = _weight_only.WeightMeta.of(get_format(w_fmt), w_data)
        family, s_meta = _scaled_kernels(x_fmt, w_fmt, w_data)  # int4 weights: kernels/int4_scaled_mm.py
        x2d = x.contiguous().reshape(-1, w_meta.k)
        m = x2d.shape[0]
        wrap = torch.library.wrap_triton
        if isinstance(m, int) and m >= weight_only_below_m and family.uses_cublas(s_meta, m, x.device):
            # a static M above the switch: cuBLAS's block-scaled GEMM (kernels/cublas_blockwise.py)
            x_data, x_scale = _scaled.quantize_rows(x2d, get_format(x_fmt), wrap=wrap)
            out = family.cublas_mm(x_data, x_scale, w_data, w_scale, bias, out_dtype, wrap)
            return out.reshape(*x.shape[:-1], w_meta.n)
        out = torch.empty((m, w_meta.n), dtype=out_dtype, device=x.device)
        low = _common.restrict_plan(weight_only_plan, _weight_only._PLAN_FIELDS, 1, weight_only_below_m - 1)
        _weight_only.launch_plan(x2d, w_data, w_scale, w_zero_point, bias, out, w_meta, low, wrap=wrap)
        high = _common.restrict_plan(scaled_plan, family._PLAN_FIELDS, weight_only_below_m, None)
        above = _common.bucket_indicator(m, weight_only_below_m, None)
        x_data, x_scale = _scaled.quantize_rows(x2d, get_format(x_fmt), active=above, wrap=wrap)
        family.launch_plan(x_data, x_scale, w_data, w_scale, bias, out, s_meta, high, wrap=wrap)
        return out.reshape(*x.shape[:-1], w_meta.n)

    from lowbit_compile.kernels import attention as _attention

    @torch.library.triton_op("lowbit::block_attention_triton", mutates_args=())
    def block_attention_triton(
        q: Tensor,
        k: Tensor,
        v: Tensor,
        attn_mask: Tensor | None,
        is_causal: bool,
        scale: float | None,
        enable_gqa: bool,
        fmt: str,
        out_dtype: torch.dtype,
    ) -> Tensor:
        """`block_attention` by the Triton kernels of `kernels/attention.py` (autotuned tiles on GPU,
        the default tile under `LOWBIT_AUTOTUNE=0`)."""
        from lowbit_compile.kernels import tuning

        config = None if tuning.tuning_enabled() else _attention.default_config(fmt)
        return _attention.run(
            q, k, v, attn_mask, is_causal, scale, enable_gqa, fmt, out_dtype, wrap=torch.library.wrap_triton,
            config=config, bf16_decode=_attention.DECODE_SDPA,
        )  # fmt: skip

    @block_attention.register_kernel("cuda")
    def _(q, k, v, attn_mask, is_causal, scale, enable_gqa, fmt, out_dtype):
        if attention_kernel(q.dtype, q.device, fmt) is None or not _attention_shapes_supported(q, k, v):
            return _block_attention_reference(q, k, v, attn_mask, is_causal, scale, enable_gqa, fmt, out_dtype)
        return block_attention_triton(q, k, v, attn_mask, is_causal, scale, enable_gqa, fmt, out_dtype)

    @weight_only_mm.register_kernel("cuda")
    def _(x, w_data, w_scale, w_zero_point, w_global_scale, bias, w_fmt, out_dtype):
        if weight_only_kernel(x.dtype, x.device, w_fmt) is None:
            return _weight_only_mm_reference(x, w_data, w_scale, w_zero_point, w_global_scale, bias, w_fmt, out_dtype)
        plan = _weight_only_plan(x, w_data, w_fmt, bias)
        return weight_only_mm_triton(x, w_data, w_scale, w_zero_point, bias, w_fmt, out_dtype, plan)

    @scaled_mm.register_kernel("cuda")
    def _(x_data, x_scale, x_global_scale, w_data, w_scale, w_global_scale, bias, x_fmt, w_fmt, out_dtype):
        if scaled_mm_kernel(out_dtype, x_data.device, x_fmt, w_fmt) is None:
            return _scaled_mm_reference(
                x_data, x_scale, x_global_scale, w_data, w_scale, w_global_scale, bias, x_fmt, w_fmt, out_dtype
            )
        plan = _scaled_mm_plan(out_dtype, x_data.device, w_data, x_fmt, w_fmt, bias)
        return scaled_mm_triton(x_data, x_scale, w_data, w_scale, bias, x_fmt, w_fmt, out_dtype, plan)


def kernel_name(
    op: str,
    x_dtype: torch.dtype | None,
    device: torch.device | None,
    w_fmt: str | None,
    weight_only_below_m: int | None = None,
    x_fmt: str | None = None,
) -> str:
    """What runs a fused op, for the report: `<op> [triton:...]` or `<op> [reference]`."""
    known = None not in (device, x_dtype, w_fmt)
    if op == "auto_mm":
        both = auto_mm_kernels(x_dtype, device, w_fmt, x_fmt) if known and x_fmt else None
        low, high = both or (None, None)  # the lowering runs both halves' kernels or neither
        slower = "".join(f"; {k}: {SLOWER_THAN_BF16[k]}" for k in dict.fromkeys((low, high)) if k in SLOWER_THAN_BF16)
        return f"{op} [{low or 'reference'} below M={weight_only_below_m}, {high or 'reference'} above{slower}]"
    runs = None
    if op == "block_attention":
        known = None not in (device, x_dtype, x_fmt)
        runs = attention_kernel(x_dtype, device, x_fmt) if known else None
    if op == "weight_only_mm" and known:
        runs = weight_only_kernel(x_dtype, device, w_fmt)
    if op == "scaled_mm" and known and x_fmt:
        runs = scaled_mm_kernel(x_dtype, device, x_fmt, w_fmt)
    if runs in SLOWER_THAN_BF16:
        return f"{op} [{runs}; {SLOWER_THAN_BF16[runs]}]"
    if op == "block_attention" and runs is not None and _decode_runs_sdpa():
        return f"{op} [{runs}; decode steps: bf16 SDPA]"
    return f"{op} [{runs or 'reference'}]"


def _decode_runs_sdpa() -> bool:
    from lowbit_compile.kernels import attention as attention_kernels

    return attention_kernels.DECODE_SDPA


# Kernels measured slower than bf16 somewhere, with no faster path for the same stored weight: the
# report says so rather than the dispatch hiding it (issue 6 item 5; benchmarks/RESULTS.md).
SLOWER_THAN_BF16 = {
    # benchmarks/RESULTS.md, fifteenth session (bench_linear, Llama-3-8B shapes, the activation's
    # quantization included): one graph for all M against one graph per M (cuBLAS at static M).
    "triton:fp8_block": (
        "slower than bf16 at M > 128 on H100 under a dynamic M (0.72-1.12x); a static M >= 129 runs"
        " cuBLAS's block-scaled GEMM instead on sm_90 (1.10-1.55x)"
    ),
    # benchmarks/RESULTS.md "2026-11-24 (fourth session), H100 — w4-auto first run" (Llama-3-8B
    # shapes, row quantization included; the GEMM alone in parentheses), and the fifteenth session's
    # static M. Also reached through `auto_mm` (w4-auto at or above its switch M), whose report names
    # it as well.
    "triton:int4_fp8": (
        "slower than bf16 at M >= 128 on H100 (0.39-0.78x, GEMM alone 0.42-0.84x; 0.70-1.12x at M = 64),"
        " 0.67-0.78x at M >= 2048 where w4-auto runs it; w4a16, the other kernel for this weight, is"
        " slower there still (0.50-0.52x); a static M runs cuBLAS on the codes converted to fp8 instead"
        " on sm_90 (0.85-1.05x at M = 2048, 1.06-1.22x at 8192)"
    ),
}


def _val(node):
    return node.meta.get("val") if isinstance(node, torch.fx.Node) else None


def _swap(graph: torch.fx.Graph, node: torch.fx.Node, target, args: tuple) -> None:
    with graph.inserting_before(node):
        kernel_node = graph.call_function(target, args)
    kernel_node.meta.update(node.meta)
    node.replace_all_uses_with(kernel_node)
    graph.erase_node(node)


def use_device_kernels(graph: torch.fx.Graph) -> dict[str, int]:
    """Swap each fused-op call that a device kernel runs for that kernel's `triton_op` (same
    arguments plus its compile-time tile plan). Returns how many calls each kernel took."""
    counts: dict[str, int] = {}
    for node in list(graph.nodes):
        if node.target is torch.ops.lowbit.weight_only_mm.default:
            x, w_data, w_scale, w_zero_point, _, bias, w_fmt, out_dtype = node.args
            x_val, w_val = _val(x), _val(w_data)
            if x_val is None or w_val is None:
                continue
            name = weight_only_kernel(x_val.dtype, x_val.device, w_fmt)
            if name is None:
                continue
            plan = _weight_only_plan(x_val, w_val, w_fmt, _val(bias))
            args = (x, w_data, w_scale, w_zero_point, bias, w_fmt, out_dtype, plan)
            _swap(graph, node, torch.ops.lowbit.weight_only_mm_triton.default, args)
        elif node.target is torch.ops.lowbit.scaled_mm.default:
            x_data, x_scale, _, w_data, w_scale, _, bias, x_fmt, w_fmt, out_dtype = node.args
            x_val, w_val = _val(x_data), _val(w_data)
            if x_val is None or w_val is None:
                continue
            name = scaled_mm_kernel(out_dtype, x_val.device, x_fmt, w_fmt)
            if name is None:
                continue
            plan = _scaled_mm_plan(out_dtype, x_val.device, w_val, x_fmt, w_fmt, _val(bias))
            args = (x_data, x_scale, w_data, w_scale, bias, x_fmt, w_fmt, out_dtype, plan)
            _swap(graph, node, torch.ops.lowbit.scaled_mm_triton.default, args)
        elif node.target is torch.ops.lowbit.block_attention.default:
            q, k, v = (_val(a) for a in node.args[:3])
            fmt = node.args[7]
            if None in (q, k, v) or not _attention_shapes_supported(q, k, v):
                continue
            name = attention_kernel(q.dtype, q.device, fmt)
            if name is None:
                continue
            _swap(graph, node, torch.ops.lowbit.block_attention_triton.default, tuple(node.args))
        elif node.target is torch.ops.lowbit.auto_mm.default:
            x, w_data, w_scale, w_zero_point, _, bias, w_fmt, x_fmt, below_m, out_dtype = node.args
            x_val, w_val = _val(x), _val(w_data)
            if x_val is None or w_val is None:
                continue
            names = auto_mm_kernels(x_val.dtype, x_val.device, w_fmt, x_fmt)
            if names is None:
                continue
            name = "+".join(names)
            low_plan = _weight_only_plan(x_val, w_val, w_fmt, _val(bias))
            high_plan = _scaled_mm_plan(out_dtype, x_val.device, w_val, x_fmt, w_fmt, _val(bias), min_rows=below_m)
            args = (x, w_data, w_scale, w_zero_point, bias, w_fmt, x_fmt, below_m, out_dtype, low_plan, high_plan)
            _swap(graph, node, torch.ops.lowbit.auto_mm_triton.default, args)
        else:
            continue
        counts[name] = counts.get(name, 0) + 1
    return counts
