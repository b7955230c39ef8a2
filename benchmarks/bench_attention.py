"""Quantized attention against bf16 SDPA (flash) on a CUDA GPU (issue 7).

    PYTHONPATH=. python benchmarks/bench_attention.py [--out DIR] [--quick]

Times bf16 `F.scaled_dot_product_attention` (the flash backend where it takes the case) and our
kernel (`lowbit_compile.kernels.attention`, autotuned, q/k/v given in bf16 and quantized inside the
kernel) for each attention format, decode as the op dispatches it (`DECODE_SDPA`: bf16 SDPA; the
quantized decode tile with --variants), by CUDA-graph replay (`triton.testing.do_bench_cudagraph`: host
overhead excluded). Every operand here is larger than L2 (>= 32 MiB), so nothing is rotated.
Prints a table of ms, TFLOP/s (prefill) or KV GB/s (decode) and the ratio over bf16 (and bf16 on
cuDNN's attention as a ratio over flash: Inductor picks cuDNN for compiled models here), plus the
output SQNR against float64 on one batch element where it fits; writes JSON to --out or $OUT.

Issue 7's targets (H100): causal B=4 H=32 S=4096 D=128 >= 1.4x over bf16 SDPA; non-causal S=8192
>= 1.5x; decode (L=1, KV 8192, batch 16, GQA 32/8) not slower than bf16 SDPA; SQNR >= 25 dB.
bf16 SDPA measured 525-570 TFLOP/s causal at B=4 H=32 S=4096 D=128 on this H100 (issue 7).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

FORMATS = ("attn_fp8_t128", "attn_int8_t128")
# (kind, batch, q heads, kv heads, query length, kv length, head dim, causal)
PREFILL = [
    ("prefill", 4, 32, 32, s, s, 128, causal) for s in (1024, 4096, 16384) for causal in (True, False)
] + [("prefill", 4, 32, 32, 8192, 8192, 128, False), ("prefill", 4, 32, 32, 4096, 4096, 64, True)]
DECODE = [("decode", 16, 32, 8, 1, s, 128, False) for s in (4096, 8192, 32768)]
QUICK = [PREFILL[2], PREFILL[6], DECODE[1]]  # causal 4096, non-causal 8192, decode 8192


def _operands(batch, q_heads, kv_heads, q_len, kv_len, dim):
    """(B, H, L, D) views of (B, L, H, D) memory, as a model's projections give them."""
    q = torch.randn(batch, q_len, q_heads, dim, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    k = torch.randn(batch, kv_len, kv_heads, dim, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    v = torch.randn(batch, kv_len, kv_heads, dim, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    return q, k, v


def _sdpa(q, k, v, causal, gqa):
    """bf16 SDPA, flash backend if it accepts the case (else PyTorch's choice); returns (fn, backend)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    for backends, name in (([SDPBackend.FLASH_ATTENTION], "flash"), (None, "default")):
        def call(backends=backends):
            if backends is None:
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)
            with sdpa_kernel(backends):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)

        try:
            call()
            return call, name
        except RuntimeError:
            continue
    raise RuntimeError("no SDPA backend runs this case")


def _cudnn_ms(q, k, v, causal, gqa) -> float | None:
    """bf16 SDPA on cuDNN's attention (what Inductor picked for a compiled Llama on this image), or
    None where cuDNN does not take the case."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def call():
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)

    try:
        return _time_ms(call)
    except RuntimeError:
        return None


def _time_ms(fn) -> float:
    from triton.testing import do_bench_cudagraph

    fn()  # compile and autotune outside the graph capture
    torch.cuda.synchronize()
    return do_bench_cudagraph(fn, rep=50)


def _sqnr(q, k, v, causal, gqa, fmt, out) -> float | None:
    """Output SQNR on batch element 0 against float64 SDPA, where the scores fit in memory."""
    from lowbit_compile.report import sqnr

    if q.shape[1] * q.shape[2] * k.shape[2] > 2**31:
        return None
    exact = F.scaled_dot_product_attention(
        q[:1].double(), k[:1].double(), v[:1].double(), is_causal=causal, enable_gqa=gqa
    )
    return round(sqnr(exact.float(), out[:1].float()), 2)


def _best_config(kernel, kind: str, fmt: str):
    """The autotuner's pick for the last launch of this kind and format."""
    from lowbit_compile.formats import get_attention_format

    if kind == "decode":  # one query per head: the FMA kernel when switched on (DECODE_FMA)
        if kernel.DECODE_FMA:
            from lowbit_compile.kernels import attention_decode

            return getattr(attention_decode.decode_attention_kernel_tuned, "best_config", None)
        return getattr(kernel.attention_kernel_decode, "best_config", None)
    q_rows = get_attention_format(fmt).formats[0].block_rows
    return getattr(kernel.attention_kernel_prefill(q_rows), "best_config", None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(os.environ["OUT"]) if os.environ.get("OUT") else None)
    parser.add_argument("--quick", action="store_true", help="the three target cases only")
    parser.add_argument(
        "--variants", action="store_true",
        help="also time the quantized decode tile at 2 or 4 programs per SM",
    )  # fmt: skip
    args = parser.parse_args()

    from lowbit_compile.kernels import attention as kernel

    # name -> (PREQUANTIZE_PREFILL, DECODE_PROGRAMS_PER_SM); the first is the default launch
    variants = {"": (kernel.PREQUANTIZE_PREFILL, kernel.DECODE_PROGRAMS_PER_SM)}
    if args.variants:
        variants.update({"/dec2": (True, 2), "/dec4": (True, 4)})
    columns = [(fmt, name) for fmt in FORMATS for name in variants]

    torch.manual_seed(0)
    start = time.time()
    rows = []
    header = f"{'case':<44} {'bf16 ms':>8} {'cudnn x':>8} " + " ".join(f"{f + n + ' ms':>21} {'x':>5}" for f, n in columns)
    print(f"# {torch.cuda.get_device_name()} torch {torch.__version__}")
    print(header)
    for case in QUICK if args.quick else PREFILL + DECODE:
        kind, batch, q_heads, kv_heads, q_len, kv_len, dim, causal = case
        q, k, v = _operands(batch, q_heads, kv_heads, q_len, kv_len, dim)
        gqa = q_heads != kv_heads
        sdpa, backend = _sdpa(q, k, v, causal, gqa)
        flops = 4 * batch * q_heads * q_len * kv_len * dim * (0.5 if causal and q_len == kv_len else 1.0)
        kv_bytes = 2 * batch * kv_heads * kv_len * dim * 2  # bf16 K and V, read once
        bf16_ms = _time_ms(sdpa)
        cudnn_ms = _cudnn_ms(q, k, v, causal, gqa)
        row = {
            "kind": kind, "batch": batch, "q_heads": q_heads, "kv_heads": kv_heads, "q_len": q_len,
            "kv_len": kv_len, "head_dim": dim, "causal": causal, "sdpa_backend": backend,
            "bf16_ms": bf16_ms, "cudnn_ms": cudnn_ms, "bf16_tflops": flops / bf16_ms / 1e9, "bf16_kv_gbps": kv_bytes / bf16_ms / 1e6,
            "formats": {},
        }  # fmt: skip
        cells = []
        for fmt, variant in columns:
            if variant.startswith("/dec") != (kind == "decode") and variant:  # the knob does not apply
                cells.append(f"{'-':>21} {'':>5}")
                continue
            kernel.PREQUANTIZE_PREFILL, kernel.DECODE_PROGRAMS_PER_SM = variants[variant]

            def ours(fmt=fmt, bf16_decode=not variant and kernel.DECODE_SDPA):
                return kernel.run(q, k, v, None, causal, None, gqa, fmt, torch.bfloat16, bf16_decode=bf16_decode)

            ms = _time_ms(ours)
            row["formats"][fmt + variant] = {
                "ms": ms,
                "speedup": bf16_ms / ms,
                "tflops": flops / ms / 1e9,
                "kv_gbps": kv_bytes / ms / 1e6,
                "sqnr_db": _sqnr(q, k, v, causal, gqa, fmt, ours()),
                "config": str(_best_config(kernel, kind, fmt)),
            }
            cells.append(f"{ms:>21.3f} {bf16_ms / ms:>5.2f}")
        kernel.PREQUANTIZE_PREFILL, kernel.DECODE_PROGRAMS_PER_SM = variants[""]
        rows.append(row)
        name = f"{kind} B{batch} H{q_heads}/{kv_heads} L{q_len} S{kv_len} D{dim}{' causal' if causal else ''}"
        cudnn = f"{bf16_ms / cudnn_ms:>8.2f}" if cudnn_ms else f"{'-':>8}"
        print(f"{name:<44} {bf16_ms:>8.3f} {cudnn} " + " ".join(cells), flush=True)
    print()
    for row in rows:
        rate = "tflops" if row["kind"] == "prefill" else "kv_gbps"
        unit = "TFLOP/s" if rate == "tflops" else "GB/s of bf16 KV"
        parts = [f"bf16 ({row['sdpa_backend']}) {row['bf16_' + rate]:.0f}"]
        parts += [f"{f} {r[rate]:.0f} (SQNR {r['sqnr_db']} dB; {r['config']})" for f, r in row["formats"].items()]
        print(f"{row['kind']} L{row['q_len']} S{row['kv_len']} D{row['head_dim']}{' causal' if row['causal'] else ''}: "
              f"{unit}: " + ", ".join(parts))  # fmt: skip
    print(f"# {time.time() - start:.0f} s")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / "bench_attention.json"
        meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
        path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
