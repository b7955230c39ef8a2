"""Fold-time scale / zero-point search for int4 weights (lowbit_compile.weight_search)."""

from __future__ import annotations

import json

import pytest
import torch

import lowbit_compile  # noqa: F401  (registers the lowbit ops)
from lowbit_compile import reference
from lowbit_compile.formats import get_format
from lowbit_compile.policy import Policy, QuantSpec, recipe
from lowbit_compile.weight_search import search_quantize, searchable
from lowbit_compile.passes import state as state_module
from lowbit_compile.passes.state import quantize_weight

INT4 = ("int4_g32", "int4_g128", "int4_g32_asym", "int4_g64_asym", "int4_g128_asym")


def _weights(kind: str, n: int = 64, k: int = 256) -> torch.Tensor:
    g = torch.Generator().manual_seed(hash(kind) % 1000)
    w = torch.randn(n, k, generator=g) * 0.05
    if kind == "outliers":  # a few huge values per row, as in real FFN weights
        idx = torch.randint(0, k, (n, 3), generator=g)
        w.scatter_(1, idx, torch.randn(n, 3, generator=g) * 2.0)
    elif kind == "skewed":  # one-sided groups: the zero point matters
        w = w.abs() + 0.01
    elif kind == "heavy":
        w = torch.distributions.StudentT(2.0).sample((n, k)) * 0.02
    return w


def _group_error(w: torch.Tensor, q: reference.QuantizedTensor, fmt: str) -> torch.Tensor:
    size = get_format(fmt).group_size
    err = (reference.dequantize(q, fmt) - w).square()
    return err.unflatten(-1, (-1, size)).sum(-1)


@pytest.mark.parametrize("fmt", INT4)
@pytest.mark.parametrize("kind", ["gaussian", "outliers", "skewed", "heavy"])
def test_search_never_worse_than_round_to_nearest_per_group(fmt, kind):
    w = _weights(kind)
    rtn, searched = reference.quantize(w, fmt), search_quantize(w, fmt)
    e_rtn, e_search = _group_error(w, rtn, fmt), _group_error(w, searched, fmt)
    assert (e_search <= e_rtn).all()
    assert e_search.sum() < 0.97 * e_rtn.sum()  # and it does find something better overall


@pytest.mark.parametrize("fmt", INT4)
def test_layout_and_dtypes_are_the_reference_layout(fmt):
    w = _weights("outliers").to(torch.bfloat16)
    rtn, searched = reference.quantize(w, fmt), search_quantize(w, fmt)
    for a, b in zip(rtn, searched):
        assert (a is None) == (b is None)
        if a is not None:
            assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, b.shape, a.dtype, b.dtype)
    assert searched.data.dtype == torch.uint8 and searched.scale.dtype == torch.float32
    assert torch.isfinite(searched.scale).all()
    if searched.zero_point is not None:
        assert searched.zero_point.dtype == torch.float32 and torch.isfinite(searched.zero_point).all()


def test_special_groups_keep_round_to_nearest():
    fmt = "int4_g32_asym"
    w = _weights("gaussian", n=4, k=128)
    w[0, :32] = 0.0  # all-zero group: scale 0, exact zeros
    w[1, 32:64] = 0.5  # constant group
    w[2, 64] = float("nan")  # NaN group stays NaN
    q, rtn = search_quantize(w, fmt), reference.quantize(w, fmt)
    out = reference.dequantize(q, fmt)
    assert (out[0, :32] == 0).all() and q.scale[0, 0] == 0
    assert torch.isnan(out[2, 64:96]).all() and not torch.isnan(out[2, :64]).any()
    assert torch.isnan(q.scale[2, 2]) and torch.isnan(rtn.scale[2, 2])
    assert (out[1, 32:64] - 0.5).abs().max() <= (reference.dequantize(rtn, fmt)[1, 32:64] - 0.5).abs().max()


def test_only_int4_formats_are_searched():
    assert all(searchable(f) for f in INT4)
    for fmt in ("int8_row", "int8_g128", "fp8_e4m3_row", "mxfp4", "nvfp4"):
        assert not searchable(fmt)
        w = _weights("outliers")
        assert all(
            torch.equal(a, b) for a, b in zip(quantize_weight(w, False, fmt), torch.ops.lowbit.quantize(w, fmt))
        )


@pytest.mark.parametrize("transposed", [False, True])
def test_off_switch_gives_exactly_round_to_nearest(transposed):
    w = torch.nn.Parameter(_weights("outliers", 256, 256))
    fmt = "int4_g128_asym"
    off = quantize_weight(w, transposed, fmt, search=False)
    source = (w.detach().t() if transposed else w.detach()).contiguous()
    for a, b in zip(off, torch.ops.lowbit.quantize(source, fmt)):
        assert torch.equal(a, b)
    on = quantize_weight(w, transposed, fmt)  # the default is on
    assert [t.shape for t in on] == [t.shape for t in off] and [t.dtype for t in on] == [t.dtype for t in off]
    assert not torch.equal(on[1], off[1])


def test_searched_weight_is_cached_until_the_parameter_changes(monkeypatch):
    w = torch.nn.Parameter(_weights("gaussian", 128, 256))
    calls = []
    real = state_module.search_quantize
    monkeypatch.setattr(state_module, "search_quantize", lambda *a, **k: calls.append(1) or real(*a, **k))
    first = quantize_weight(w, False, "int4_g128_asym")
    again = quantize_weight(w, False, "int4_g128_asym")
    assert len(calls) == 1 and all(a is b for a, b in zip(first, again))
    quantize_weight(w, True, "int4_g128")  # another layout / format: its own entry
    assert len(calls) == 2
    with torch.no_grad():
        w.mul_(2.0)  # new values (version counter): searched again
    changed = quantize_weight(w, False, "int4_g128_asym")
    assert len(calls) == 3 and torch.allclose(changed[1], 2 * first[1])


def test_policy_field_round_trips_and_is_part_of_the_cache_key():
    on = recipe("w4a16")
    assert on.default.weight_search is True
    off = Policy(rules=on.rules, default=QuantSpec("int4_g128_asym", weight_search=False), name="w4a16")
    assert Policy.from_json(off.to_json()) == off and Policy.from_json(on.to_json()) == on
    assert off.cache_key() != on.cache_key()
    assert "no weight search" in str(off)
    assert "weight_search" not in json.loads(on.to_json())["default"]  # the default: JSON as before
    assert json.loads(off.to_json())["default"]["weight_search"] is False
    with pytest.raises(ValueError, match="weight_search must be a bool"):
        QuantSpec("int4_g128_asym", weight_search="yes")


class _Mlp(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.up = torch.nn.Linear(256, 128)
        self.down = torch.nn.Linear(128, 64)
        with torch.no_grad():
            self.up.weight.copy_(_weights("outliers", 128, 256))
            self.down.weight.copy_(torch.randn(64, 128, generator=g) * 0.05)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(x)))


def _compiled_error(model: torch.nn.Module, x: torch.Tensor, policy: Policy) -> float:
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="lowbit", options={"policy": policy, "inductor": False})
    with torch.no_grad():
        return (compiled(x) - model(x)).square().mean().item()


def test_compiled_model_uses_the_searched_weights():
    model = _Mlp().eval()
    x = torch.randn(8, 256, generator=torch.Generator().manual_seed(1))
    on = recipe("w4a16")
    off = Policy(rules=on.rules, default=QuantSpec("int4_g128_asym", weight_search=False), name="w4a16-rtn")
    err_on, err_off = _compiled_error(model, x, on), _compiled_error(model, x, off)
    assert 0 < err_on < err_off


def test_row_chunks_give_the_same_result(monkeypatch):
    import lowbit_compile.weight_search as weight_search

    w = _weights("outliers", 96, 256)
    whole = search_quantize(w, "int4_g64_asym")
    monkeypatch.setattr(weight_search, "_CHUNK_ELEMENTS", {"cpu": 17 * 256 * 7})  # 7 rows per chunk
    chunked = search_quantize(w, "int4_g64_asym")
    for a, b in zip(whole, chunked):
        assert (a is None and b is None) or torch.equal(a, b)
