"""Linear-layer speed of each recipe against bf16, Llama-3-8B shapes (run on a CUDA GPU).

    PYTHONPATH=. python benchmarks/bench_linear.py --out benchmarks/out

Times one `nn.Linear` (bf16, no bias) eager (cuBLAS), compiled by Inductor, and compiled by the
lowbit backend with each recipe, with CUDA-graph replay (`triton.testing.do_bench_cudagraph`), so
host overhead is excluded; inputs are rotated among buffers larger than L2, and by default each
call starts with a cold L2 (flushed; the flush's time is measured alone and subtracted), as in a
model whose weights do not stay in L2 (`--warm-l2`: the method of runs before 2026-11-23b). Prints speedup ratios
over eager bf16, writes JSON and, if matplotlib is available, a PNG. A recipe written `w4a16@kmajor`
folds its int4 weights K-major (`LOWBIT_INT4_KMAJOR=1`, opt-in: see `ops.weight_packing`), to
compare the two layouts in one run; `fp8-block@static` compiles one graph per M (dynamic=False), as
a fixed-length prefill graph is, where a static M may run cuBLAS (`kernels/cublas_blockwise.py`);
every other variant is one graph for all M (dynamic=True), as in serving.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
import unittest.mock
from pathlib import Path

import torch
import torch.nn as nn
from torch._dynamo.utils import counters

from lowbit_compile import ops as lowbit_ops

SHAPES = ((4096, 4096), (14336, 4096), (4096, 14336))  # (N, K) of Llama-3-8B projections
ROWS = (1, 16, 128, 2048, 8192)
RECIPES = ("w8a16", "w4a16", "w8a8", "fp8")
L2_BYTES = 64 * 2**20


def _inputs(m: int, k: int) -> list[torch.Tensor]:
    count = max(1, min(16, L2_BYTES // (m * k * 2) + 1))
    return [torch.randn(m, k, device="cuda", dtype=torch.bfloat16) for _ in range(count)]


_flush_buffer: list[torch.Tensor] = []


def _flush_l2() -> None:
    """Write twice L2's size, evicting the weights (a model's weights never stay in L2 between uses)."""
    if not _flush_buffer:
        _flush_buffer.append(torch.empty(2 * L2_BYTES // 4, dtype=torch.int32, device="cuda"))
    _flush_buffer[0].zero_()


def _time_ms(fn, inputs: list[torch.Tensor], cold_l2: bool = True) -> float:
    """Median ms per call by CUDA-graph replay. cold_l2: each call follows an L2 flush and the
    flush's own time (measured alone, same way) is subtracted; else weights stay in L2 between
    calls, which flatters whatever has the larger weight (a 4096x4096 bf16 weight fits in L2)."""
    from triton.testing import do_bench_cudagraph

    state = {"i": 0}

    def step() -> None:
        state["i"] = (state["i"] + 1) % len(inputs)
        fn(inputs[state["i"]])

    for x in inputs:  # compile / autotune every size outside the graph capture
        fn(x)
    torch.cuda.synchronize()
    if not cold_l2:
        return do_bench_cudagraph(step, rep=50, return_mode="median")

    def flushed_step() -> None:
        _flush_l2()
        step()

    total = do_bench_cudagraph(flushed_step, rep=100, return_mode="median")
    return total - do_bench_cudagraph(_flush_l2, rep=100, return_mode="median")


def _time_variant(fn, name, rows, inputs, references, shape_rows, recipes, warm_l2: bool) -> None:
    """Time `fn` at every M of one shape into `shape_rows`, with its error against bf16."""
    for m in rows:
        row = shape_rows[m]
        start = time.perf_counter()
        with torch.no_grad():
            try:
                row[f"{name}_ms"] = _time_ms(fn, inputs[m], cold_l2=not warm_l2)
                error = (fn(inputs[m][0]).float() - references[m]).norm() / references[m].norm()
                row[f"{name}_relerr"] = error.item()
                if name in recipes and row[f"{name}_relerr"] == 0.0:
                    row[f"{name}_error"] = "output identical to bf16: not quantized"
            except Exception as failure:  # noqa: BLE001 - a benchmark row records the failure
                row[f"{name}_ms"] = float("nan")
                row[f"{name}_error"] = f"{type(failure).__name__}: {failure}"[:300]
        row[f"{name}_wall_s"] = time.perf_counter() - start


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="benchmarks/out")
    parser.add_argument("--recipes", default=",".join(RECIPES))
    parser.add_argument("--rows", default=",".join(map(str, ROWS)))
    parser.add_argument(
        "--shapes", default=",".join(f"{n}x{k}" for n, k in SHAPES), help="N x K list (default: the three projections)"
    )
    parser.add_argument(
        "--warm-l2", action="store_true", help="let weights stay in L2 between calls (runs before 2026-11-23b)"
    )
    args = parser.parse_args(argv)
    recipes = [r for r in args.recipes.split(",") if r]
    rows = [int(m) for m in args.rows.split(",")]
    shapes = [tuple(int(v) for v in shape.split("x")) for shape in args.shapes.split(",") if shape]
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    tuning: dict[str, dict] = {}
    torch.manual_seed(0)
    for n, k in shapes:
        layer = nn.Linear(k, n, bias=False).to("cuda", torch.bfloat16).eval()
        inputs = {m: _inputs(m, k) for m in rows}
        with torch.no_grad():
            references = {m: layer(inputs[m][0]).float() for m in rows}
        shape_rows = {m: {"N": n, "K": k, "M": m} for m in rows}
        for name in ["bf16-eager", "bf16-inductor", *recipes]:
            # One variant at a time on a fresh Dynamo: several compiles of the same forward would
            # otherwise hit Dynamo's recompile limit and silently run eager.
            torch._dynamo.reset()
            counters["lowbit"].clear()
            if name == "bf16-eager":
                fn = layer
            elif name == "bf16-inductor":
                fn = torch.compile(layer, dynamic=True)
            else:
                policy, _, variant = name.partition("@")
                # "<recipe>@static": one graph per M (as a prefill graph of fixed length), where a
                # static M in a compute-bound bucket may run cuBLAS (kernels/cublas_blockwise.py);
                # otherwise one graph serves every M, as in serving
                options = {"policy": policy, "compute_sqnr": False}
                fn = torch.compile(layer, backend="lowbit", dynamic=variant != "static", options=options)
            # "<recipe>@kmajor": int4 weights folded K-major (opt-in), against the reference layout
            packing = contextlib.nullcontext()
            if name in recipes and name.endswith("@kmajor"):
                packing = unittest.mock.patch.dict(os.environ, {lowbit_ops.KMAJOR_ENV: "1"})
            with packing:
                _time_variant(fn, name, rows, inputs, references, shape_rows, recipes, args.warm_l2)
            if name in recipes:  # kernel tile tuning at compile time (kernels/tuning.py), all M of this shape
                tuning[f"{n}x{k} {name}"] = {
                    "seconds": counters["lowbit"]["tuning_seconds_x1000"] / 1000,
                    "tuned": counters["lowbit"]["tuning_runs"],
                    "cache_hits": counters["lowbit"]["tuning_cache_hits"],
                }
        for m in rows:
            results.append(shape_rows[m])
            print(json.dumps(shape_rows[m]), flush=True)
    (out_dir / "bench_linear.json").write_text(json.dumps({"rows": results, "tuning": tuning}, indent=2))
    names = ["bf16-inductor", *recipes]
    header = "| N x K | M | " + " | ".join(names) + " |"
    lines = [
        f"speedup over eager bf16 (cuBLAS), CUDA-graph replay, {'warm' if args.warm_l2 else 'cold'} L2,"
        f" {torch.cuda.get_device_name()}",
        header,
        "|" + "---|" * (len(names) + 2),
    ]
    for row in results:
        cells = [
            ("failed" if row[f"{name}_ms"] != row[f"{name}_ms"] else "not quantized")
            if f"{name}_error" in row
            else f"{row['bf16-eager_ms'] / row[f'{name}_ms']:.2f}x"
            for name in names
        ]
        lines.append(f"| {row['N']}x{row['K']} | {row['M']} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    (out_dir / "bench_linear.md").write_text(table + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, len(shapes), figsize=(5 * len(shapes), 4), sharey=True, squeeze=False)
        axes = axes[0]
        for ax, (n, k) in zip(axes, shapes):
            subset = [r for r in results if r["N"] == n and r["K"] == k]
            for name in names:
                ax.plot(
                    [r["M"] for r in subset], [r["bf16-eager_ms"] / r[f"{name}_ms"] for r in subset], "o-", label=name
                )
            ax.set_xscale("log")
            ax.set_title(f"N={n} K={k}")
            ax.set_xlabel("M")
            ax.axhline(1.0, color="gray", lw=0.5)
        axes[0].set_ylabel("speedup over bf16 eager")
        axes[0].legend()
        fig.savefig(out_dir / "bench_linear.png", dpi=100, bbox_inches="tight")
    except ImportError:
        pass
    print(table)
    for variant, cost in tuning.items():
        print(f"tuning {variant}: {cost['seconds']:.1f} s, {cost['tuned']} tuned, {cost['cache_hits']} from cache")
    return results


if __name__ == "__main__":
    main()
