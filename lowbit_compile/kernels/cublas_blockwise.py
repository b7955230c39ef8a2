"""cuBLAS block-scaled fp8 GEMMs through `torch.nn.functional.scaled_mm` (compute-bound M on Hopper).

cuBLASLt >= 12.9 runs fp8 e4m3 GEMMs whose scales are per 1x128 group of the activation and per
128x128 block (or per 1x128 group) of the weight, on sm_90 only. torch exposes them as
`F.scaled_mm(..., ScalingType.BlockWise1x128, ..., ScalingType.BlockWise128x128 | BlockWise1x128)`
(torch >= 2.10). Measured on H100 (benchmarks/RESULTS.md, fifteenth session, GEMM alone, ratio to
bf16 cuBLAS): 1x128 x 128x128 1.57-1.78x at M >= 512 against 1.06-1.20x for our Triton block kernel;
1x128 x 1x128 1.27-1.37x at M >= 2048. Two kernel families use them for a static M in their
compute-bound bucket: `scaled_mm` (fp8-block) and `int4_scaled_mm` (w4-auto, int4 codes converted
to fp8 first).

The same math as the reference of those formats: every 128-wide K group's product is scaled by its
activation and weight scale in fp32 (cuBLAS's accumulation order differs from ours; outputs agree
to fp32 rounding, SQNR checked by the GPU tests).

Layouts cuBLAS wants (checked by torch): A (M, K) row-major, B = W.T (W (N, K) row-major); A's
scales (M, K/128) with strides (1, M) ("M-major"); B's 128x128 block scales (round_up(K/128, 4),
N/128) with strides (1, round_up(K/128, 4)), i.e. our (N/128, K/128) row-major blocks padded to a
multiple of 4 columns and transposed; B's 1x128 scales (N, K/128) with strides (1, N). M must be a
multiple of 4 (cuBLAS rejects other M: measured M = 3 and 17), N a multiple of 16 and K of 128;
with 128x128 weight blocks N a multiple of 128 (torch 2.11's fake impl counts N // 128 blocks).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

GROUP = 128  # the only group / block size these recipes take


@functools.cache
def available(device_index: int) -> bool:
    """Whether this process can run the block-scaled recipes on CUDA device `device_index`: sm_90,
    a torch with `F.scaled_mm` (2.10+) and a CUDA build of 12.9 or later."""
    if not hasattr(F, "scaled_mm") or not hasattr(F, "ScalingType") or torch.version.cuda is None:
        return False
    major, minor = (int(part) for part in torch.version.cuda.split(".")[:2])
    if (major, minor) < (12, 9):
        return False
    return torch.cuda.get_device_capability(device_index)[0] == 9


def usable(m, n: int, k: int, device: torch.device) -> bool:
    """Whether a call of M rows (an int: a static M; a symbolic one never) runs here: M a multiple
    of 4, N of 16, K of 128, on a device where `available`."""
    if not isinstance(m, int) or device.type != "cuda":
        return False
    if m == 0 or m % 4 or n % 16 or k % GROUP:
        return False
    return available(device.index if device.index is not None else torch.cuda.current_device())


def m_major(scale: torch.Tensor) -> torch.Tensor:
    """(rows, K/128) scales with strides (1, rows), the layout cuBLAS reads per-group scales in."""
    return scale.t().contiguous().t()


def weight_block_scales(w_scale: torch.Tensor, k: int) -> torch.Tensor:
    """(N/128, K/128) block scales as cuBLAS reads them: (round_up(K/128, 4), N/128), strides
    (1, round_up(K/128, 4)); the padding columns are never read for a K of K/128 groups."""
    groups = k // GROUP
    padded = -(-groups // 4) * 4
    scale = w_scale.contiguous()
    if padded != groups:
        scale = F.pad(scale, (0, padded - groups))
    return scale.t()


# Output dtypes whose bias cuBLAS adds in the GEMM's epilogue (a bias of the output's dtype; measured
# with bf16 on H100); other outputs get the bias added afterwards.
EPILOGUE_BIAS_DTYPES = (torch.bfloat16, torch.float16)


def mm(
    x_data: torch.Tensor,
    x_scale: torch.Tensor,
    w_data: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
    weight_block_rows: int,
) -> torch.Tensor:
    """(M, N) = x (fp8, 1x128 groups, scales (M, K/128)) @ w (fp8 (N, K)).T + bias, in `out_dtype`.
    `weight_block_rows` 128: w's scales are per 128x128 block, (N/128, K/128); 1: per 1x128 group
    along K, (N, K/128). The bias is added in cuBLAS's epilogue (before the one rounding) for 16-bit
    outputs, afterwards otherwise."""
    if weight_block_rows == GROUP:
        recipe_b, w_scale_cublas = F.ScalingType.BlockWise128x128, weight_block_scales(w_scale, x_data.shape[1])
    elif weight_block_rows == 1:
        recipe_b, w_scale_cublas = F.ScalingType.BlockWise1x128, m_major(w_scale)
    else:
        raise ValueError(f"cuBLAS block-scaled weights are 128x128 blocks or 1x128 groups, not {weight_block_rows}x128")
    in_epilogue = bias is not None and out_dtype in EPILOGUE_BIAS_DTYPES
    out = F.scaled_mm(
        x_data, w_data.t(), m_major(x_scale), F.ScalingType.BlockWise1x128, w_scale_cublas, recipe_b,
        bias=bias.to(out_dtype) if in_epilogue else None, output_dtype=out_dtype,
    )  # fmt: skip
    return out if bias is None or in_epilogue else out + bias.to(out_dtype)
