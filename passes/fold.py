"""Stage 4, folded: quantize and pack every weight once, at compile time.

Each weight `quantize` node (whose input is a parameter, possibly transposed) is evaluated here on
the real parameter, and its outputs become new graph inputs that the backend appends to every
call. A weight shared by several sites (tied embeddings, repeated calls) is quantized once.
"""

from __future__ import annotations

import logging
import re

import torch
import torch.fx

from passes.qdq import QUANTIZED_PARTS
from passes.state import PipelineState

log = logging.getLogger("lowbit_compile." + __name__)  # under TORCH_LOGS="+lowbit_compile"


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
        fmt = site.spec.weight
        transposed = site.weight_layout == "kn"
        key = (weight.name, transposed, fmt)
        parameter = state.parameters[weight.name].tensor
        if key not in folded:
            tensors = state.quantized_weight(site)
            nodes = []
            prefix = re.sub(r"\W", "_", f"folded_{site.weight_path}{'_t' if transposed else ''}_{fmt}")
            for part, tensor in zip(QUANTIZED_PARTS, tensors):
                with graph.inserting_after(last_placeholder):
                    node = graph.placeholder(f"{prefix}_{part}")
                node.meta["val"] = fake_mode.from_tensor(tensor, static_shapes=True) if fake_mode else tensor
                node.meta["lowbit_folded"] = f"{site.weight_path} as {fmt} {part}"
                last_placeholder = node
                nodes.append(node)
                state.folded_inputs.append(tensor)
            folded[key] = nodes
            total_before += parameter.numel() * parameter.element_size()
            total_after += _bytes(tensors)
            site.weight_bytes_before = parameter.numel() * parameter.element_size()
            site.weight_bytes_after = _bytes(tensors)
        # else: the weight is shared with an earlier site (tied), which already counts its bytes
        for part_node, new_input in zip(site.qdq["weight_parts"], folded[key]):
            part_node.replace_all_uses_with(new_input)
        site.qdq["weight_parts"] = folded[key]
        del site.qdq["weight_quantize"]
    graph.eliminate_dead_code()
    if folded:
        log.info(
            "quantized %d weights once at compile time: %.2f MiB -> %.2f MiB",
            len(folded),
            total_before / 2**20,
            total_after / 2**20,
        )
