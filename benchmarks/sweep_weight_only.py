"""Time many tile configs of the weight-only kernel directly (no compile), to choose candidates.

    PYTHONPATH=. python benchmarks/sweep_weight_only.py --out benchmarks/out [--formats int4_g128_asym]

For each format, Llama-3-8B shape and M, times every config of a broad list (the tuner's candidates
plus exploratory ones) with CUDA-graph replay, the weight rotated among copies larger than L2 (as in
a whole model, where no weight stays in L2), against bf16 `F.linear` rotated the same way. Prints the
six fastest per case with their ratio to bf16, writes everything to sweep_weight_only.json and
the registers and spills of each compiled variant to sweep_compiled.txt.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from _sweep import bench_rotating, write_compiled_facts

from lowbit_compile import ops, reference
from lowbit_compile.formats import get_format
from lowbit_compile.kernels import common, weight_only
from lowbit_compile.report import sqnr

SHAPES = ((4096, 4096), (14336, 4096), (4096, 14336))
C = weight_only.WeightOnlyConfig


def exploratory(m: int, meta: weight_only.WeightMeta) -> list[weight_only.WeightOnlyConfig]:
    if meta.kmajor and m == 1:  # the K-major GEMV: its candidates only
        return []
    if m == 1:
        configs = [C(1, bn, bk, w, 2, s) for bn, bk, w, s in itertools.product((2, 4, 8), (1024, 2048, 4096), (4, 8), (1, 2))]
        if meta.bits == 4:
            configs += [C(1, bn, meta.group, 4, 3, s) for bn, s in itertools.product((8, 16, 32, 64), (4, 8, 16))]
        configs += [C(1, 4, 2048, 4, st) for st in (1, 3)]
        configs += [C(1, bn, bk, w, 2) for bn, bk, w in itertools.product((16, 32), (256, 512, 1024), (4, 8))]
        return configs
    if m <= 16:
        configs = [C(16, bn, 128, 4, 3, s) for bn, s in itertools.product((64, 128), (1, 2, 4, 8))]
        configs += [C(16, bn, bk, w, 3, s, 1) for bn, bk, w, s in itertools.product((64, 128), (64, 128), (4, 8), (1, 2, 4, 8))]
        configs += [C(32, 128, 128, 4, 3, s, 1) for s in (1, 2, 4)]
        return configs
    configs = [C(bm, bn, bk, 4, 4, s) for bm, bn, bk, s in itertools.product((64, 128), (64, 128), (64, 128), (1, 2, 4))]
    configs += [C(bm, bn, bk, w, 3, s, 1) for bm, bn, bk, w, s in itertools.product((64, 128), (64, 128), (64, 128), (4, 8), (1, 2))]
    return configs


def _weights(fmt: str, n: int, k: int, copies: int, kmajor: bool):
    """The bf16 weight and `copies` copies of its quantized parts as the kernel reads them (the
    reference op reads either layout: `ops.quantized_tensor` unpacks K-major parts)."""
    w = torch.randn(n, k, device="cuda") / k**0.5
    q = reference.quantize(w, fmt)
    zero = q.zero_point if q.zero_point is not None else torch.empty(0, device="cuda")
    parts = weight_only.pack_kmajor(q.data, q.scale, zero) if kmajor else (q.data, q.scale, zero)
    return w, [tuple(t.clone() for t in parts) for _ in range(copies)]


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="benchmarks/out")
    parser.add_argument("--formats", default="int4_g128_asym,int8_row")
    parser.add_argument("--rows", default="1,16,128")
    parser.add_argument("--candidates-only", action="store_true")
    parser.add_argument("--kmajor", action="store_true", help="int4 weights packed K-major (`pack_kmajor`)")
    args = parser.parse_args(argv)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    torch.manual_seed(0)
    for fmt in args.formats.split(","):
        for n, k in SHAPES:
            copies = max(2, common.L2_BYTES // (n * k // (2 if "int4" in fmt else 1)) + 1)
            w, weights = _weights(fmt, n, k, copies, args.kmajor and "int4" in fmt)
            w_bf16 = [w.to(torch.bfloat16).clone() for _ in range(max(2, common.L2_BYTES // (n * k * 2) + 1))]
            meta = weight_only.WeightMeta.of(get_format(fmt), weights[0][0])
            for m in (int(r) for r in args.rows.split(",")):
                buckets = weight_only.M_BUCKETS
                bucket_m = next(b for first, last, b in buckets if m >= first and (last is None or m <= last))
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                t_bf16 = bench_rotating([lambda wb=wb: F.linear(x, wb) for wb in w_bf16])
                configs = weight_only._candidates(bucket_m, meta)
                tuner = set(configs)
                if not args.candidates_only:
                    configs += [c for c in exploratory(m, meta) if weight_only.config_is_valid(c, meta)]
                configs = list(dict.fromkeys(configs))
                expected = _reference(x, fmt, weights[0])
                timed = []
                out = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
                for config in configs:
                    try:
                        fns = [
                            lambda d=d, s=s, z=z, c=config: weight_only.launch(x, d, s, z, None, out, meta, c)
                            for d, s, z in weights
                        ]
                        fns[0]()
                        torch.cuda.synchronize()
                        quality = sqnr(expected, out.float())
                        t = bench_rotating(fns)
                    except Exception as error:  # noqa: BLE001
                        print(f"  {fmt} {n}x{k} m={m} {config}: failed {str(error)[:120]}")
                        continue
                    timed.append((t, config, quality))
                timed.sort(key=lambda r: r[0])
                print(f"{fmt} N={n} K={k} M={m}: bf16 {t_bf16 * 1e3:.1f} us, {len(timed)} configs")
                for t, config, quality in timed[:6]:
                    mark = "*" if config in tuner else " "
                    print(f"  {mark} {t_bf16 / t:5.2f}x {t * 1e3:7.1f} us sqnr {quality:5.1f} {config.as_tuple()}")
                best_tuner = min((r for r in timed if r[1] in tuner), key=lambda r: r[0], default=None)
                if best_tuner:
                    print(f"    best tuner candidate {t_bf16 / best_tuner[0]:.2f}x {best_tuner[1].as_tuple()}")
                results.append(
                    dict(
                        format=fmt,
                        kmajor=meta.kmajor,
                        n=n,
                        k=k,
                        m=m,
                        bf16_us=t_bf16 * 1e3,
                        configs=[dict(config=c.as_tuple(), us=t * 1e3, sqnr=q, tuner=c in tuner) for t, c, q in timed],
                    )
                )
            del weights, w_bf16
            torch.cuda.empty_cache()
    (out_dir / f"sweep_weight_only{'_kmajor' if args.kmajor else ''}.json").write_text(json.dumps(results, indent=1))
    write_compiled_facts(weight_only.weight_only_kernel, out_dir / "sweep_compiled.txt")
    print("summary (best ratio to bf16 per case; tuner candidates / all):")
    for r in results:
        best = min(r["configs"], key=lambda c: c["us"])
        best_t = min((c for c in r["configs"] if c["tuner"]), key=lambda c: c["us"], default=best)
        print(f"  {r['format']:16s} {r['n']:5d}x{r['k']:5d} M={r['m']:4d}  {r['bf16_us'] / best_t['us']:5.2f}x / {r['bf16_us'] / best['us']:5.2f}x  {tuple(best['config'])}")


def _reference(x, fmt, weight):
    data, scale, zero = weight
    empty = torch.empty(0, device=x.device)
    return ops._weight_only_mm_reference(x, data, scale, zero, empty, None, fmt, torch.float32)


if __name__ == "__main__":
    start = time.time()
    main()
    print(f"sweep took {time.time() - start:.0f} s")
