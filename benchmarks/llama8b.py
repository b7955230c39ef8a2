"""A Llama-3-8B-shaped decoder compiled whole: bf16 Inductor against each lowbit recipe (one CUDA GPU).

    PYTHONPATH=. python benchmarks/llama8b.py --out benchmarks/out                 # H100: < 10 minutes
    PYTHONPATH=. python benchmarks/llama8b.py --policies w8a16,w4a16,auto --release
    PYTHONPATH=. python benchmarks/llama8b.py --tiny                               # CPU smoke test, ~1 minute

The model (`lowbit_compile.models.StaticCacheLlama`: 32 layers, hidden 4096, 32 query / 8 KV heads of
128, SiLU-gated MLP 14336, vocab 128256, RMSNorm, RoPE) has random bf16 weights made on the GPU and a
static KV cache held as module buffers, written with `index_copy_` at positions passed as a tensor,
so decode steps reuse one graph. It is built once and compiled whole per variant, in one process:

- bf16: plain Inductor, `mode="reduce-overhead"` (CUDA graphs);
- each policy of `--policies` that `lowbit_compile.RECIPES` has (others are skipped with a note):
  `backend="lowbit"`, `options={"policy": name, "inductor_config": {"triton.cudagraphs": True}}`, plus
  `"release_weights": True` with `--release` when the backend accepts that option.

Per variant: compile time (wall time of the first prefill + first decode call, which compile two
graphs), decode latency and throughput at batch 1 and at batch 16 (timed over `--steps` steps after
warm-up, synchronized; the batch-16 phase reallocates the cache, so it compiles a third graph, timed
apart), 2048-token prefill at batch 1, peak GPU memory (`max_memory_allocated`, reset per variant: it
includes the bf16 weights, about 16 GB, unless they were released, and the KV cache), the number of
graphs Dynamo compiled, whether Inductor skipped CUDA graphs (and why), and the SQNR of the first
decode step's logits against eager bf16. Each variant runs on a fresh Dynamo and frees what it
compiled before the next. Prints a markdown table last (ratios against bf16) and writes JSON, the
table and, if matplotlib is importable, a PNG to `--out`.

The attention reads the whole static cache every step (a masked SDPA over `max_len` positions, the
same for every variant): at batch 16 that is about 4.5 GB a step on the 8B shapes.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch._dynamo.utils import counters

import lowbit_compile
import lowbit_compile.backend
from lowbit_compile.models import LlamaConfig, StaticCacheLlama
from lowbit_compile.report import sqnr

LLAMA3_8B = LlamaConfig(
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_layers=32,
    num_heads=32,
    num_kv_heads=8,
    rope_theta=500000.0,
    max_positions=8192,
)
TINY = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_layers=2, num_heads=8, num_kv_heads=2)


@dataclass(frozen=True)
class Plan:
    config: LlamaConfig
    device: str
    dtype: torch.dtype
    prefill: int  # prompt length at batch 1
    batch: int  # the large decode batch
    steps: int  # timed decode steps
    warmup: int  # decode steps before timing (CUDA-graph recording)
    prefill_reps: int  # timed prefills
    cudagraphs: bool

    @property
    def max_len(self) -> int:
        needed = self.prefill + 1 + self.warmup + self.steps  # prompt, first decode, then the timed steps
        return math.ceil(needed / 64) * 64


class _SkipReasons(logging.Handler):
    """Collects Inductor's "skipping cudagraphs due to ..." warnings."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "skipping cudagraphs" in message:
            self.messages.append(message.splitlines()[0])


def build_model(plan: Plan, seed: int = 0) -> StaticCacheLlama:
    """Random weights made on the device in the benchmark dtype (no fp32 copy, no CPU init)."""
    with torch.device("meta"):
        model = StaticCacheLlama(plan.config)
    model = model.to(plan.dtype).to_empty(device=plan.device).eval().requires_grad_(False)
    model.init_weights(torch.Generator(device=plan.device).manual_seed(seed))
    return model


def _sync(plan: Plan) -> None:
    if plan.device == "cuda":
        torch.cuda.synchronize()


def _gb(nbytes: float) -> float:
    return round(nbytes / 2**30, 2)


def _free(plan: Plan) -> None:
    torch._dynamo.reset()  # also frees the CUDA-graph trees and their memory pool
    gc.collect()
    if plan.device == "cuda":
        torch.cuda.empty_cache()


def _compile(model: StaticCacheLlama, plan: Plan, name: str, release: bool) -> Any:
    if name == "bf16":
        return torch.compile(model, mode="reduce-overhead") if plan.cudagraphs else torch.compile(model)
    options: dict[str, Any] = {"policy": name}
    if plan.cudagraphs:
        options["inductor_config"] = {"triton.cudagraphs": True}
    if release:
        options["release_weights"] = True
    return torch.compile(model, backend="lowbit", options=options)


def run_variant(
    model: StaticCacheLlama, plan: Plan, name: str, release: bool, inputs: dict[str, Any], reference: torch.Tensor
) -> dict[str, Any]:
    row: dict[str, Any] = {"variant": name, "release_weights": release}
    cuda = plan.device == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        row["resident_before_gb"] = _gb(torch.cuda.memory_allocated())
    model.allocate_cache(1, plan.max_len)
    compiled = _compile(model, plan, name, release)

    def step(tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        if plan.cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        return compiled(tokens, positions)

    prompt, prompt_positions = inputs["prompt"], inputs["prompt_positions"]
    one, positions = inputs["one"], inputs["positions"]
    with torch.no_grad():
        # Compile: the first prefill and the first decode step (two graphs: Dynamo specialises L=1).
        start = time.perf_counter()
        step(prompt, prompt_positions)
        logits = step(one, positions[0]).float()
        _sync(plan)
        row["compile_s"] = round(time.perf_counter() - start, 2)
        row["logits_sqnr_db"] = round(sqnr(reference, logits), 2)
        if cuda:
            row["resident_after_compile_gb"] = _gb(torch.cuda.memory_allocated())

        # Prefill, batch 1: the second call records the CUDA graph, then timed replays.
        for _ in range(2):
            step(prompt, prompt_positions)
        _sync(plan)
        start = time.perf_counter()
        for _ in range(plan.prefill_reps):
            step(prompt, prompt_positions)
        _sync(plan)
        row["prefill_ms"] = round((time.perf_counter() - start) / plan.prefill_reps * 1e3, 2)

        # Decode, batch 1 (positions after the prompt; the first was used by the compile call).
        def decode(tokens: torch.Tensor) -> float:
            for position in positions[1 : 1 + plan.warmup]:
                step(tokens, position)
            _sync(plan)
            start = time.perf_counter()
            for position in positions[1 + plan.warmup : 1 + plan.warmup + plan.steps]:
                step(tokens, position)
            _sync(plan)
            return (time.perf_counter() - start) / plan.steps

        seconds = decode(one)
        row["decode_b1_ms"] = round(seconds * 1e3, 3)
        row["decode_b1_tok_s"] = round(1 / seconds, 1)

        # Decode, batch `plan.batch`: a cache for that many rows, so a new graph for this batch.
        model.allocate_cache(plan.batch, plan.max_len)
        many = inputs["many"]
        start = time.perf_counter()
        step(many, positions[0])
        _sync(plan)
        row[f"compile_b{plan.batch}_s"] = round(time.perf_counter() - start, 2)
        seconds = decode(many)
        row[f"decode_b{plan.batch}_ms"] = round(seconds * 1e3, 3)
        row[f"decode_b{plan.batch}_tok_s"] = round(plan.batch / seconds, 1)

    if cuda:
        row["resident_end_gb"] = _gb(torch.cuda.memory_allocated())
    row["graphs"] = counters["stats"]["unique_graphs"]
    row["cudagraph_skips"] = counters["inductor"]["cudagraph_skips"]
    row["cudagraph_recorded_non_static_inputs"] = counters["inductor"]["cudagraph_recorded_non_static_inputs"]
    if cuda:
        row["peak_gb"] = _gb(torch.cuda.max_memory_allocated())
    return row


def _table(rows: list[dict[str, Any]], plan: Plan) -> str:
    base = next((r for r in rows if r["variant"] == "bf16" and "error" not in r), None)
    b = plan.batch

    def ratio(row: dict[str, Any], key: str, higher_is_better: bool) -> str:
        if base is None or key not in row or key not in base or not row[key] or not base[key]:
            return "-"
        value = row[key] / base[key] if higher_is_better else base[key] / row[key]
        return f"{value:.2f}x"

    def cell(row: dict[str, Any], key: str) -> str:
        value = row.get(key)
        return "-" if value is None else f"{value}"

    header = (
        f"| variant | compile s | decode b1 ms/tok | b1 tok/s | b1 vs bf16 | b{b} tok/s | b{b} vs bf16 "
        f"| prefill {plan.prefill} ms | prefill vs bf16 | peak GB | GB after compile | graphs | CUDA graphs "
        "| logits SQNR dB |"
    )
    lines = [header, "|" + "---|" * 14]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['variant']} | failed: {row['error'][:160]} |" + " |" * 12)
            continue
        if not plan.cudagraphs:
            graphs = "off"
        elif row["cudagraph_skips"]:
            graphs = f"skipped ({row['cudagraph_skips']})"
        else:
            graphs = "yes"
        lines.append(
            f"| {row['variant']}{' (released)' if row['release_weights'] else ''} | {cell(row, 'compile_s')} "
            f"| {cell(row, 'decode_b1_ms')} | {cell(row, 'decode_b1_tok_s')} | {ratio(row, 'decode_b1_tok_s', True)} "
            f"| {cell(row, f'decode_b{b}_tok_s')} | {ratio(row, f'decode_b{b}_tok_s', True)} "
            f"| {cell(row, 'prefill_ms')} | {ratio(row, 'prefill_ms', False)} | {cell(row, 'peak_gb')} "
            f"| {cell(row, 'resident_after_compile_gb')} "
            f"| {cell(row, 'graphs')} | {graphs} | {cell(row, 'logits_sqnr_db')} |"
        )
    return "\n".join(lines)


def _plot(rows: list[dict[str, Any]], plan: Plan, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = [r for r in rows if "error" not in r]
    panels = [
        ("decode_b1_tok_s", "decode tokens/s, batch 1"),
        (f"decode_b{plan.batch}_tok_s", f"decode tokens/s, batch {plan.batch}"),
        ("prefill_ms", f"prefill {plan.prefill} tokens, ms"),
        ("peak_gb", "peak memory, GB"),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.5))
    for ax, (key, title) in zip(axes, panels):
        names = [r["variant"] for r in rows]
        ax.bar(names, [r.get(key) or 0 for r in rows], color=["gray"] + ["C0"] * (len(rows) - 1))
        ax.set_title(title, fontsize=10)
        ax.tick_params(axis="x", rotation=30)
    fig.suptitle(f"Llama-3-8B shape, {_device_name(plan)}", fontsize=11)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    return True


def _device_name(plan: Plan) -> str:
    return torch.cuda.get_device_name() if plan.device == "cuda" else "CPU"


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="benchmarks/out")
    parser.add_argument("--policies", default="w8a16,w4a16", help="comma-separated lowbit recipe names")
    parser.add_argument("--release", action="store_true", help="pass release_weights=True if the backend has it")
    parser.add_argument("--tiny", action="store_true", help="2-layer small config on CPU (smoke test)")
    parser.add_argument("--steps", type=int, default=None, help="timed decode steps (default 32; tiny: 4)")
    parser.add_argument("--warm-cache", action="store_true", help="let Inductor's caches serve compiles (default cold)")
    args = parser.parse_args(argv)

    if args.tiny:
        plan = Plan(TINY, "cpu", torch.bfloat16, prefill=64, batch=16, steps=args.steps or 4, warmup=1,
                    prefill_reps=2, cudagraphs=False)  # fmt: skip
    else:
        if not torch.cuda.is_available():
            parser.error("needs a CUDA GPU (or --tiny for the CPU smoke test)")
        plan = Plan(LLAMA3_8B, "cuda", torch.bfloat16, prefill=2048, batch=16, steps=args.steps or 32, warmup=3,
                    prefill_reps=3, cudagraphs=True)  # fmt: skip
    names = ["bf16"]
    for name in (n.strip() for n in args.policies.split(",") if n.strip()):
        if name in lowbit_compile.RECIPES:
            names.append(name)
        else:
            print(f"note: policy {name!r} is not in lowbit_compile.RECIPES {sorted(lowbit_compile.RECIPES)}: skipped")
    release = args.release and "release_weights" in lowbit_compile.backend.VALID_OPTIONS
    if args.release and not release:
        print("note: this lowbit backend has no release_weights option: --release ignored")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = "llama8b_tiny" if args.tiny else "llama8b"

    # Compile times are cold compiles (no FX-graph / autotune cache hits) unless --warm-cache.
    with torch._inductor.config.patch(force_disable_caches=not args.warm_cache):
        rows, meta = _run(plan, names, release)
    (out_dir / f"{stem}.json").write_text(json.dumps({"meta": meta, "variants": rows}, indent=2))
    table = _table(rows, plan)
    title = (
        f"Llama-3-8B-shaped decoder ({plan.config.num_layers} layers), {_device_name(plan)}, "
        f"torch {torch.__version__}; ratios are speedups over bf16 Inductor; "
        "peak GB (max_memory_allocated) includes the bf16 weights (16 GB, unless released: then until the "
        "release) and the KV cache; GB after compile: memory_allocated after the first prefill + decode"
    )
    (out_dir / f"{stem}.md").write_text(title + "\n\n" + table + "\n")
    plotted = _plot(rows, plan, out_dir / f"{stem}.png")
    print(f"wrote {out_dir / stem}.json, .md{', .png' if plotted else ' (no matplotlib: no PNG)'}")
    print(title)
    print(table)
    return rows


def _run(plan: Plan, names: list[str], release: bool) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    start = time.perf_counter()
    model = build_model(plan)
    generator = torch.Generator().manual_seed(1)
    vocab = plan.config.vocab_size
    inputs = {
        "prompt": torch.randint(0, vocab, (1, plan.prefill), generator=generator).to(plan.device),
        "prompt_positions": torch.arange(plan.prefill, device=plan.device),
        "one": torch.randint(0, vocab, (1, 1), generator=generator).to(plan.device),
        "many": torch.randint(0, vocab, (plan.batch, 1), generator=generator).to(plan.device),
        # one small device tensor per decode position, made before any timing
        "positions": [torch.tensor([p], device=plan.device) for p in range(plan.prefill, plan.max_len)],
    }
    with torch.no_grad():  # eager bf16 reference: the first decode step's logits after the prompt
        model.allocate_cache(1, plan.max_len)
        model(inputs["prompt"], inputs["prompt_positions"])
        reference = model(inputs["one"], inputs["positions"][0]).float()
    print(f"model built and eager reference in {time.perf_counter() - start:.1f} s; cache {plan.max_len} positions")

    skip_log = _SkipReasons()
    skip_logger = logging.getLogger("torch._inductor.cudagraph_utils.__cudagraphs")
    skip_logger.addHandler(skip_log)
    rows: list[dict[str, Any]] = []
    try:
        for name in names:
            _free(plan)
            counters.clear()
            skip_log.messages.clear()
            variant_release = release and name != "bf16"
            started = time.perf_counter()
            try:
                row = run_variant(model, plan, name, variant_release, inputs, reference)
            except Exception as failure:  # noqa: BLE001 - a benchmark row records the failure and goes on
                row = {"variant": name, "release_weights": variant_release}
                row["error"] = f"{type(failure).__name__}: {failure}"
            row["cudagraph_skip_reasons"] = sorted(set(skip_log.messages))
            row["wall_s"] = round(time.perf_counter() - started, 1)
            rows.append(row)
            print(json.dumps(row), flush=True)
            model.allocate_cache(0, 0)
            _free(plan)
            if variant_release:  # the next variant needs the bf16 weights back: same seed, same weights
                del model
                _free(plan)
                model = build_model(plan)
    finally:
        skip_logger.removeHandler(skip_log)

    meta = {
        "device": _device_name(plan),
        "torch": torch.__version__,
        "config": asdict(plan.config),
        "prefill": plan.prefill,
        "batch": plan.batch,
        "steps": plan.steps,
        "max_len": plan.max_len,
        "dtype": str(plan.dtype),
        "total_s": round(time.perf_counter() - start, 1),
        "peak_gb_note": "max_memory_allocated per variant: bf16 weights (unless released) + KV cache + compiled state",
    }
    return rows, meta


if __name__ == "__main__":
    main()
