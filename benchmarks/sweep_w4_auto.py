"""The `w4-auto` crossover: where int4 -> fp8 (per-token fp8 activations) overtakes weight-only int4.

    PYTHONPATH=. LOWBIT_CACHE_DIR=/tmp/lbc python benchmarks/sweep_w4_auto.py --out benchmarks/out

For the Llama-3-8B shapes and each M, times with CUDA-graph replay (weights rotated among copies
larger than L2, as in a whole model) on one symmetric int4 g128 weight:
- bf16 `F.linear` (cuBLAS), the baseline of every ratio;
- w4a16: the weight-only kernel with its tuned config for M's bucket (at large M its tensor-core
  path dequantizes to bf16 MMA: the other tensor-core option the issue names);
- int4_fp8: the row quantization kernel plus the int4 x fp8 kernel (`kernels/int4_scaled_mm.py`),
  tuned the same way, and the GEMM alone;
- auto: what `w4-auto` runs at the current switch (`policy.W4_AUTO_SWITCH_M`).
Prints the crossover per shape and the switch it implies (the smallest swept M from which int4_fp8
wins on every shape at every larger swept M), writes sweep_w4_auto.json, and the table last.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from _sweep import bench_rotating

from lowbit_compile import reference
from lowbit_compile.formats import get_format
from lowbit_compile.kernels import common, weight_only
from lowbit_compile.kernels import int4_scaled_mm as int4
from lowbit_compile.kernels import scaled_mm as scaled
from lowbit_compile.policy import W4_AUTO_SWITCH_M

SHAPES = ((4096, 4096), (14336, 4096), (4096, 14336))
W_FMT, X_FMT = "int4_g128", "fp8_e4m3_row"


def _bucket_config(flat: list[int], unflatten, m: int):
    return next(c for first, last, c in unflatten(flat) if m >= first and (last is None or m <= last))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="benchmarks/out")
    parser.add_argument("--rows", default="1,16,64,128,256,512,2048,8192")
    args = parser.parse_args(argv)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [int(r) for r in args.rows.split(",")]
    device = torch.device("cuda")
    torch.manual_seed(0)
    results = []
    for n, k in SHAPES:
        start = time.time()
        w = torch.randn(n, k, device=device) / k**0.5
        q = reference.quantize(w, W_FMT)
        copies = max(2, common.L2_BYTES // (n * k // 2) + 1)
        weights = [(q.data.clone(), q.scale.clone()) for _ in range(copies)]
        w_bf16 = [w.to(torch.bfloat16) for _ in range(max(2, common.L2_BYTES // (n * k * 2) + 1))]
        w_meta = weight_only.WeightMeta.of(get_format(W_FMT), q.data)
        s_meta = int4.Int4ScaledMeta.of(get_format(X_FMT), get_format(W_FMT), q.data)
        w_plan = weight_only.plan(w_meta, torch.bfloat16, False, device)
        s_plan = int4.plan(s_meta, torch.bfloat16, False, device)
        print(f"N={n} K={k}: plans tuned in {time.time() - start:.0f} s", flush=True)
        absent = torch.empty(0, device=device)
        for m in rows:
            x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
            out = torch.empty(m, n, device=device, dtype=torch.bfloat16)
            w_config = _bucket_config(w_plan, weight_only.unflatten_plan, m)
            s_config = _bucket_config(s_plan, int4.unflatten_plan, m)
            x_data, x_scale = scaled.quantize_rows(x, get_format(X_FMT))

            def quantized(d, s):
                xd, xs = scaled.quantize_rows(x, get_format(X_FMT))
                int4.launch(xd, xs, d, s, None, out, s_meta, s_config)

            t_bf16 = bench_rotating([lambda wb=wb: F.linear(x, wb) for wb in w_bf16])
            t_w4a16 = bench_rotating(
                [lambda d=d, s=s: weight_only.launch(x, d, s, absent, None, out, w_meta, w_config) for d, s in weights]
            )
            t_gemm = bench_rotating(
                [lambda d=d, s=s: int4.launch(x_data, x_scale, d, s, None, out, s_meta, s_config) for d, s in weights]
            )
            t_fp8 = bench_rotating([lambda d=d, s=s: quantized(d, s) for d, s in weights])
            t_auto = t_w4a16 if m < W4_AUTO_SWITCH_M else t_fp8
            row = dict(
                n=n, k=k, m=m, bf16_us=t_bf16 * 1e3, w4a16_us=t_w4a16 * 1e3, int4_fp8_us=t_fp8 * 1e3,
                int4_fp8_gemm_us=t_gemm * 1e3, auto_us=t_auto * 1e3,
                w4a16_config=w_config.as_tuple(), int4_fp8_config=s_config.as_tuple(),
            )  # fmt: skip
            results.append(row)
            print(
                f"  M={m:5d} bf16 {t_bf16 * 1e3:8.1f} us | w4a16 {t_bf16 / t_w4a16:5.2f}x | int4_fp8 "
                f"{t_bf16 / t_fp8:5.2f}x (gemm {t_bf16 / t_gemm:5.2f}x) {s_config.as_tuple()}",
                flush=True,
            )
        del weights, w_bf16
        torch.cuda.empty_cache()

    crossover = {}
    for n, k in SHAPES:
        mine = [r for r in results if (r["n"], r["k"]) == (n, k)]
        wins = [r["m"] for r in mine if r["int4_fp8_us"] < r["w4a16_us"]]
        # the smallest swept M from which int4_fp8 wins at every larger swept M
        crossover[f"{n}x{k}"] = next(
            (r["m"] for i, r in enumerate(mine) if all(s["m"] in wins for s in mine[i:])), None
        )
    known = [v for v in crossover.values() if v is not None]
    implied = max(known) if len(known) == len(SHAPES) else None
    (out_dir / "sweep_w4_auto.json").write_text(
        json.dumps(dict(switch_m=W4_AUTO_SWITCH_M, crossover=crossover, implied_switch=implied, rows=results), indent=1)
    )
    print(f"\ncrossover (int4_fp8 faster than w4a16 from this M on): {crossover}; implied switch M = {implied}")
    print(f"w4-auto at switch M={W4_AUTO_SWITCH_M}: ratio to bf16, minimum over the three shapes")
    keys = ("w4a16_us", "int4_fp8_us", "int4_fp8_gemm_us", "auto_us")
    print(f"{'M':>6} {'w4a16':>7} {'int4_fp8':>9} {'gemm':>6} {'auto':>6}  auto runs")
    for m in rows:
        mine = [r for r in results if r["m"] == m]
        worst = [min(r["bf16_us"] / r[key] for r in mine) for key in keys]
        runs = "triton:w4a16" if m < W4_AUTO_SWITCH_M else "triton:int4_fp8"
        print(f"{m:6d} {worst[0]:7.2f} {worst[1]:9.2f} {worst[2]:6.2f} {worst[3]:6.2f}  {runs}")

if __name__ == "__main__":
    start = time.time()
    main()
    print(f"sweep took {time.time() - start:.0f} s")
