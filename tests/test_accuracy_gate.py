"""The per-site accuracy gate (issue 8, item 3): `QuantSpec(min_sqnr=..., fallback=...)` is checked at
compile time against the measured site SQNR, in the one extra run of the graph; SQNR is measured on
graphs that update inputs in place too, and the report says why wherever it is not."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.fx
import torch.nn as nn

import lowbit_compile
from lowbit_compile import Policy, QuantSpec, Rule
from lowbit_compile.backend import BackendOptions, compile_graph
from lowbit_compile.report import sqnr

INT4 = "int4_g32"
INT8 = "int8_row"


class _Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(96, 256)  # K=96: int4 g32 fits, g128 does not
        self.down = nn.Linear(256, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(x)))


def _model() -> nn.Module:
    torch.manual_seed(0)
    return _Mlp().eval()


def _compile_report(model: nn.Module, x: torch.Tensor, policy: Policy, **options):
    """(output, report) of one call through backend="lowbit" (no Inductor unless asked)."""
    parsed = BackendOptions.parse({"policy": policy, "inductor": False, **options})
    reports = []

    def backend(gm, example_inputs):
        return compile_graph(gm, example_inputs, parsed, on_report=reports.append)

    torch._dynamo.reset()
    try:
        with torch.no_grad():
            out = torch.compile(model, backend=backend)(x)
    finally:
        torch._dynamo.reset()
    return out, reports[0]


def _sqnr_of(fmt: str) -> list[float]:
    """The sites' SQNR under a plain spec (no floor), as the report measures it."""
    x = torch.randn(16, 96)
    report = lowbit_compile.explain(_model(), x, policy=Policy(default=QuantSpec(fmt)))
    return [site.sqnr_db for site in report.sites]


def test_sites_below_the_floor_fall_back_and_the_report_says_from_what() -> None:
    int4, int8 = _sqnr_of(INT4), _sqnr_of(INT8)
    floor = (max(int4) + min(int8)) / 2  # int4 fails it at both sites, int8 passes
    assert max(int4) < floor < min(int8)
    policy = Policy(default=QuantSpec(INT4, min_sqnr=floor, fallback=QuantSpec(INT8)), name="gated")
    x = torch.randn(16, 96)
    model = _model()
    out, report = _compile_report(model, x, policy)
    for site in report.sites:
        assert site.format == f"A=16bit W={INT8}"
        assert len(site.fell_back_from) == 1 and site.fell_back_from[0].startswith(f"A=16bit W={INT4} floor")
        assert site.sqnr_db > floor
        assert "fell back from A=16bit W=int4_g32" in report.table()
    # The compiled model runs the fallback: the same output as plain int8.
    int8_out, _ = _compile_report(model, x, Policy(default=QuantSpec(INT8)))
    torch.testing.assert_close(out, int8_out)


def test_no_fallback_left_leaves_the_site_unquantized_with_the_reason() -> None:
    policy = Policy(default=QuantSpec(INT4, min_sqnr=200.0), name="strict")
    x = torch.randn(16, 96)
    model = _model()
    out, report = _compile_report(model, x, policy)
    for site in report.sites:
        assert site.format is None
        assert site.skip_reason.startswith("accuracy gate: A=16bit W=int4_g32 floor 200 dB: ")
        assert site.skip_reason.endswith("dB < 200 dB; no fallback left")
    with torch.no_grad():
        torch.testing.assert_close(out, model(x))


def test_gate_per_rule_and_an_inapplicable_fallback_is_skipped() -> None:
    """A fallback that cannot run on the site (int4 g128 on K=96) is passed over with its reason."""
    gated = QuantSpec(INT4, min_sqnr=200.0, fallback=QuantSpec("int4_g128", min_sqnr=200.0, fallback=QuantSpec(INT8)))
    policy = Policy(rules=(Rule(fqn="up", spec=gated),), default=QuantSpec(INT4), name="one-gated")
    _, report = _compile_report(_model(), torch.randn(16, 96), policy)
    up, down = report.sites
    assert down.format == f"A=16bit W={INT4}" and not down.fell_back_from
    assert up.format == f"A=16bit W={INT8}"
    assert "int4_g128" in up.fell_back_from[1] and "cannot run here" in up.fell_back_from[1]


def test_the_gate_runs_the_graph_once_and_with_compute_sqnr_off(monkeypatch) -> None:
    runs = []
    original = torch.fx.Interpreter.run

    def counting(self, *args, **kwargs):
        runs.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.fx.Interpreter, "run", counting)
    policy = Policy(default=QuantSpec(INT4, min_sqnr=200.0, fallback=QuantSpec(INT8, min_sqnr=200.0)))
    _, report = _compile_report(_model(), torch.randn(16, 96), policy, compute_sqnr=False)
    assert all(site.format is None for site in report.sites)  # gated even with compute_sqnr=False
    assert len(runs) == 1


class _Counting(nn.Module):
    """Updates a buffer in place, as KV caches and step counters do."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(128, 64)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.add_(1)
        return self.fc(x)


def test_sqnr_is_measured_on_graphs_that_update_inputs_in_place() -> None:
    torch.manual_seed(0)
    model = _Counting().eval()
    x = torch.randn(8, 128)
    out, report = _compile_report(model, x, Policy(default=QuantSpec(INT8)))
    (site,) = report.sites
    assert site.sqnr_db is not None and site.sqnr_db > 30 and site.sqnr_note is None
    assert model.calls.item() == 1  # the measurement ran on a copy of the buffer
    assert sqnr(model.fc(x), out) > 30


def test_released_weights_leave_the_gate_unchecked_and_say_so(caplog) -> None:
    model = _model()
    x = torch.randn(16, 96)
    _compile_report(model, x, Policy(default=QuantSpec(INT4)), release_weights=True, inductor=True)
    # A later compile of the released model with a floor cannot run the unquantized graph.
    with caplog.at_level(logging.WARNING, logger="lowbit_compile"):
        _, report = _compile_report(model, x, Policy(default=QuantSpec(INT4, min_sqnr=200.0)), inductor=True)
    assert len(report.sites) == 2
    for site in report.sites:
        assert site.format is not None  # kept: the floor could not be checked
        assert site.sqnr_note.startswith("accuracy gate not checked: not measured: 2 weights were released")
    assert "lowbit accuracy gate not checked on 2 sites" in caplog.text
    assert "accuracy gate not checked" in report.table()


def test_floor_and_fallback_round_trip_through_json() -> None:
    spec = QuantSpec(INT4, min_sqnr=25, fallback=QuantSpec(INT8))
    policy = Policy(default=spec, name="p")
    assert Policy.from_json(policy.to_json()).default == spec
    assert Policy(default=QuantSpec(INT4)).cache_key() != policy.cache_key()
    with pytest.raises(ValueError, match="set min_sqnr too"):
        QuantSpec(INT4, fallback=QuantSpec(INT8))
    with pytest.raises(ValueError, match="min_sqnr must be a finite number"):
        QuantSpec(INT4, min_sqnr=float("nan"))


# -- issue 8 item 4: sensitivity in explain() -------------------------------------------------------


class _Outlier(nn.Module):
    """Two linears; `hurt`'s weight is heavy-tailed (a cubed Gaussian), so its int4 groups are scaled
    by a few large values and lose the rest (~19 dB alone against ~24 dB for Gaussian `fine`)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fine = nn.Linear(96, 96)
        self.hurt = nn.Linear(96, 96)
        with torch.no_grad():
            self.hurt.weight.copy_(torch.randn(96, 96) ** 3 * 0.05)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.hurt(self.fine(x))


def test_explain_ranks_sites_by_output_sqnr_worst_first() -> None:
    report = lowbit_compile.explain(_Outlier().eval(), torch.randn(8, 96), policy=Policy(default=QuantSpec(INT4)))
    ranking = report.sensitivity()
    assert [s.fqn for s in ranking] == ["hurt", "fine"]
    assert ranking[0].output_sqnr_db < ranking[1].output_sqnr_db - 3
    assert "output SQNR dB, only this site" in report.table()
    assert report.sensitivity_table().splitlines()[1].split("#")[1].startswith("1 hurt")
    data = __import__("json").loads(report.to_json())
    assert data["sensitivity"] == [1, 0]
    assert all(isinstance(site["output_sqnr_db"], float) for site in data["sites"])


def test_sensitivity_of_one_site_is_the_output_sqnr_of_quantizing_it_alone() -> None:
    """Against a hand-made check: quantizing only `fine` equals running `hurt` unquantized after it."""
    from lowbit_compile.reference import fake_quantize

    model = _Outlier().eval()
    x = torch.randn(8, 96)
    report = lowbit_compile.explain(model, x, policy=Policy(default=QuantSpec(INT4, weight_search=False)))
    fine = next(s for s in report.sites if s.fqn == "fine")
    with torch.no_grad():
        expected = model(x)
        only_fine = model.hurt(torch.nn.functional.linear(x, fake_quantize(model.fine.weight, INT4), model.fine.bias))
    assert fine.output_sqnr_db == pytest.approx(sqnr(expected, only_fine), abs=0.05)
    assert lowbit_compile.explain(model, x, policy="w8a16", sensitivity=False).sensitivity() == []
