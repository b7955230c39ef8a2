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
    memo: dict[tuple, Any] = {}
    with fake_mode, enable_python_dispatcher():
        for node in state.gm.graph.nodes:
            if node.op != "call_function" or "val" in node.meta:
                continue
            args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), val)
            key = _static_key(node.target, args, kwargs)
            known = memo.get(key) if key is not None else None
            if known is not None:
                node.meta["val"] = _fresh_like(known)
                continue
            node.meta["val"] = node.target(*args, **kwargs)
            if key is not None:
                memo[key] = node.meta["val"]


def _static_key(target: Any, args: tuple, kwargs: dict) -> tuple | None:
    """A memo key for one of our ops on tensors of fixed sizes (a layer's weight quantize /
    dequantize: the composite ops decompose into dozens of fake ops, and a model repeats the same
    weight shapes in every layer), or None: other targets, symbolic sizes, or arguments the key
    cannot hold. The op's result depends on nothing else than what the key holds."""
    if not (isinstance(target, torch._ops.OpOverload) and target.namespace == "lowbit"):
        return None

    def part(item: Any) -> tuple:
        if isinstance(item, torch.Tensor):
            if not all(type(s) is int for s in (*item.shape, *item.stride())):
                raise _NoKey
            return ("tensor", tuple(item.shape), item.stride(), item.dtype, item.device)
        if isinstance(item, float):  # by its bits: NaN equals itself, -0.0 is not 0.0
            return ("float", item.hex())
        if item is None or isinstance(item, (bool, int, str, torch.dtype)):
            return (type(item).__name__, item)
        raise _NoKey

    try:
        return (target, tuple(part(a) for a in args), tuple((k, part(v)) for k, v in sorted(kwargs.items())))
    except _NoKey:
        return None


class _NoKey(Exception):
    pass


def _fresh_like(value: Any) -> Any:
    """New fake tensors with `value`'s sizes, strides, dtype and device (a tuple for a tuple)."""
    if isinstance(value, (tuple, list)):
        return type(value)(_fresh_like(v) for v in value)
    if isinstance(value, torch.Tensor):
        return torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device=value.device)
    return value


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
