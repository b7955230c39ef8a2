"""Time the tile configs of the scaled-GEMM kernel directly (no compile), to choose candidates.

    PYTHONPATH=. python benchmarks/sweep_scaled_mm.py --out benchmarks/out [--pairs fp8,int8,block] [--rows 2048,8192]

For each format pair, Llama-3-8B shape and M, times every tuner candidate of the M's bucket with
CUDA-graph replay, the weight rotated among copies larger than L2, against bf16 `F.linear` and (for
fp8 per row / int8) cuBLAS through `torch._scaled_mm` / `torch._int_mm`, rotated the same way. The
GEMM alone: the activation is quantized once, outside the timing (bench_linear.py times the whole
op). Prints the fastest configs per case, writes sweep_scaled_mm.json and the registers and spills
of each compiled variant.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from _sweep import bench_rotating, write_compiled_facts

from lowbit_compile import ops, reference
from lowbit_compile.formats import get_format
from lowbit_compile.kernels import common
from lowbit_compile.kernels import scaled_mm as scaled
from lowbit_compile.report import sqnr

SHAPES = ((4096, 4096), (14336, 4096), (4096, 14336))
PAIRS = {
    "fp8": ("fp8_e4m3_row", "fp8_e4m3_row"),
    "int8": ("int8_row", "int8_row"),
    "block": ("fp8_e4m3_1x128", "fp8_e4m3_128x128"),
}


def _cublas(pair: str, x_data, x_scale, weights, out_dtype):
    """cuBLAS on the same operands, where PyTorch exposes it (None otherwise)."""
    if pair == "fp8":
        return [
            lambda d=d, s=s: torch._scaled_mm(x_data, d.t(), scale_a=x_scale, scale_b=s.t(), out_dtype=out_dtype)
            for d, s in weights
        ]
    if pair == "int8" and x_data.shape[0] > 16:  # _int_mm needs M > 16
        return [lambda d=d, s=s: torch._int_mm(x_data, d.t()).float().mul_(x_scale).mul_(s.t()) for d, s in weights]
    return None


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="benchmarks/out")
    parser.add_argument("--pairs", default="fp8,int8,block")
    parser.add_argument("--rows", default="1,16,128,2048,8192")
    args = parser.parse_args(argv)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    torch.manual_seed(0)
    for pair in args.pairs.split(","):
        x_fmt, w_fmt = PAIRS[pair]
        for n, k in SHAPES:
            w = torch.randn(n, k, device="cuda") / k**0.5
            q = reference.quantize(w, w_fmt)
            weights = [(q.data.clone(), q.scale.clone()) for _ in range(max(2, common.L2_BYTES // (n * k) + 1))]
            w_bf16 = [w.to(torch.bfloat16) for _ in range(max(2, common.L2_BYTES // (n * k * 2) + 1))]
            meta = scaled.ScaledMeta.of(get_format(x_fmt), get_format(w_fmt), q.data)
            for m in (int(r) for r in args.rows.split(",")):
                bucket_m = next(b for first, last, b in common.M_BUCKETS if m >= first and (last is None or m <= last))
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                qx = reference.quantize(x, x_fmt)
                t_bf16 = bench_rotating([lambda wb=wb: F.linear(x, wb) for wb in w_bf16])
                cublas = _cublas(pair, qx.data, qx.scale, weights, torch.bfloat16)
                t_cublas = bench_rotating(cublas) if cublas else float("nan")
                empty = torch.empty(0, device="cuda")
                expected = ops._scaled_mm_reference(
                    qx.data, qx.scale, empty, q.data, q.scale, empty, None, x_fmt, w_fmt, torch.float32
                )
                out = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
                timed = []
                for config in scaled._candidates(bucket_m, meta):
                    try:
                        fns = [
                            lambda d=d, s=s, c=config: scaled.launch(qx.data, qx.scale, d, s, None, out, meta, c)
                            for d, s in weights
                        ]
                        out.fill_(float("nan"))
                        fns[0]()
                        torch.cuda.synchronize()
                        quality = sqnr(expected, out.float())
                        t = bench_rotating(fns)
                    except Exception as error:  # noqa: BLE001
                        print(f"  {pair} {n}x{k} m={m} {config}: failed {str(error)[:120]}")
                        continue
                    timed.append((t, config, quality))
                timed.sort(key=lambda r: r[0])
                print(
                    f"{pair} N={n} K={k} M={m}: bf16 {t_bf16 * 1e3:.1f} us, cuBLAS 8-bit {t_bf16 / t_cublas:.2f}x,"
                    f" {len(timed)} configs"
                )
                for t, config, quality in timed[:5]:
                    print(f"    {t_bf16 / t:5.2f}x {t * 1e3:8.1f} us sqnr {quality:5.1f} {config.as_tuple()}")
                results.append(
                    dict(
                        pair=pair, n=n, k=k, m=m, bf16_us=t_bf16 * 1e3, cublas_us=t_cublas * 1e3,
                        configs=[
                            dict(
                                config=c.as_tuple(), us=t * 1e3, sqnr=qq,
                                block_kernel=scaled.uses_block_kernel(meta, c),
                            )
                            for t, c, qq in timed
                        ],
                    )
                )  # fmt: skip
            del weights, w_bf16
            torch.cuda.empty_cache()
    (out_dir / "sweep_scaled_mm.json").write_text(json.dumps(results, indent=1))
    write_compiled_facts(scaled.scaled_mm_kernel, out_dir / "sweep_scaled_compiled.txt")
    write_compiled_facts(scaled.scaled_mm_block_kernel, out_dir / "sweep_scaled_block_compiled.txt")
    print("summary: best Triton config / cuBLAS 8-bit, as speedup over bf16 (GEMM only)")
    print("  (block: then the best tile of the shared kernel alone, i.e. v1's kernel, and its config)")
    none = {"us": float("nan"), "config": ()}
    for r in results:
        best = min(r["configs"], key=lambda c: c["us"]) if r["configs"] else none
        line = (
            f"  {r['pair']:6s} {r['n']:5d}x{r['k']:5d} M={r['m']:5d}  {r['bf16_us'] / best['us']:5.2f}x"
            f" / {r['bf16_us'] / r['cublas_us']:5.2f}x  {tuple(best['config'])}"
        )
        if r["pair"] == "block":
            shared = min((c for c in r["configs"] if not c["block_kernel"]), key=lambda c: c["us"], default=none)
            line += f"  shared {r['bf16_us'] / shared['us']:5.2f}x {tuple(shared['config'])}"
        print(line)


if __name__ == "__main__":
    start = time.time()
    main()
    print(f"sweep took {time.time() - start:.0f} s")
