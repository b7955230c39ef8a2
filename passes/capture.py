"""Stage 1, captured: take a private copy of Dynamo's graph and note which inputs are parameters.

Dynamo still reads its own graph's placeholders after the backend returns, so every later stage
works on the copy made here. Parameters arrive as placeholders whose example input is the real
`nn.Parameter`; their module path comes from the placeholder's Dynamo source.
"""

from __future__ import annotations

import copy
import re

import torch
import torch.fx

from lowbit_compile.passes.state import Parameter, PipelineState, remove_dead_code

# The root module: a local (L['self']), a global (G['model']), or a `*args` wrapper's first argument
# (L['args'][0]: transformers >= 5.24 wraps `forward` in such a decorator, so `self` arrives as one).
# Only that index goes: in a local or global list of modules (L['layers'][0]) it names the module.
_SOURCE_ROOT = re.compile(r"^(?:L\['args'\]\[0\]|[LG]\['[^']*'\])\.?")
_SOURCE_KEY = re.compile(r"\[['\"]?([^'\"\]]+)['\"]?\]")
_CONTAINERS = {"_modules", "_parameters", "_buffers"}
_GRAD_MODE_SWITCHES = {torch._C._set_grad_enabled, torch.set_grad_enabled}


def module_path(name: str) -> str:
    """`L['self']._modules['layers']._modules['0']._parameters['weight']` -> `layers.0.weight`.

    Also accepts `nn_module_stack` paths like `L['self'].layers[0].attn`.
    """
    name = _SOURCE_ROOT.sub("", name)
    name = _SOURCE_KEY.sub(lambda m: "." + m.group(1), name)
    parts = [p for p in name.split(".") if p and p not in _CONTAINERS]
    return ".".join(parts)


def _source_name(node: torch.fx.Node) -> str:
    """Dynamo's name for where a placeholder came from (a method on older torch, a property on newer)."""
    name = getattr(getattr(node.meta.get("grapharg"), "source", None), "name", None)
    return name() if callable(name) else name or ""


def _is_parameter(node: torch.fx.Node, value: object) -> bool:
    if isinstance(value, torch.nn.Parameter):
        return True
    text = _source_name(node)
    return isinstance(value, torch.Tensor) and ("_parameters" in text or "_buffers" in text)


def capture_graph(state: PipelineState) -> None:
    """Replace `state.gm` by a dead-code-free copy whose nodes carry `meta["val"]`; record parameters."""
    graph = copy.deepcopy(state.gm.graph)
    # Inference only: the compiled graph runs under no_grad, and a grad mode switched back on inside
    # it (after a @torch.no_grad() helper such as a rotary embedding) would make Inductor trace a
    # backward through ops that have none. Dynamo restores the caller's grad mode itself.
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target in _GRAD_MODE_SWITCHES:
            graph.erase_node(node)
    # Results nobody reads (e.g. a pooler whose output the caller drops) are not sites to quantize.
    remove_dead_code(graph)
    state.gm = torch.fx.GraphModule(state.gm, graph)
    placeholders = state.placeholders()
    for node, value in zip(placeholders, state.example_inputs):
        if _is_parameter(node, value):
            state.parameters[node.name] = Parameter(module_path(_source_name(node)) or node.name, value)
    for node in state.gm.graph.nodes:
        if "val" not in node.meta and "example_value" in node.meta:
            node.meta["val"] = node.meta["example_value"]
