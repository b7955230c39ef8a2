"""Stage 3, qdq: make each quantized site explicit as quantize -> dequantize -> high-precision op.

This graph runs anywhere and is the numerical reference ("fake quant") of every later stage.
Linear sites of every source form become `F.linear(dequantize(x), dequantize(W), bias)` and
attention sites of both forms become SDPA over dequantized q, k, v, or, for an attention format
(which quantizes q, k and v itself, per token block), one `lowbit.block_attention` node whose
reference is `reference.attention`. The nodes created are recorded in `site.qdq` for the folding
and fusion stages.

A calibrated linear site (`site.calibration`) multiplies its activation by the smoothing factors
(`x * smooth`, pointwise: Inductor fuses it into the producer) and divides the weight by them
before it is quantized (`quantize(W / smooth)`, folded at compile time); a static activation scale
quantizes with `lowbit.quantize_static`. The factors and scales are compile-time constants, graph
inputs after Dynamo's (`PipelineState.constants`).
"""

from __future__ import annotations

import operator
import re

import torch
import torch.fx
import torch.nn.functional as F

from lowbit_compile import reference
from lowbit_compile.policy import Kernel, OpKind
from lowbit_compile.passes.annotate import value_of
from lowbit_compile.passes.state import PipelineState, Site, remove_dead_code

QUANTIZE = torch.ops.lowbit.quantize.default
DEQUANTIZE = torch.ops.lowbit.dequantize.default
FAKE_QUANTIZE_FROM_ROWS = torch.ops.lowbit.fake_quantize_from_rows.default
QUANTIZE_STATIC = torch.ops.lowbit.quantize_static.default
QUANTIZED_PARTS = ("data", "scale", "zero_point", "global_scale")


def _quantize(graph: torch.fx.Graph, operand: torch.fx.Node, fmt: str) -> tuple[torch.fx.Node, list[torch.fx.Node]]:
    quantize = graph.call_function(QUANTIZE, (operand, fmt))
    parts = [graph.call_function(operator.getitem, (quantize, i)) for i in range(len(QUANTIZED_PARTS))]
    return quantize, parts


def _dequantize(graph: torch.fx.Graph, parts: list[torch.fx.Node], fmt: str, dtype: torch.dtype) -> torch.fx.Node:
    return graph.call_function(DEQUANTIZE, (*parts, fmt, dtype))


def _constant(graph: torch.fx.Graph, name: str, tensor: torch.Tensor) -> torch.fx.Node:
    """A compile-time tensor as a new graph input after the others (`meta["lowbit_constant"]`)."""
    placeholders = [node for node in graph.nodes if node.op == "placeholder"]
    values = [node.meta.get("val") for node in placeholders]
    fake_mode = next((v.fake_mode for v in values if hasattr(v, "fake_mode")), None)
    with graph.inserting_after(placeholders[-1]):
        node = graph.placeholder(re.sub(r"\W", "_", name))
    node.meta["val"] = fake_mode.from_tensor(tensor, static_shapes=True) if fake_mode is not None else tensor
    node.meta["lowbit_constant"] = tensor
    return node


def _qdq_linear(graph: torch.fx.Graph, site: Site, shared: dict | None = None) -> torch.fx.Node:
    spec, calibration = site.spec, site.calibration
    x, weight, bias = site.inputs["x"], site.inputs["weight"], site.inputs["bias"]
    dtype = value_of(x).dtype
    weight_nk = weight if site.weight_layout == "nk" else graph.call_function(torch.t, (weight,))
    if calibration is not None and calibration.smooth is not None:
        smooth = _constant(graph, f"calibration_{site.weight_path}_smooth", calibration.smooth)
        x = graph.call_function(torch.mul, (x, smooth))
        weight_nk = graph.call_function(torch.div, (weight_nk, smooth))
        site.inputs["x"] = x  # the op's activation operand is now the smoothed one (the fused ops read it)
        site.qdq["smooth"] = smooth
    w_quantize, w_parts = _quantize(graph, weight_nk, spec.weight)
    site.qdq.update(weight_quantize=w_quantize, weight_parts=w_parts)
    w_dequantized = _dequantize(graph, w_parts, spec.weight, dtype)
    if spec.activation is None:
        x_dequantized = x
    elif spec.weight_only_below_m is not None:
        x_dequantized = graph.call_function(FAKE_QUANTIZE_FROM_ROWS, (x, spec.activation, spec.weight_only_below_m))
    elif calibration is not None and calibration.static_format == spec.activation:
        scale = _constant(graph, f"calibration_{site.weight_path}_activation_scale", calibration.static_scale)
        site.qdq["activation_scale"] = scale
        x_quantize = graph.call_function(QUANTIZE_STATIC, (x, scale, spec.activation))
        x_parts = [graph.call_function(operator.getitem, (x_quantize, i)) for i in range(len(QUANTIZED_PARTS))]
        site.qdq.update(x_quantize=x_quantize, x_parts=x_parts)
        x_dequantized = _dequantize(graph, x_parts, spec.activation, dtype)
    else:
        # One quantization per (activation, format): q/k/v or gate/up projections of one input share
        # it, so the producer's kernel writes the codes once (`shared` is insert_qdq's memo).
        key = (x, spec.activation)
        if shared is not None and key in shared:
            x_quantize, x_parts = shared[key]
        else:
            x_quantize, x_parts = _quantize(graph, x, spec.activation)
            if shared is not None:
                shared[key] = (x_quantize, x_parts)
        site.qdq.update(x_quantize=x_quantize, x_parts=x_parts)
        x_dequantized = _dequantize(graph, x_parts, spec.activation, dtype)
    return graph.call_function(F.linear, (x_dequantized, w_dequantized, bias))


def _qdq_attention(graph: torch.fx.Graph, site: Site) -> torch.fx.Node:
    fmt = site.spec.activation
    attrs = site.attrs
    operands = {name: site.inputs[name] for name in ("q", "k", "v")}
    if attrs.get("k_transposed"):  # q @ kt with kt stored (..., D, S): SDPA's k is kt^T
        operands["k"] = graph.call_function(torch.transpose, (operands["k"], -2, -1))
    # A scale computed in the graph (a SymFloat) multiplies q: SDPA's `scale` is a float, and a
    # SymFloat passed there would be specialised (Dynamo then compiles the graph again). Inductor
    # fuses the multiply into q's quantization.
    for name, divide in attrs.get("scale_factors", ()):
        operation = operator.truediv if divide else operator.mul
        operands["q"] = graph.call_function(operation, (operands["q"], site.inputs[name]))
    mask = site.inputs["mask"]
    if attrs.get("mask_fill") is not None:  # scores.masked_fill(mask, fill) as SDPA's additive mask
        zeros = graph.call_function(torch.zeros_like, (mask,), {"dtype": attrs["mask_dtype"]})
        mask = graph.call_function(torch.masked_fill, (zeros, mask, attrs["mask_fill"]))
    site.qdq["mask"] = mask
    if site.kernel is Kernel.BLOCK_ATTENTION:
        return _qdq_block_attention(graph, site, operands, mask)
    dequantized = []
    for name, operand in operands.items():
        _, parts = _quantize(graph, operand, fmt)
        site.qdq[f"{name}_parts"] = parts
        dequantized.append(_dequantize(graph, parts, fmt, value_of(site.inputs[name]).dtype))
    kwargs = {"attn_mask": mask, "is_causal": attrs["is_causal"], "scale": attrs["scale"]}
    if attrs["enable_gqa"]:
        kwargs["enable_gqa"] = True
    return graph.call_function(F.scaled_dot_product_attention, tuple(dequantized), kwargs)


def _qdq_block_attention(
    graph: torch.fx.Graph, site: Site, operands: dict[str, torch.fx.Node], mask: torch.fx.Node | None
) -> torch.fx.Node:
    """An attention format (`formats.AttentionFormat`): one `lowbit.block_attention` node over the
    high-precision q, k, v (`q_input`...). Its reference (`reference.attention`: K smoothed, q, k, v
    quantized per token block, attention with quantized probabilities in fp32) is the op's CPU body.
    Not spelled out as quantize / dequantize nodes here: propagating shapes through the per-block
    reshapes of a symbolic sequence length puts guards on it ("blocks != 1"), a second graph for
    lengths within one block under `dynamic=True` (issue 7); the op's fake impl asks nothing."""
    site.qdq.update({f"{name}_input": operand for name, operand in operands.items()})
    attrs = site.attrs
    return graph.call_function(
        torch.ops.lowbit.block_attention.default,
        (
            operands["q"], operands["k"], operands["v"], mask, bool(attrs["is_causal"]), attrs["scale"],
            bool(attrs["enable_gqa"]), site.spec.activation, value_of(site.node).dtype,
        ),
    )  # fmt: skip


def _graph_position(graph: torch.fx.Graph):
    """Sort key: a site's position in the graph, so a shared quantize node (inserted before the first
    site that reads it) precedes every later site that reuses it."""
    position = {node: i for i, node in enumerate(graph.nodes)}
    return lambda site: position[site.node]


def insert_qdq(state: PipelineState) -> None:
    graph = state.gm.graph
    shared: dict = {}  # (activation node, format) -> its quantize node and parts, for later sites
    for site in sorted(state.sites, key=_graph_position(graph)):
        if not site.quantized:
            continue
        with graph.inserting_before(site.node):
            if site.kind is OpKind.ATTENTION:
                replacement = _qdq_attention(graph, site)
            else:
                replacement = _qdq_linear(graph, site, shared)
        replacement.meta.update(
            {k: v for k, v in site.node.meta.items() if k in ("nn_module_stack", "stack_trace", "val")}
        )
        replacement.meta["lowbit_site"] = site.index
        state.replace_node(site.node, replacement)
        site.node = replacement
        site.qdq["op"] = replacement
        for inplace in site.attrs.get("inplace_mask", ()):  # scores.masked_fill_(...): the scores are gone
            graph.erase_node(inplace)
    remove_dead_code(graph)
