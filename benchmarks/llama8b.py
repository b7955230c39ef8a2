"""A Llama-3-8B-shaped decoder compiled whole: bf16 Inductor against each lowbit recipe (one CUDA GPU).

    PYTHONPATH=. python benchmarks/llama8b.py --out benchmarks/out                 # H100: < 10 minutes
    PYTHONPATH=. python benchmarks/llama8b.py --policies w8a16,w4a16,auto --release
    PYTHONPATH=. python benchmarks/llama8b.py --tiny                               # CPU smoke test, ~1 minute
    PYTHONPATH=. python benchmarks/llama8b.py --prefill 8192 --prefill-only --layers 4 \
        --policies bf16+sdpa,bf16+attn_fp8_t128,fp8,fp8+attn_fp8_t128                # attention pairs (issue 7)

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
includes the bf16 weights, about 16 GB, unless they were released, and the KV cache), the batch-1
serving peak (`max_memory_allocated` over the batch-1 prefill and decode once compiled: weights, cache,
CUDA-graph pools; released bf16 weights and compile-time temporaries are gone by then), the number of
graphs Dynamo compiled, whether Inductor skipped CUDA graphs (and why), and the SQNR of the first
decode step's logits against eager bf16. Each variant runs on a fresh Dynamo and frees what it
compiled before the next. Prints a markdown table last (ratios against bf16) and writes JSON, the
table and, if matplotlib is importable, a PNG to `--out`.

The attention reads the whole static cache every step (a masked SDPA over `max_len` positions, the
same for every variant): at batch 16 that is about 4.5 GB a step on the 8B shapes. Decode steps run
SDPA with `enable_gqa` and an additive mask, prompts fold the query heads of a KV head into the
query length (`CachedAttention`); before 2026-11-25 (fourteenth session) decode folded them too,
which cost ~45 us more per layer at batch 1 in every variant.

Variants that differ only in attention: `LINEAR+ATTENTION`, where LINEAR is `bf16` (no linear
quantized) or a recipe, and ATTENTION an attention format (`lowbit_compile.formats`:
attn_fp8_t128, attn_int8_t128, ...) or `sdpa` (attention left unquantized). The policy is LINEAR's
(nothing for bf16) with its attention rule replaced: `fp8+attn_fp8_t128` is the `fp8-attention`
recipe (fp8 linears, fp8 block attention), `fp8+sdpa` is `fp8`, `bf16+sdpa` is the lowbit backend
quantizing nothing (the control for `bf16+attn_fp8_t128`: same backend, only attention differs).
The table's "vs pair" column is each `A+F` row's prefill speedup over `A+sdpa` (or over `A` when
that is not measured). Each lowbit row records its report's attention and linear sites (op and kernel
column: `sdpa -> block_attention [triton:attn_fp8]` or `sdpa -> unquantized`) and what Inductor's
output code holds for attention (the block kernel's Triton source, the reference op, or an aten SDPA
kernel), so a row says whether its attention ran the quantized kernel.

`--prefill N` sets the prompt length (default 2048); `--layers N` keeps the first N decoder layers
(every variant the same). `--prefill-only` times prefill alone, at batch 1, without the decode
phases: `--rounds` rounds of `--prefill-reps` calls after two warm-up calls (the second records the
CUDA graph), median round reported (all rounds in the JSON). Its model (`--prefill-model`):
- `causal` (default): the same weights and layers without a KV cache, attention as a prefill runs it,
  `F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)` (flash for bf16; the
  quantized kernel skips the blocks past the diagonal), logits of the last position only;
- `cache`: `StaticCacheLlama`'s own prefill, the prompt written into a `max_len` = prompt-length cache
  and a boolean-masked SDPA over it with the GQA group folded into the query length (no causal block
  skipping: every variant computes the whole masked square).
Above 2048 tokens the compile-time site SQNR is off (`compute_sqnr=False`: it runs the fp32
reference attention, whose scores alone take 8 GB at 8192 tokens); the logits SQNR against eager
bf16 is measured as always.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import statistics
import time
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch
from torch._dynamo.utils import counters

import lowbit_compile
import lowbit_compile.backend
from lowbit_compile.backend import BackendOptions, compile_graph
from lowbit_compile.formats import BUILTIN_ATTENTION_FORMATS, is_attention_format
from lowbit_compile.models import LlamaConfig, StaticCacheLlama, TinyLlama, rotary_tables
from lowbit_compile.policy import OpKind, Policy, QuantSpec, Rule, recipe
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
    prefill_reps: int  # timed prefills (per round with prefill_only)
    cudagraphs: bool
    prefill_only: bool = False  # time prefill alone (no decode phases)
    prefill_model: str = "cache"  # prefill_only: "causal" (no cache, is_causal SDPA) or "cache" (StaticCacheLlama)
    rounds: int = 1  # prefill_only: timed rounds of prefill_reps calls; the median round is reported

    @property
    def max_len(self) -> int:
        if self.prefill_only:
            return math.ceil(self.prefill / 64) * 64
        needed = self.prefill + 1 + self.warmup + self.steps  # prompt, first decode, then the timed steps
        return math.ceil(needed / 64) * 64

    @property
    def site_sqnr(self) -> bool:
        """The compile-time site SQNR runs the fp32 reference attention: 8 GB of scores at 8192 tokens."""
        return self.prefill <= 2048


class PrefillLlama(TinyLlama):
    """`StaticCacheLlama`'s weights and layers without a KV cache: attention as a prefill runs it,
    `F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)`. tokens (B, L) and
    positions (L,) -> logits of the last position (B, 1, vocab), as `StaticCacheLlama`. Built from the
    same seed, its weights are `StaticCacheLlama`'s (the same modules in the same order)."""

    init_weights = StaticCacheLlama.init_weights

    def allocate_cache(self, batch: int, max_len: int) -> None:  # no cache
        pass

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        x = self.embed_tokens(tokens)
        cos, sin = rotary_tables(self.config, positions, x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.lm_head(self.norm(x[:, -1:]))


VARIANT_FORMS = (
    "bf16 (plain Inductor), a recipe of lowbit_compile.RECIPES, or LINEAR+ATTENTION with LINEAR bf16 or a "
    f"recipe and ATTENTION sdpa or an attention format ({', '.join(BUILTIN_ATTENTION_FORMATS)})"
)


def variant_policy(name: str) -> Policy | None:
    """The lowbit policy of a variant, None for plain Inductor (`bf16`); a ValueError for other names.

    `LINEAR+ATTENTION`: LINEAR's policy (nothing quantized for bf16) with attention sites decided by
    a first rule: left in SDPA (`sdpa`) or quantized to the attention format (the block kernel)."""
    if name == "bf16":
        return None
    if name in lowbit_compile.RECIPES:
        return recipe(name)
    linear, plus, attention = name.partition("+")
    valid_linear = linear == "bf16" or linear in lowbit_compile.RECIPES
    if not plus or not valid_linear or not (attention == "sdpa" or is_attention_format(attention)):
        raise ValueError(f"variant {name!r} is not {VARIANT_FORMS}")
    if linear == "bf16":
        rules, default = (Rule(spec=None, op=OpKind.MATMUL),), None
    else:
        base = recipe(linear)
        rules, default = tuple(r for r in base.rules if r.op is not OpKind.ATTENTION), base.default
    attention_spec = None if attention == "sdpa" else QuantSpec(activation=attention)
    return Policy(rules=(Rule(spec=attention_spec, op=OpKind.ATTENTION), *rules), default=default, name=name)


def pair_of(name: str) -> list[str]:
    """The variants `name` differs from only in attention, in order of preference: A+sdpa, then A."""
    linear, plus, attention = name.partition("+")
    return [f"{linear}+sdpa", linear] if plus and attention != "sdpa" else []


class _SkipReasons(logging.Handler):
    """Collects Inductor's "skipping cudagraphs due to ..." warnings."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "skipping cudagraphs" in message:
            self.messages.append(message.splitlines()[0])


def build_model(plan: Plan, seed: int = 0) -> StaticCacheLlama | PrefillLlama:
    """Random weights made on the device in the benchmark dtype (no fp32 copy, no CPU init)."""
    causal = plan.prefill_only and plan.prefill_model == "causal"
    with torch.device("meta"):
        model = PrefillLlama(plan.config) if causal else StaticCacheLlama(plan.config)
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


def _compile(model: torch.nn.Module, plan: Plan, name: str, release: bool, seen: dict[str, list[Any]]) -> Any:
    """bf16: plain Inductor. Otherwise the lowbit backend (`lowbit_backend` is `compile_graph` on the
    parsed options: called here directly, to keep each graph's report and output code in `seen`)."""
    policy = variant_policy(name)
    if policy is None:
        return torch.compile(model, mode="reduce-overhead") if plan.cudagraphs else torch.compile(model)
    options: dict[str, Any] = {"policy": policy}
    if plan.cudagraphs:
        options["inductor_config"] = {"triton.cudagraphs": True}
    if release:
        options["release_weights"] = True
    if not plan.site_sqnr:
        options["compute_sqnr"] = False
    parsed = BackendOptions.parse(options)

    def backend(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
        return compile_graph(
            gm, example_inputs, parsed, on_report=seen["reports"].append,
            on_stages=lambda texts: seen["output_code"].append(texts.get("output_code", "")),
        )  # fmt: skip

    return torch.compile(model, backend=backend)


OUTPUT_CODE_MARKERS = (  # what runs attention, as Inductor's output code names it (counts of each)
    "def attention_kernel(",  # the quantized kernel's Triton source (kernels/attention.py)
    "torch.ops.lowbit.block_attention.default(",  # the reference op (no kernel for these inputs)
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention",
)


def _sites(seen: dict[str, list[Any]]) -> dict[str, Any]:
    """What the lowbit reports and output code say ran each site: attention sites by op and kernel,
    linear sites by kernel (`unquantized` for skipped sites), attention markers in the output code."""
    sites = [site for report in seen["reports"] for site in report.sites]

    def ran(site: Any) -> str:
        return site.kernel if site.format else "unquantized"

    code = "\n".join(seen["output_code"])
    return {
        "attention_sites": dict(Counter(f"{s.source_op} -> {ran(s)}" for s in sites if s.op == OpKind.ATTENTION.value)),
        "linear_sites": dict(Counter(ran(s) for s in sites if s.op == OpKind.LINEAR.value)),
        "output_code": {marker: code.count(marker) for marker in OUTPUT_CODE_MARKERS if marker in code},
    }


def run_variant(
    model: StaticCacheLlama | PrefillLlama,
    plan: Plan,
    name: str,
    release: bool,
    inputs: dict[str, Any],
    reference: torch.Tensor,
) -> dict[str, Any]:
    row: dict[str, Any] = {"variant": name, "release_weights": release}
    cuda = plan.device == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        row["resident_before_gb"] = _gb(torch.cuda.memory_allocated())
    model.allocate_cache(1, plan.max_len)
    seen: dict[str, list[Any]] = {"reports": [], "output_code": []}
    compiled = _compile(model, plan, name, release, seen)
    try:
        if plan.prefill_only:
            _time_prefill_only(compiled, plan, row, inputs, reference)
        else:
            _time_all(compiled, model, plan, row, inputs, reference)
    finally:
        if variant_policy(name) is not None:
            row.update(_sites(seen))

    if cuda:
        row["resident_end_gb"] = _gb(torch.cuda.memory_allocated())
    row["graphs"] = counters["stats"]["unique_graphs"]
    row["cudagraph_skips"] = counters["inductor"]["cudagraph_skips"]
    row["cudagraph_recorded_non_static_inputs"] = counters["inductor"]["cudagraph_recorded_non_static_inputs"]
    if counters["lowbit"]:  # compile-time work: tuning seconds and runs, mutation-analysis cache
        row["lowbit_counters"] = dict(counters["lowbit"])
    if cuda:
        row["peak_gb"] = max(row.get("peak_gb", 0.0), _gb(torch.cuda.max_memory_allocated()))
    return row


def _step(compiled: Any, plan: Plan) -> Any:
    def step(tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        if plan.cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        return compiled(tokens, positions)

    return step


def _time_prefill_only(
    compiled: Any, plan: Plan, row: dict[str, Any], inputs: dict[str, Any], reference: torch.Tensor
) -> None:
    """Compile (the first call), two warm-up calls (the second records the CUDA graph), then
    `plan.rounds` rounds of `plan.prefill_reps` synchronized calls; the median round is prefill_ms."""
    step = _step(compiled, plan)
    prompt, prompt_positions = inputs["prompt"], inputs["prompt_positions"]
    with torch.no_grad():
        start = time.perf_counter()
        logits = step(prompt, prompt_positions).float()
        _sync(plan)
        row["compile_s"] = round(time.perf_counter() - start, 2)
        row["logits_sqnr_db"] = round(sqnr(reference, logits), 2)
        del logits
        if plan.device == "cuda":
            row["resident_after_compile_gb"] = _gb(torch.cuda.memory_allocated())
        for _ in range(2):
            step(prompt, prompt_positions)
        _sync(plan)
        rounds = []
        for _ in range(plan.rounds):
            start = time.perf_counter()
            for _ in range(plan.prefill_reps):
                step(prompt, prompt_positions)
            _sync(plan)
            rounds.append((time.perf_counter() - start) / plan.prefill_reps * 1e3)
    row["prefill_rounds_ms"] = [round(ms, 3) for ms in rounds]
    row["prefill_ms"] = round(statistics.median(rounds), 3)
    row["prefill_tok_s"] = round(plan.prefill / (row["prefill_ms"] / 1e3), 1)


def _time_all(
    compiled: Any,
    model: StaticCacheLlama,
    plan: Plan,
    row: dict[str, Any],
    inputs: dict[str, Any],
    reference: torch.Tensor,
) -> None:
    cuda = plan.device == "cuda"
    step = _step(compiled, plan)
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
            # Serving memory: what batch-1 prefill and decode need once compiled (the compile's
            # temporaries and, with release_weights, the bf16 weights are gone by then).
            row["peak_gb"] = _gb(torch.cuda.max_memory_allocated())  # so far; run_variant takes the max
            torch.cuda.reset_peak_memory_stats()

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

        if cuda:
            row["serving_peak_b1_gb"] = _gb(torch.cuda.max_memory_allocated())

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
        f"| prefill {plan.prefill} ms | prefill vs bf16 | peak GB | b1 serving peak GB | vs bf16 | GB after compile "
        "| graphs | CUDA graphs | logits SQNR dB |"
    )
    lines = [header, "|" + "---|" * 16]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['variant']} | failed: {row['error'][:160]} |" + " |" * 14)
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
            f"| {cell(row, 'serving_peak_b1_gb')} | {ratio(row, 'serving_peak_b1_gb', True)} "
            f"| {cell(row, 'resident_after_compile_gb')} "
            f"| {cell(row, 'graphs')} | {graphs} | {cell(row, 'logits_sqnr_db')} |"
        )
    return "\n".join(lines)


def _summary(sites: dict[str, int] | None, plain: str) -> str:
    """`block_attention [triton:attn_fp8] x4`; `plain` for a plain Inductor row."""
    if sites is None:
        return plain
    return ", ".join(f"{kind} x{count}" for kind, count in sites.items()) or "none"


def _prefill_table(rows: list[dict[str, Any]], plan: Plan) -> str:
    """--prefill-only: one row per variant, its prefill speedup over bf16 and over its pair."""
    by_name = {r["variant"]: r for r in rows if "error" not in r}
    base = by_name.get("bf16")

    def ratio(row: dict[str, Any], other: dict[str, Any] | None) -> str:
        if other is None or not row.get("prefill_ms") or not other.get("prefill_ms"):
            return "-"
        return f"{other['prefill_ms'] / row['prefill_ms']:.3f}x"

    header = (
        f"| variant | linears | attention | compile s | prefill {plan.prefill} ms (median of {plan.rounds}) "
        "| tok/s | vs bf16 | vs pair | peak GB | CUDA graphs | logits SQNR dB |"
    )
    lines = [header, "|" + "---|" * 11]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['variant']} | failed: {row['error'][:160]} |" + " |" * 9)
            continue
        partner = next((by_name[n] for n in pair_of(row["variant"]) if n in by_name), None)
        pair = f"{ratio(row, partner)} over {partner['variant']}" if partner is not None else "-"
        if not plan.cudagraphs:
            graphs = "off"
        else:
            graphs = f"skipped ({row['cudagraph_skips']})" if row["cudagraph_skips"] else "yes"
        lines.append(
            f"| {row['variant']} | {_summary(row.get('linear_sites'), 'bf16')} "
            f"| {_summary(row.get('attention_sites'), 'sdpa (Inductor)')} | {row.get('compile_s', '-')} "
            f"| {row.get('prefill_ms', '-')} | {row.get('prefill_tok_s', '-')} | {ratio(row, base)} | {pair} "
            f"| {row.get('peak_gb', '-')} | {graphs} | {row.get('logits_sqnr_db', '-')} |"
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
    if plan.prefill_only:
        panels = panels[2:]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.5))
    for ax, (key, title) in zip(axes, panels):
        names = [r["variant"] for r in rows]
        ax.bar(names, [r.get(key) or 0 for r in rows], color=["gray"] + ["C0"] * (len(rows) - 1))
        ax.set_title(title, fontsize=10)
        ax.tick_params(axis="x", rotation=30)
    fig.suptitle(f"Llama-3-8B shape, {plan.config.num_layers} layers, {_device_name(plan)}", fontsize=11)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    return True


def _device_name(plan: Plan) -> str:
    return torch.cuda.get_device_name() if plan.device == "cuda" else "CPU"


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="benchmarks/out")
    parser.add_argument(
        "--policies", default="w8a16,w4a16",
        help="comma-separated variants besides bf16: recipe names, or LINEAR+ATTENTION (e.g. bf16+attn_fp8_t128, "
        "fp8+attn_fp8_t128, bf16+sdpa; see the module docstring)",
    )  # fmt: skip
    parser.add_argument("--release", action="store_true", help="pass release_weights=True if the backend has it")
    parser.add_argument("--tiny", action="store_true", help="2-layer small config on CPU (smoke test)")
    parser.add_argument("--steps", type=int, default=None, help="timed decode steps (default 32; tiny: 4)")
    parser.add_argument("--warm-cache", action="store_true", help="let Inductor's caches serve compiles (default cold)")
    parser.add_argument("--prefill", type=int, default=None, help="prompt length at batch 1 (default 2048; tiny: 64)")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default: the config's, 32 / tiny 2)")
    parser.add_argument("--prefill-only", action="store_true", help="time prefill alone (no decode phases)")
    parser.add_argument(
        "--prefill-model", choices=("causal", "cache"), default="causal",
        help="with --prefill-only: causal (no cache, is_causal SDPA; default) or cache (StaticCacheLlama's prefill)",
    )  # fmt: skip
    parser.add_argument("--rounds", type=int, default=5, help="with --prefill-only: timed rounds (median reported)")
    parser.add_argument("--prefill-reps", type=int, default=None, help="timed prefills (per round with --prefill-only)")
    args = parser.parse_args(argv)

    if args.tiny:
        plan = Plan(TINY, "cpu", torch.bfloat16, prefill=64, batch=16, steps=args.steps or 4, warmup=1,
                    prefill_reps=2, cudagraphs=False)  # fmt: skip
    else:
        if not torch.cuda.is_available():
            parser.error("needs a CUDA GPU (or --tiny for the CPU smoke test)")
        plan = Plan(LLAMA3_8B, "cuda", torch.bfloat16, prefill=2048, batch=16, steps=args.steps or 32, warmup=3,
                    prefill_reps=3, cudagraphs=True)  # fmt: skip
    if args.layers is not None:
        if args.layers < 1:
            parser.error("--layers must be at least 1")
        plan = replace(plan, config=replace(plan.config, num_layers=args.layers))
    if args.prefill is not None:
        if args.prefill < 1:
            parser.error("--prefill must be at least 1")
        plan = replace(plan, prefill=args.prefill)
    if args.prefill_only:
        reps = args.prefill_reps or (2 if args.tiny else 10)
        plan = replace(plan, prefill_only=True, prefill_model=args.prefill_model, rounds=max(args.rounds, 1),
                       prefill_reps=reps)  # fmt: skip
    elif args.prefill_reps:
        plan = replace(plan, prefill_reps=args.prefill_reps)
    names = ["bf16"]
    for name in (n.strip() for n in args.policies.split(",") if n.strip()):
        try:
            variant_policy(name)
        except ValueError:
            print(f"note: policy {name!r} is not in lowbit_compile.RECIPES {sorted(lowbit_compile.RECIPES)} "
                  f"nor a LINEAR+ATTENTION variant: skipped")  # fmt: skip
            continue
        if name not in names:
            names.append(name)
    release = args.release and "release_weights" in lowbit_compile.backend.VALID_OPTIONS
    if args.release and not release:
        print("note: this lowbit backend has no release_weights option: --release ignored")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = ("llama8b_tiny" if args.tiny else "llama8b") + (f"_prefill{plan.prefill}" if plan.prefill_only else "")

    # Compile times are cold compiles (no FX-graph / autotune cache hits) unless --warm-cache.
    def partial(rows: list[dict[str, Any]]) -> None:  # a run cut short still leaves its finished rows
        (out_dir / f"{stem}.json").write_text(json.dumps({"meta": {"partial": True}, "variants": rows}, indent=2))

    with torch._inductor.config.patch(force_disable_caches=not args.warm_cache):
        rows, meta = _run(plan, names, release, on_row=partial)
    from torch._dynamo.utils import counters

    meta["lowbit_counters"] = dict(counters["lowbit"])  # tuning time and runs, analysis-cache hits
    meta["fxgraph_cache"] = {k: v for k, v in counters["inductor"].items() if k.startswith("fxgraph")}
    meta["autograd_cache"] = {k: v for k, v in counters["aot_autograd"].items() if k.startswith("autograd_cache")}
    print(
        "lowbit counters:", meta["lowbit_counters"], "Inductor FX-graph cache:", meta["fxgraph_cache"],
        "AOTAutograd cache:", meta["autograd_cache"],
    )  # fmt: skip
    (out_dir / f"{stem}.json").write_text(json.dumps({"meta": meta, "variants": rows}, indent=2))
    if plan.prefill_only:
        table = _prefill_table(rows, plan)
        attention = (
            "SDPA is_causal=True, enable_gqa=True, no KV cache" if plan.prefill_model == "causal"
            else f"StaticCacheLlama: boolean-masked SDPA over a {plan.max_len}-position cache, GQA folded into queries"
        )  # fmt: skip
        title = (
            f"Llama-3-8B-shaped decoder ({plan.config.num_layers} layers), prefill of {plan.prefill} tokens at "
            f"batch 1 ({attention}), {_device_name(plan)}, torch {torch.__version__}; ms: median of {plan.rounds} "
            f"rounds of {plan.prefill_reps} calls; vs bf16: speedup over plain bf16 Inductor; vs pair: over the "
            "variant that differs only in attention (A+F over A+sdpa, else A)"
        )
    else:
        table = _table(rows, plan)
        title = (
            f"Llama-3-8B-shaped decoder ({plan.config.num_layers} layers), {_device_name(plan)}, "
            f"torch {torch.__version__}; ratios are speedups over bf16 Inductor; "
            "peak GB (max_memory_allocated) includes the bf16 weights (16 GB, unless released: then until the "
            "release) and the KV cache; b1 serving peak GB: max_memory_allocated over the batch-1 prefill and "
            "decode after compiling (weights, cache, CUDA-graph pools), vs bf16 as a fraction; GB after compile: "
            "memory_allocated after the first prefill + decode"
        )
    (out_dir / f"{stem}.md").write_text(title + "\n\n" + table + "\n")
    plotted = _plot(rows, plan, out_dir / f"{stem}.png")
    print(f"wrote {out_dir / stem}.json, .md{', .png' if plotted else ' (no matplotlib: no PNG)'}")
    print(title)
    print(table)
    return rows


def make_inputs(plan: Plan) -> dict[str, Any]:
    """The prompt (batch 1) and its positions, one decode token at batch 1 and `plan.batch`, and one
    small device tensor per decode position (made before any timing), from a fixed seed."""
    generator = torch.Generator().manual_seed(1)
    vocab = plan.config.vocab_size
    return {
        "prompt": torch.randint(0, vocab, (1, plan.prefill), generator=generator).to(plan.device),
        "prompt_positions": torch.arange(plan.prefill, device=plan.device),
        "one": torch.randint(0, vocab, (1, 1), generator=generator).to(plan.device),
        "many": torch.randint(0, vocab, (plan.batch, 1), generator=generator).to(plan.device),
        "positions": [torch.tensor([p], device=plan.device) for p in range(plan.prefill, plan.max_len)],
    }


def _run(
    plan: Plan, names: list[str], release: bool, on_row: Callable[[list[dict[str, Any]]], None] | None = None
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    start = time.perf_counter()
    model = build_model(plan)
    inputs = make_inputs(plan)
    with torch.no_grad():  # eager bf16 reference: the first decode step's logits after the prompt
        model.allocate_cache(1, plan.max_len)
        reference = model(inputs["prompt"], inputs["prompt_positions"]).float()
        if not plan.prefill_only:  # else: the prompt's last logits
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
            if on_row is not None:
                on_row(rows)
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
        "prefill_only": plan.prefill_only,
        "prefill_model": plan.prefill_model if plan.prefill_only else "cache",
        "prefill_reps": plan.prefill_reps,
        "rounds": plan.rounds,
        "policies": {name: None if (policy := variant_policy(name)) is None else policy.to_dict() for name in names},
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
