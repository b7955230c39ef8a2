"""GPU kernels behind the fused `torch.ops.lowbit` ops, one kernel family per file.

- `weight_only.py`: A16W4 / A16W8 GEMM (`lowbit::weight_only_mm`).
- `tuning.py`: disk-cached tile-config tuning shared by the families.

Each family registers (in `lowbit_compile.ops`) the CUDA path of a fused op and, for Inductor, a
`torch.library.triton_op` whose Triton source appears in the output code. `device_call` is the one
place that decides, per fused-op call, whether a kernel runs it (by format, device and dtype);
`kernel_name` says the same thing in words for the report. Without Triton every op runs its
reference implementation.
"""

from __future__ import annotations

import importlib.util

HAS_TRITON = importlib.util.find_spec("triton") is not None
