"""Stage 4, folded: quantize and pack every weight once, at compile time.

Each weight `quantize` node (whose input is a parameter, possibly transposed) is evaluated here on
the real parameter, and its outputs become new graph inputs that the backend appends to every
call. A weight shared by several sites (tied embeddings, repeated calls) is quantized once.
"""

from __future__ import annotations

import logging

import torch
import torch.fx

from passes.qdq import QUANTIZED_PARTS
from passes.state import PipelineState

log = logging.getLogger(__name__)


def _bytes(tensors: list[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def fold_weight_quantization(state: PipelineState) -> None:
    graph = state.gm.graph
    fake_mode = state.fake_mode()
    last_placeholder = state.placeholders()[-1]
    folded: dict[tuple[str, bool, str], list[torch.fx.Node]] = {}
    total_before = total_after = 0
    for site in state.sites:
        quantize = site.qdq.get("weight_quantize")
        if quantize is None:
            continue
        weight = site.inputs["weight"]
        transposed = site.weight_layout == "kn"
        fmt = site.spec.weight
        key = (weight.name, transposed, fmt)
        parameter = state.parameters[weight.name].tensor
        if key not in folded:
            with torch.no_grad():
                source = parameter.detach().t() if transposed else parameter.detach()
                tensors = [t.contiguous() for t in torch.ops.lowbit.quantize(source.contiguous(), fmt)]
            nodes = []
            for part, tensor in zip(QUANTIZED_PARTS, tensors):
                with graph.inserting_after(last_placeholder):
                    node = graph.placeholder(f"{site.weight_path.replace('.', '_')}_{fmt}_{part}")
                node.meta["val"] = fake_mode.from_tensor(tensor, static_shapes=True) if fake_mode else tensor
                node.meta["lowbit_folded"] = f"{site.weight_path} as {fmt} {part}"
                last_placeholder = node
                nodes.append(node)
                state.folded_inputs.append(tensor)
            folded[key] = nodes
            total_before += parameter.numel() * parameter.element_size()
            total_after += _bytes(tensors)
            site.weight_bytes_after = _bytes(tensors)
        else:
            site.weight_bytes_after = 0  # shared with an earlier site
        site.weight_bytes_before = parameter.numel() * parameter.element_size()
        for part_node, new_input in zip(site.qdq["weight_parts"], folded[key]):
            part_node.replace_all_uses_with(new_input)
        site.qdq["weight_parts"] = folded[key]
        del site.qdq["weight_quantize"]
    graph.eliminate_dead_code()
    if folded:
        log.info(
            "quantized %d weights once at compile time: %.2f MiB -> %.2f MiB",
            len(folded), total_before / 2**20, total_after / 2**20,
        )
