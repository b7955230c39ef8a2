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
