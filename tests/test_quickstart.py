"""The README's main example runs on CPU and reports a quantized, not pass-through, result."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "quickstart.py"


def test_quickstart_runs_small(capsys) -> None:
    spec = importlib.util.spec_from_file_location("quickstart", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch._dynamo.reset()
    result = module.main(
        ["--recipe", "w8a8", "--layers", "1", "--hidden", "128", "--length", "16", "--repeats", "1", "--device", "cpu"]
    )
    printed = capsys.readouterr().out
    assert "lowbit report: policy w8a8" in printed
    assert "layers.0.mlp.down_proj" in printed and "scaled_mm" in printed
    assert "time per call: eager" in printed
    assert 25 < result["sqnr_db"] < 50
    assert result["compiled_s"] > 0 and result["eager_s"] > 0
