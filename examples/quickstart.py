"""Quickstart: compile a small Llama-style decoder with a low-bit recipe and compare it with eager.

    python examples/quickstart.py                 # w8a8 on CPU (or the GPU if there is one)
    python examples/quickstart.py --recipe w4a16 --layers 4

Prints the per-site report (what was quantized to what, and why), the SQNR of the logits against
the unquantized eager model, and the time per call of both.
"""

from __future__ import annotations

import argparse
import time

import torch

import lowbit_compile
from lowbit_compile.models import LlamaConfig, TinyLlama
from lowbit_compile.report import sqnr


def time_per_call(fn, *args, repeats: int) -> float:
    fn(*args)  # warm up
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn(*args)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="w8a8", choices=lowbit_compile.RECIPES)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    config = LlamaConfig(
        hidden_size=args.hidden,
        intermediate_size=2 * args.hidden,
        num_layers=args.layers,
        num_heads=max(1, args.hidden // 32),
        num_kv_heads=max(1, args.hidden // 128),
    )
    model = TinyLlama(config).eval().to(args.device, dtype)
    tokens = torch.randint(0, config.vocab_size, (args.batch, args.length), device=args.device)

    print(lowbit_compile.explain(model, tokens, policy=args.recipe))
    compiled = torch.compile(model, backend="lowbit", options={"policy": args.recipe})
    with torch.no_grad():
        reference = model(tokens)
        start = time.perf_counter()
        logits = compiled(tokens)
        compile_seconds = time.perf_counter() - start
        quality = sqnr(reference, logits)
        eager_time = time_per_call(model, tokens, repeats=args.repeats)
        compiled_time = time_per_call(compiled, tokens, repeats=args.repeats)
    print(f"\nrecipe {args.recipe} on {args.device} ({dtype}), tokens {tuple(tokens.shape)}")
    print(f"logits SQNR vs eager: {quality:.1f} dB")
    print(f"first call (compile): {compile_seconds:.1f} s")
    print(f"time per call: eager {eager_time * 1e3:.2f} ms, lowbit {compiled_time * 1e3:.2f} ms")
    return {"sqnr_db": quality, "eager_s": eager_time, "compiled_s": compiled_time}


if __name__ == "__main__":
    main()
