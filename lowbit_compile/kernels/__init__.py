"""GPU kernels behind the fused `torch.ops.lowbit` ops, one kernel family per file.

- `weight_only.py`: A16W4 / A16W8 GEMM (`lowbit::weight_only_mm`).
- `scaled_mm.py`, `int4_scaled_mm.py`: 8-bit scaled GEMMs and int4 x fp8 (`lowbit::scaled_mm`,
  `lowbit::auto_mm`).
- `attention.py`, `attention_decode.py`: quantized flash attention (`lowbit::block_attention`).
- `cublas_blockwise.py`: cuBLAS's block-scaled fp8 GEMMs (`F.scaled_mm`), which `scaled_mm.py` and
  `int4_scaled_mm.py` run for a static M in their compute-bound bucket on sm_90.
- `weight_search.py`: the int4 scale search run at fold time (not an op; `weight_search.py`).
- `tuning.py`, `common.py`, `analysis_cache.py`: disk-cached tile-config tuning, shared launch
  pieces, and the memo of torch's mutation analysis of our kernels.

Each family registers (in `lowbit_compile.ops`) the CUDA path of a fused op and, for Inductor, a
`torch.library.triton_op` whose Triton source appears in the output code. `device_call` is the one
place that decides, per fused-op call, whether a kernel runs it (by format, device and dtype);
`kernel_name` says the same thing in words for the report. Without Triton every op runs its
reference implementation.
"""

from __future__ import annotations

import importlib.util

HAS_TRITON = importlib.util.find_spec("triton") is not None
