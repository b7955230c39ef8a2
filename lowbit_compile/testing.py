"""Helpers for tests of lowbit-compiled code: run a function and get every stage's graph text."""

from __future__ import annotations

from typing import Any

import torch

from lowbit_compile.backend import BackendOptions, compile_graph
from lowbit_compile.policy import Policy
from lowbit_compile.report import Report
from lowbit_compile.passes.pipeline import STAGE_NAMES

GRAPH_KEYS = (*STAGE_NAMES, "output_code")


def run_and_get_graphs(
    fn: Any,
    *args: Any,
    policy: Policy | str | None = None,
    options: dict[str, Any] | None = None,
    dynamic: bool | None = False,
    **kwargs: Any,
) -> tuple[Any, dict[str, str]]:
    """Compile `fn` with the lowbit backend (fresh Dynamo state, Inductor caches off), call it once,
    and return `(result, graphs)`: graphs maps each stage name, "output_code" and "report" to text.
    With several Dynamo graphs (graph breaks) each entry holds them all, in compile order."""
    options = BackendOptions.parse({**(options or {}), "policy": policy})
    stages: list[dict[str, str]] = []
    reports: list[Report] = []

    def backend(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
        return compile_graph(gm, example_inputs, options, on_report=reports.append, on_stages=stages.append)

    torch._dynamo.reset()
    with torch._inductor.config.patch(force_disable_caches=True), torch.no_grad():
        result = torch.compile(fn, backend=backend, dynamic=dynamic)(*args, **kwargs)
    graphs = {key: "\n".join(texts.get(key, "") for texts in stages) for key in GRAPH_KEYS}
    graphs["report"] = "\n".join(report.table() for report in reports)
    return result, graphs
