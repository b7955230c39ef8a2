"""The ordered pipeline: captured -> annotated -> qdq -> folded -> fused (-> lowered, in lower.py).

Each stage is one function with one job, applied by `run_stage`, which checks the graph, refreshes
`meta["val"]` and hands the result to the caller's observer (dumps, logs, tests).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.fx

from lowbit_compile.policy import Policy
from lowbit_compile.passes.annotate import annotate_sites
from lowbit_compile.passes.capture import capture_graph
from lowbit_compile.passes.fold import fold_weight_quantization
from lowbit_compile.passes.fuse import fuse_quantized_ops
from lowbit_compile.passes.qdq import insert_qdq
from lowbit_compile.passes.state import PipelineState

Observer = Callable[[str, PipelineState], None]


def annotate_and_calibrate(state: PipelineState) -> None:
    """annotated: the sites and their specs, then each linear site's calibration (when the
    `calibration` option gives one: `PipelineState.attach_calibration`)."""
    annotate_sites(state)
    state.attach_calibration()


STAGES: tuple[tuple[str, Callable[[PipelineState], None]], ...] = (
    ("captured", capture_graph),
    ("annotated", annotate_and_calibrate),
    ("qdq", insert_qdq),
    ("folded", fold_weight_quantization),
    ("fused", fuse_quantized_ops),
)
STAGE_NAMES = (*(name for name, _ in STAGES), "lowered")


def _fill_meta(state: PipelineState) -> None:
    """Give the nodes a stage created their meta["val"], by running them on fake values.

    Only new nodes are evaluated: Dynamo's own nodes keep the values Dynamo traced, so data-dependent
    ops in the model (`.item()`) are never re-run here. Stages that replace a node with an
    equivalent one (same shape and dtype) copy its value over.
    """
    fake_mode = state.fake_mode()
    if fake_mode is None:
        return
    from torch._dispatch.python import enable_python_dispatcher

    def val(arg: torch.fx.Node) -> Any:
        return arg.meta["val"]

    # As Dynamo does: composite ops (linear -> matmul) need Python decompositions for symbolic sizes.
    with fake_mode, enable_python_dispatcher():
        for node in state.gm.graph.nodes:
            if node.op != "call_function" or "val" in node.meta:
                continue
            args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), val)
            node.meta["val"] = node.target(*args, **kwargs)


def run_stage(name: str, stage: Callable[[PipelineState], None], state: PipelineState, observer: Observer) -> None:
    stage(state)
    state.gm.graph.lint()
    state.gm.recompile()
    if name in ("qdq", "folded", "fused"):
        _fill_meta(state)
    observer(name, state)


def run_pipeline(
    gm: torch.fx.GraphModule,
    example_inputs: list[Any],
    policy: Policy,
    observer: Observer = lambda *_: None,
    calibration: Any = None,
) -> PipelineState:
    state = PipelineState(gm=gm, example_inputs=list(example_inputs), policy=policy, calibration=calibration)
    for name, stage in STAGES:
        run_stage(name, stage, state, observer)
    return state
