"""Stage 4, folded: quantize and pack every weight once, at compile time.

Each weight `quantize` node (whose input is a parameter, possibly transposed) is evaluated here on
the real parameter, and its outputs become new graph inputs that the backend appends to every
call. A weight shared by several sites (tied embeddings, repeated calls) is quantized once.
"""

from __future__ import annotations

import logging
import re
import weakref
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx

from passes.qdq import QUANTIZED_PARTS
from passes.state import PipelineState, quantize_weight, remove_dead_code

log = logging.getLogger("lowbit_compile." + __name__)  # under TORCH_LOGS="+lowbit_compile"


@dataclass(frozen=True)
class FoldedSource:
    """One folded weight: which graph input it comes from, and how it was quantized."""

    input_index: int
    transposed: bool
    fmt: str


def _state(tensor: torch.Tensor) -> tuple[int, int]:
    """What changes when a parameter's values are replaced: its version counter (bumped by in-place
    updates such as `load_state_dict`) and its storage (`p.data = t`)."""
    try:
        version = tensor._version
    except RuntimeError:  # inference-mode tensors keep no version counter
        version = -1
    return version, tensor.data_ptr()


class FoldedWeights:
    """The compile-time quantized weights that the compiled graph takes as its last inputs.

    Dynamo passes parameters as ordinary inputs and does not guard on which tensor they are, so one
    compiled graph can be called with other modules' parameters (layers compiled one by one share
    their code) or with parameters updated since (`load_state_dict`, `p.data = t`). `for_call`
    checks the parameters of each call and quantizes a set it has not seen, or that changed, once.
    One quantized copy is kept per live set of parameters; a set whose parameters were freed is
    dropped. Writes that bypass the version counter (`p.data.copy_(t)`, in-place updates of
    inference-mode tensors) cannot be seen: update weights with `load_state_dict` or under
    `torch.no_grad()` on the parameter itself.
    """

    def __init__(self, sources: list[FoldedSource], parameters: list[torch.Tensor], tensors: list[torch.Tensor]):
        self.sources = sources
        self.tensors = tensors  # the set compiled with (later: the latest), flat: 4 tensors per source
        # id(parameters) -> (weak references to them, their states, their quantized tensors)
        self._sets: dict[tuple[int, ...], tuple[list[weakref.ref], list[tuple[int, int]], list[torch.Tensor]]] = {}
        if sources:
            self._remember(parameters, tensors)

    def _remember(self, parameters: list[torch.Tensor], tensors: list[torch.Tensor]) -> None:
        for key, (references, _, _) in list(self._sets.items()):
            if any(reference() is None for reference in references):
                del self._sets[key]  # those parameters are gone; so is any use of their copy
        references = [weakref.ref(p) for p in parameters]
        self._sets[tuple(id(p) for p in parameters)] = (references, [_state(p) for p in parameters], tensors)

    def for_call(self, args: tuple[Any, ...]) -> list[torch.Tensor]:
        if not self.sources:
            return self.tensors
        parameters = [args[source.input_index] for source in self.sources]
        entry = self._sets.get(tuple(id(p) for p in parameters))
        if entry is not None:
            references, states, tensors = entry
            same = all(r() is p for r, p in zip(references, parameters))
            if same and states == [_state(p) for p in parameters]:
                return tensors
        log.info("parameters differ from the compiled ones: quantizing %d weights for them", len(parameters))
        tensors = [t for s, p in zip(self.sources, parameters) for t in quantize_weight(p, s.transposed, s.fmt)]
        for tensor in tensors:
            if tensor.is_cuda:
                torch._dynamo.mark_static_address(tensor)
        self._remember(parameters, tensors)
        self.tensors = tensors
        return tensors


def _bytes(tensors: list[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def fold_weight_quantization(state: PipelineState) -> None:
    graph = state.gm.graph
    fake_mode = state.fake_mode()
    last_placeholder = state.placeholders()[-1]
    folded: dict[tuple[str, bool, str], list[torch.fx.Node]] = {}
    input_index = {node: i for i, node in enumerate(state.placeholders())}
    sources: list[FoldedSource] = []
    source_parameters: list[torch.Tensor] = []
    tensors_in_order: list[torch.Tensor] = []
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
                tensors_in_order.append(tensor)
            folded[key] = nodes
            sources.append(FoldedSource(input_index[weight], transposed, fmt))
            source_parameters.append(parameter)
            total_before += parameter.numel() * parameter.element_size()
            total_after += _bytes(tensors)
            site.weight_bytes_before = parameter.numel() * parameter.element_size()
            site.weight_bytes_after = _bytes(tensors)
        # else: the weight is shared with an earlier site (tied), which already counts its bytes
        for part_node, new_input in zip(site.qdq["weight_parts"], folded[key]):
            part_node.replace_all_uses_with(new_input)
        site.qdq["weight_parts"] = folded[key]
        del site.qdq["weight_quantize"]
    remove_dead_code(graph)
    state.folded = FoldedWeights(sources, source_parameters, tensors_in_order)
    if folded:
        log.info(
            "quantized %d weights once at compile time: %.2f MiB -> %.2f MiB",
            len(folded),
            total_before / 2**20,
            total_after / 2**20,
        )
