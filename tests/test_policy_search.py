"""`lowbit_compile.search` (issue 8, item 5): per-site formats within an output budget, fewest bytes."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import lowbit_compile
from lowbit_compile import Policy, QuantSpec
from lowbit_compile.policy_search import output_quality, search_with_result

ROOT = Path(__file__).resolve().parent.parent


def _model() -> nn.Module:
    """Three linears; the middle one's weight is heavy-tailed, so it is the sensitive one."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 256), nn.GELU(), nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 64))
    with torch.no_grad():
        model[2].weight.copy_(torch.randn(256, 256) ** 3 * 0.03)
    return model.eval()


def _quality(model, x, policy):
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="lowbit", options={"policy": policy, "compute_sqnr": False})
    with torch.no_grad():
        cosine, _ = output_quality(model(x), compiled(x))
    torch._dynamo.reset()
    return cosine


def test_search_keeps_the_budget_with_fewer_bytes_than_int8_and_upgrades_the_sensitive_layer() -> None:
    model, x = _model(), torch.randn(32, 128)
    result = search_with_result(model, x, budget={"min_cosine": 0.99})
    specs = {rule.fqn: rule.spec.weight for rule in result.policy.rules}
    assert set(specs) == {"0", "2", "4"}
    assert specs["2"] != "int4_g128_asym" and specs["0"] == specs["4"] == "int4_g128_asym"
    bytes_int4, bytes_int8 = result.bytes_by_candidate["A=16bit W=int4_g128_asym"], result.bytes_by_candidate[
        "A=16bit W=int8_row"
    ]
    assert bytes_int4 < result.weight_bytes < bytes_int8
    # The policy is ordinary: JSON round trip, and compiled through the backend it keeps the budget.
    policy = Policy.from_json(result.policy.to_json())
    assert policy == result.policy
    assert _quality(model, x, policy) >= 0.99
    assert _quality(model, x, "w4a16") < 0.99  # so the budget did constrain the search


def test_search_returns_a_policy_and_rejects_impossible_or_malformed_budgets() -> None:
    model, x = _model(), torch.randn(32, 128)
    policy = lowbit_compile.search(model, x, budget={"min_sqnr": 10.0})
    assert isinstance(policy, Policy) and len(policy.rules) == 3
    with pytest.raises(ValueError, match="no policy from these candidates keeps the budget"):
        lowbit_compile.search(model, x, budget={"min_cosine": 0.999999}, candidates=[QuantSpec("int4_g128_asym")])
    with pytest.raises(ValueError, match="budget takes min_cosine and/or min_sqnr"):
        lowbit_compile.search(model, x, budget={"cosine": 0.99})


@pytest.mark.slow
def test_policy_search_example_on_minilm(tmp_path, capsys) -> None:
    spec = importlib.util.spec_from_file_location("policy_search_example", ROOT / "examples" / "policy_search.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    rows = example.main(["--save", str(tmp_path / "policy.json")])
    assert rows["searched"]["cosine"] >= 0.995
    assert rows["w4a16"]["bytes"] < rows["searched"]["bytes"] < rows["w8a16"]["bytes"]
    saved = Policy.from_json((tmp_path / "policy.json").read_text())
    assert len(saved.rules) == 36 and json.loads(saved.to_json())["name"] == "minilm-searched"
    assert "| searched |" in capsys.readouterr().out
