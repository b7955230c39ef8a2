"""Where a decode step's GPU time goes: bf16 Inductor against lowbit recipes, kernel time by category.

    PYTHONPATH=.:benchmarks python benchmarks/profile_decode.py --layers 8 --policies w4a16 --release

Builds `llama8b.py`'s Llama-3-8B-shaped model (`--layers` decoder layers; the LM head and embedding at
full size), compiles each variant as `llama8b.py` does (CUDA graphs), runs the prompt and a few decode
steps, then records `--steps` batch-1 decode steps (`--batch` for another batch) under
`torch.profiler` (CUDA activity: the kernels inside the graph replays). Per variant it prints the
step's wall time (synchronized, outside the profiler), the sum of its kernel times, that time by
category, and the longest kernels; and writes JSON to `--out`. Categories, by kernel name:

- `linear`: the weight-only / scaled-GEMM kernels of lowbit, cuBLAS GEMMs (bf16 linears);
- `lm_head`: not separable by name; the longest linear kernel launched once per step is the head;
- `attention`: flash / cuDNN / efficient SDPA kernels and lowbit's attention kernels;
- `other`: everything else (Inductor's fused norms, RoPE, SiLU*mul, residual adds, cache writes).

Wall minus the kernel sum is the time no kernel ran (launch gaps inside the graph, host work).
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path
from typing import Any

import llama8b
import torch
from llama8b import LLAMA3_8B, Plan

LINEAR_MARKERS = ("weight_only", "gemv", "dequantize", "scaled_mm", "int4_fp8", "gemm", "xmma", "cutlass",
                  "nvjet", "splitk", "row_quant")  # fmt: skip
ATTENTION_MARKERS = ("flash", "fmha", "attention", "cudnn", "sdpa")


def category(name: str) -> str:
    lowered = name.lower()
    if any(marker in lowered for marker in ATTENTION_MARKERS):
        return "attention"
    if any(marker in lowered for marker in LINEAR_MARKERS):
        return "linear"
    return "other"


def kernel_times(prof: Any, steps: int) -> dict[str, dict[str, float]]:
    """Kernel name -> {us per step, launches per step}, from the profiler's CUDA kernel events."""
    table: dict[str, dict[str, float]] = defaultdict(lambda: {"us": 0.0, "calls": 0.0})
    for event in prof.events():
        if event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        row = table[event.name]
        row["us"] += event.device_time / steps
        row["calls"] += 1 / steps
    return dict(table)


def profile_variant(model: Any, plan: Plan, name: str, release: bool, inputs: dict[str, Any], batch: int) -> dict:
    seen: dict[str, list[Any]] = {"reports": [], "output_code": []}
    model.allocate_cache(batch, plan.max_len)
    compiled = llama8b._compile(model, plan, name, release, seen)
    step = llama8b._step(compiled, plan)
    tokens = inputs["one"] if batch == 1 else inputs["many"]
    positions = inputs["positions"]
    start = time.perf_counter()
    with torch.no_grad():
        step(inputs["prompt"].expand(batch, -1).contiguous(), inputs["prompt_positions"])
        for position in positions[:4]:
            step(tokens, position)
        torch.cuda.synchronize()
        compile_s = time.perf_counter() - start
        timed = positions[4 : 4 + plan.steps]
        start = time.perf_counter()
        for position in timed:
            step(tokens, position)
        torch.cuda.synchronize()
        wall_us = (time.perf_counter() - start) / len(timed) * 1e6
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for position in timed:
                step(tokens, position)
            torch.cuda.synchronize()
    kernels = kernel_times(prof, len(timed))
    by_category: dict[str, float] = defaultdict(float)
    for kernel, row in kernels.items():
        by_category[category(kernel)] += row["us"]
    top = sorted(kernels.items(), key=lambda item: -item[1]["us"])[:20]
    return {
        "variant": name,
        "batch": batch,
        "compile_s": round(compile_s, 1),
        "wall_us": round(wall_us, 1),
        "kernel_us": round(sum(row["us"] for row in kernels.values()), 1),
        "launches": round(sum(row["calls"] for row in kernels.values()), 1),
        "by_category_us": {key: round(value, 1) for key, value in sorted(by_category.items())},
        "top": [
            {"name": kernel[:120], "us": round(row["us"], 1), "calls": round(row["calls"], 2)} for kernel, row in top
        ],  # fmt: skip
    }


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--policies", default="w4a16")
    parser.add_argument("--release", action="store_true")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--prefill", type=int, default=2048)
    parser.add_argument("--out", default="benchmarks/out")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")
    config = replace(LLAMA3_8B, num_layers=args.layers)
    plan = Plan(config, "cuda", torch.bfloat16, prefill=args.prefill, batch=args.batch, steps=args.steps, warmup=4,
                prefill_reps=1, cudagraphs=True)  # fmt: skip
    inputs = llama8b.make_inputs(plan)
    names = ["bf16", *(name.strip() for name in args.policies.split(",") if name.strip())]
    rows = []
    model = llama8b.build_model(plan)
    for name in names:
        llama8b._free(plan)
        release = args.release and name != "bf16"
        row = profile_variant(model, plan, name, release, inputs, args.batch)
        rows.append(row)
        print(json.dumps(row), flush=True)
        model.allocate_cache(0, 0)
        llama8b._free(plan)
        if release:
            del model
            llama8b._free(plan)
            model = llama8b.build_model(plan)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"profile_decode_b{args.batch}.json").write_text(json.dumps(rows, indent=1))
    base = rows[0]
    print(f"\n{args.layers} layers, batch {args.batch}, us per decode step (ratio: bf16 / variant)")
    print("| variant | wall | kernels | launches | linear | attention | other | idle (wall - kernels) |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        cats = row["by_category_us"]
        cells = [f"{row['wall_us']:.0f} ({base['wall_us'] / row['wall_us']:.2f}x)", f"{row['kernel_us']:.0f}",
                 f"{row['launches']:.0f}"]  # fmt: skip
        for key in ("linear", "attention", "other"):
            value, ref = cats.get(key, 0.0), base["by_category_us"].get(key, 0.0)
            cells.append(f"{value:.0f}" + (f" ({ref / value:.2f}x)" if value else ""))
        cells.append(f"{row['wall_us'] - row['kernel_us']:.0f}")
        print(f"| {row['variant']} | " + " | ".join(cells) + " |")
    for row in rows:
        print(f"\n{row['variant']}: longest kernels (us per step, launches per step)")
        for kernel in row["top"][:12]:
            print(f"  {kernel['us']:8.1f} {kernel['calls']:6.2f}  {kernel['name']}")
    return rows


if __name__ == "__main__":
    main()
