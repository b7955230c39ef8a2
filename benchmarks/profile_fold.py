"""What quantizing the weights costs at compile time (fold time), on a CUDA GPU.

    PYTHONPATH=. python benchmarks/profile_fold.py [--out DIR] [--formats int4_g128_asym,int8_row]

For each Llama-3-8B weight shape, the fold's quantization of a fresh bf16 weight
(`passes.state.quantize_weight`): round to nearest and, for int4, the scale search; wall time with
the GPU synchronised, the kernels launched and the GPU time they took (torch.profiler). Also the
bytes the weight has, for a floor: one read of the bf16 weight at 3 TB/s.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from passes.state import quantize_weight

SHAPES = [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336), (128256, 4096)]


def _timed(fn, repeats: int = 2) -> float:
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats * 1e3


def _kernels(fn) -> tuple[int, float]:
    """(kernel launches, their GPU ms) of one call."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return len(events), sum(e.device_time for e in events) / 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(os.environ["OUT"]) if os.environ.get("OUT") else None)
    parser.add_argument("--formats", default="int4_g128_asym,int8_row")
    args = parser.parse_args()
    print(f"# {torch.cuda.get_device_name()} torch {torch.__version__}")
    rows = []
    for fmt in args.formats.split(","):
        for n, k in SHAPES:
            weight = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
            for search in (False, True) if fmt.startswith("int4") else (False,):

                def fold(search=search, weight=weight, fmt=fmt):
                    # a fresh parameter each call: the searched-weight cache keys on the parameter
                    return quantize_weight(torch.nn.Parameter(weight.clone()), False, fmt, search=search)

                ms = _timed(fold)
                launches, gpu_ms = _kernels(fold)
                floor_ms = weight.numel() * 2 / 3e12 * 1e3
                rows.append(dict(fmt=fmt, shape=f"{n}x{k}", search=search, wall_ms=ms, launches=launches,
                                 gpu_ms=gpu_ms, read_floor_ms=floor_ms))  # fmt: skip
                print(" | ".join(f"{key}={v:.4g}" if isinstance(v, float) else f"{key}={v}" for key, v in rows[-1].items()))
    # a Llama-3-8B-shaped model's total per layer (q, k, v, o, gate, up, down) and the LM head
    per_layer = {(4096, 4096): 2, (1024, 4096): 2, (14336, 4096): 2, (4096, 14336): 1}
    for fmt in args.formats.split(","):
        for search in (False, True):
            got = {r["shape"]: r["wall_ms"] for r in rows if r["fmt"] == fmt and r["search"] == search}
            if len(got) < len(SHAPES):
                continue
            layer = sum(got[f"{n}x{k}"] * count for (n, k), count in per_layer.items())
            print(f"{fmt} search={search}: {layer / 1e3:.3f} s per layer, LM head {got['128256x4096'] / 1e3:.3f} s, "
                  f"32 layers + head {(32 * layer + got['128256x4096']) / 1e3:.1f} s")  # fmt: skip
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "profile_fold.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
