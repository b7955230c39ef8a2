"""benchmarks/llama8b.py: its model has Llama-3-8B's shapes, and its --tiny run works end to end on CPU."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from lowbit_compile.models import StaticCacheLlama

BENCHMARK = Path(__file__).resolve().parent.parent / "benchmarks" / "llama8b.py"


def _benchmark():
    spec = importlib.util.spec_from_file_location("benchmark_llama8b", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_the_model_has_llama3_8b_parameters() -> None:
    with torch.device("meta"):
        model = StaticCacheLlama(_benchmark().LLAMA3_8B)
    assert sum(p.numel() for p in model.parameters()) == 8_030_261_248  # Llama-3-8B's count


@pytest.mark.slow
@pytest.mark.usefixtures("fresh_dynamo")
def test_tiny_run_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = _benchmark().main(["--tiny", "--policies", "w8a16,no-such-recipe", "--steps", "1", "--out", str(tmp_path)])
    assert "'no-such-recipe' is not in lowbit_compile.RECIPES" in capsys.readouterr().out
    assert [row["variant"] for row in rows] == ["bf16", "w8a16"]
    for row in rows:
        assert "error" not in row, row
        assert row["graphs"] == 3  # prefill, decode at batch 1, decode at batch 16
        assert row["decode_b1_tok_s"] > 0 and row["decode_b16_tok_s"] > 0 and row["prefill_ms"] > 0
    assert rows[1]["logits_sqnr_db"] > 25
    saved = json.loads((tmp_path / "llama8b_tiny.json").read_text())
    assert [row["variant"] for row in saved["variants"]] == ["bf16", "w8a16"]
    assert "| w8a16 |" in (tmp_path / "llama8b_tiny.md").read_text()


def test_attention_variants_differ_from_their_pair_only_in_attention() -> None:
    from lowbit_compile.policy import OpKind, recipe

    bench = _benchmark()
    sites = [("layers.0.attn.q_proj", OpKind.LINEAR, 4096, 4096), ("layers.0.attn", OpKind.ATTENTION, None, 128),
             ("layers.0.attn.x", OpKind.MATMUL, 128, 128), ("lm_head", OpKind.LINEAR, 128256, 4096)]  # fmt: skip

    def decisions(policy):
        return [policy.decide(*site)[0] for site in sites]

    assert bench.variant_policy("bf16") is None  # plain Inductor
    assert decisions(bench.variant_policy("fp8+attn_fp8_t128")) == decisions(recipe("fp8-attention"))
    assert decisions(bench.variant_policy("fp8+sdpa")) == decisions(recipe("fp8"))
    only_attention = decisions(bench.variant_policy("bf16+attn_fp8_t128"))
    assert [spec is not None for spec in only_attention] == [False, True, False, False]
    assert only_attention[1].activation == "attn_fp8_t128"
    assert decisions(bench.variant_policy("bf16+sdpa")) == [None] * 4
    for name in ("bf16+attn_nope", "nope+sdpa", "fp8+", "no-such-recipe"):
        with pytest.raises(ValueError, match="LINEAR\\+ATTENTION"):
            bench.variant_policy(name)
    assert bench.pair_of("bf16+attn_fp8_t128") == ["bf16+sdpa", "bf16"] and bench.pair_of("fp8") == []


@pytest.mark.slow
@pytest.mark.usefixtures("fresh_dynamo")
def test_tiny_prefill_only_attention_pair(tmp_path: Path) -> None:
    """--prefill-only on the causal (no cache) model: the pair's quantized arm runs block_attention at
    the SDPA site, the other keeps SDPA; the linears are the same in both."""
    argv = ["--tiny", "--prefill-only", "--layers", "1", "--prefill", "128", "--rounds", "1", "--prefill-reps", "1",
            "--policies", "bf16+sdpa,bf16+attn_fp8_t128", "--out", str(tmp_path)]  # fmt: skip
    rows = _benchmark().main(argv)
    assert [row["variant"] for row in rows] == ["bf16", "bf16+sdpa", "bf16+attn_fp8_t128"]
    for row in rows:
        assert "error" not in row, row
        assert row["graphs"] == 1 and row["prefill_ms"] > 0 and "decode_b1_ms" not in row
    plain, control, quantized = rows
    assert "attention_sites" not in plain  # plain Inductor: no lowbit report
    assert control["attention_sites"] == {"sdpa -> unquantized": 1}
    assert quantized["attention_sites"] == {"sdpa -> block_attention [reference]": 1}
    assert control["linear_sites"] == quantized["linear_sites"] == {"unquantized": 8}
    assert "torch.ops.lowbit.block_attention.default(" in quantized["output_code"]  # CPU: the reference op
    assert not any("scaled_dot_product" in marker for marker in quantized["output_code"])
    assert any("scaled_dot_product" in marker for marker in control["output_code"])
    assert quantized["logits_sqnr_db"] > 25
    saved = json.loads((tmp_path / "llama8b_tiny_prefill128.json").read_text())
    assert saved["meta"]["prefill_model"] == "causal" and saved["meta"]["policies"]["bf16"] is None
    assert "over bf16+sdpa |" in (tmp_path / "llama8b_tiny_prefill128.md").read_text()
