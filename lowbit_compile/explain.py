"""`explain(model, *args, policy=...)`: the per-site report, without running Inductor."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from lowbit_compile.backend import BackendOptions, compile_graph
from lowbit_compile.policy import Policy
from lowbit_compile.report import Report


def explain(
    model: Any,
    *args: Any,
    policy: Policy | str | None = None,
    sensitivity: bool = True,
    calibration: Any = None,
    **kwargs: Any,
) -> Report:
    """Capture `model(*args, **kwargs)` with Dynamo, run the pass pipeline up to the fused stage and
    return the report: one row per matmul site (all graphs of the model, in order).

    sensitivity: also measure, per quantized site, the graph output's SQNR when only that site is
    quantized (`SiteReport.output_sqnr_db`; `report.sensitivity()` ranks them worst first). It runs
    the graph once more per site; `sensitivity=False` skips it.

    calibration: what `lowbit_compile.calibrate` returned, applied as the `calibration` option of
    the backend does (the policy defaults to the calibration's).

    Like `torch._dynamo.explain`, this resets Dynamo's caches first (functions compiled earlier
    recompile on their next call): a capture must never be skipped by a cache or recompile limit."""
    reports: list[Report] = []
    options = dataclasses.replace(
        BackendOptions.parse({"policy": policy, "inductor": False, "calibration": calibration}),
        sensitivity=sensitivity,
        caller="lowbit_compile.explain()",
    )

    def backend(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
        return compile_graph(gm, example_inputs, options, on_report=reports.append)

    torch._dynamo.reset()
    try:
        with torch.no_grad():
            torch.compile(model, backend=backend, dynamic=False)(*args, **kwargs)
    finally:
        torch._dynamo.reset()
    if not reports:
        return Report(policy=options.policy.name, policy_key=options.policy.cache_key())
    merged = reports[0]
    for report in reports[1:]:
        merged = merged + report
    return merged
