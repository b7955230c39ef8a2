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
from passes.annotate import annotate_sites
from passes.capture import capture_graph
from passes.fold import fold_weight_quantization
from passes.fuse import fuse_quantized_ops
from passes.qdq import insert_qdq
from passes.state import PipelineState

Observer = Callable[[str, PipelineState], None]

STAGES: tuple[tuple[str, Callable[[PipelineState], None]], ...] = (
    ("captured", capture_graph),
    ("annotated", annotate_sites),
    ("qdq", insert_qdq),
    ("folded", fold_weight_quantization),
    ("fused", fuse_quantized_ops),
)
STAGE_NAMES = (*(name for name, _ in STAGES), "lowered")


def _refresh_meta(state: PipelineState) -> None:
    """Re-derive meta["val"] of every node from the placeholders' fake values."""
    fake_inputs = [n.meta.get("val") for n in state.placeholders()]
    fake_mode = state.fake_mode()
    if fake_mode is None or any(v is None for v in fake_inputs):
        return
    from torch._dispatch.python import enable_python_dispatcher
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    # As Dynamo does: composite ops (linear -> matmul) need Python decompositions for symbolic sizes.
    with enable_python_dispatcher():
        FakeTensorProp(state.gm, fake_mode).propagate_dont_convert_inputs(*fake_inputs)


def run_stage(name: str, stage: Callable[[PipelineState], None], state: PipelineState, observer: Observer) -> None:
    stage(state)
    state.gm.graph.lint()
    state.gm.recompile()
    if name in ("qdq", "folded", "fused"):
        _refresh_meta(state)
    observer(name, state)


def run_pipeline(
    gm: torch.fx.GraphModule, example_inputs: list[Any], policy: Policy, observer: Observer = lambda *_: None
) -> PipelineState:
    state = PipelineState(gm=gm, example_inputs=list(example_inputs), policy=policy)
    for name, stage in STAGES:
        run_stage(name, stage, state, observer)
    return state
