"""Stage 6, lowered: Inductor compiles the fused graph (Triton on CUDA, C++ on CPU).

`LoweringPass` is installed as Inductor's post-grad custom pass for this compile only (a config
patch, never a global assignment). It records the post-grad graph as the "lowered" stage and its
uuid covers this project's source files and the policy, so Inductor's FX graph cache never hands a
graph compiled under one policy (or one version of our code) to another.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.fx
from torch._guards import detect_fake_mode
from torch._inductor.compile_fx import compile_fx, compile_fx_inner
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

from lowbit_compile.ops import use_device_kernels
from lowbit_compile.passes.state import PipelineState, remove_dead_code

log = logging.getLogger(__name__)  # lowbit_compile.passes.*: under TORCH_LOGS="+lowbit_compile"

_PROJECT_DIRS = (Path(__file__).resolve().parent, Path(__file__).resolve().parent.parent / "lowbit_compile")


@functools.cache
def source_hash() -> str:
    files = tuple(sorted(str(p) for d in _PROJECT_DIRS for p in d.rglob("*.py")))
    return get_hash_for_files(files).hex()


class LoweringPass(CustomGraphPass):
    """Records the post-grad graph Inductor lowers; chains to a pass the user had installed."""

    def __init__(self, policy_key: str, on_graph: Callable[[torch.fx.Graph], None], previous: Any = None) -> None:
        self.policy_key = policy_key
        self.on_graph = on_graph
        self.previous = previous

    def __call__(self, graph: torch.fx.Graph) -> None:
        if self.previous is not None:
            self.previous(graph)
        self.on_graph(graph)

    def uuid(self) -> Any:
        previous = self.previous.uuid() if self.previous is not None else None
        text = f"lowbit:{source_hash()}:{self.policy_key}:{previous}"
        return hashlib.sha256(text.encode()).hexdigest()


_CATS = (torch.cat, torch.concat, torch.ops.aten.cat.default)


def _is_skipped_by_cat(value: Any) -> bool:
    """ATen's cat skips 1-D empty tensors (a `torch.tensor([])` a cache starts from)."""
    # A symbolic length is not compared with 0: that would put a guard on it.
    return isinstance(value, torch.Tensor) and value.dim() == 1 and type(value.shape[0]) is int and value.shape[0] == 0


def keep_eager_cat_layout(graph: torch.fx.Graph) -> int:
    """Write `cat` of one tensor and skipped 1-D empty ones as `clone(x, contiguous_format)`.

    Eager's result is a contiguous copy. Inductor's cat lowering drops the empty inputs and clones
    the one left in its own layout, so a graph output keeps a transposed input's strides (torch
    2.13). Hugging Face's DynamicCache starts each layer as `cat([tensor([]), key_states])`: the
    prefill graph then returned KV caches with other strides than eager's, and Dynamo compiled the
    first decode step (strides from prefill) and the later ones (contiguous, from decode's own cat)
    as two graphs. Returns how many cats were rewritten.
    """
    rewritten = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in _CATS:
            continue
        tensors = node.args[0] if node.args else node.kwargs.get("tensors")
        if not isinstance(tensors, (list, tuple)) or not all(isinstance(t, torch.fx.Node) for t in tensors):
            continue
        kept = [t for t in tensors if not _is_skipped_by_cat(t.meta.get("val"))]
        out, value = node.meta.get("val"), kept[0].meta.get("val") if len(kept) == 1 else None
        # Only where the result is that tensor copied (cat also promotes dtypes over skipped inputs).
        # Sizes are not compared: that could put a guard on a symbolic size.
        if not (isinstance(out, torch.Tensor) and isinstance(value, torch.Tensor)):
            continue
        if out.dtype != value.dtype or out.device != value.device or out.dim() != value.dim():
            continue
        with graph.inserting_before(node):
            clone = graph.call_function(torch.clone, (kept[0],), {"memory_format": torch.contiguous_format})
        clone.meta.update(node.meta)
        node.replace_all_uses_with(clone)
        graph.erase_node(node)
        rewritten += 1
    return rewritten


def mirror_example_values(graph: torch.fx.Graph) -> int:
    """Give every node our stages inserted Dynamo's `example_value` (its `val`), as Dynamo's own
    nodes have. AOTAutograd's cache accepts a `call_method` (a `.view()` Dynamo recorded on a
    projection's output) only on a node with an example value; without it every graph whose fused
    op's output goes on to a method call bypassed the cache ("Unsupported call_method target
    weight_only_mm_triton_default"), and a warm compile traced and hashed the graph again each time.
    Returns how many nodes got one."""
    mirrored = 0
    for node in graph.nodes:
        if "val" in node.meta and "example_value" not in node.meta:
            node.meta["example_value"] = node.meta["val"]
            mirrored += 1
    return mirrored


def lower_with_inductor(
    state: PipelineState,
    on_lowered_graph: Callable[[torch.fx.Graph], None],
    on_output_code: Callable[[str], None],
    config_patches: dict[str, Any] | None = None,
) -> Callable[..., Any]:
    """Compile `state.gm` with Inductor; returns a callable taking the original graph's inputs."""
    previous = torch._inductor.config.post_grad_custom_post_pass
    patches = dict(config_patches or {})
    patches["post_grad_custom_post_pass"] = LoweringPass(state.policy.cache_key(), on_lowered_graph, previous)

    def inner_compile(gm: torch.fx.GraphModule, example_inputs: Any, **kwargs: Any) -> Any:
        compiled = compile_fx_inner(gm, example_inputs, **kwargs)
        source = getattr(compiled, "source_code", None)
        if source:
            on_output_code(source)
        return compiled

    folded = state.folded
    if keep_eager_cat_layout(state.gm.graph):
        remove_dead_code(state.gm.graph)
        state.gm.recompile()
    # Fused ops that a device kernel runs become that kernel's triton_op, so Inductor compiles the
    # kernel's Triton source into the output code (the op layer decides which; see ops.py).
    kernel_counts = use_device_kernels(state.gm.graph)
    if kernel_counts:
        state.gm.recompile()
        log.info("device kernels: %s", kernel_counts)
    mirror_example_values(state.gm.graph)
    # The folded weights have fixed shapes: hand Inductor static fake versions, else it would give
    # them fresh symbolic sizes that no Dynamo source can guard.
    fake_mode = detect_fake_mode()
    folded_examples = [fake_mode.from_tensor(t, static_shapes=True) if fake_mode else t for t in folded.tensors]
    # Static inputs for CUDA graphs (issue 5). Inductor's CUDA graphs neither copy a static input
    # on each replay nor refuse to capture a graph that mutates it (a KV-cache buffer written with
    # index_copy_: else "skipping cudagraphs due to mutated inputs"). The static inputs are
    # aot_autograd's `fw_metadata.static_input_indices`, which it fills only for a GraphModule it
    # recognises as Dynamo's (`_try_get_metadata_from_dynamo`, torch 2.11-2.13 alike): one with
    # meta["dynamo_compile_id"], `_param_name_to_source`, and a `_dynamo_source` on every
    # placeholder; a placeholder is static when its meta["tensor_dict"]["_dynamo_static_input_type"]
    # is set, as Dynamo sets it for module parameters and buffers and mark_static_address'd tensors.
    # Our copy is a plain GraphModule, so nothing was static. Give it Dynamo's metadata: Dynamo's
    # own sources and tensor_dicts for its inputs (node meta is copied with the graph), and
    # "static, no source" for the folded weights (fixed addresses, one set per parameter set).
    # Skipped (nothing static, as before) for a graph that does not come from Dynamo or has
    # attributes whose Dynamo sources we no longer have.
    placeholders = state.placeholders()
    dynamo_inputs = placeholders[: len(state.example_inputs)]
    compile_id = torch._guards.CompileContext.current_compile_id()
    if (
        compile_id is not None
        and all("grapharg" in node.meta for node in dynamo_inputs)
        and next(state.gm.parameters(), None) is None
        and next(state.gm.buffers(), None) is None
    ):
        state.gm.meta["dynamo_compile_id"] = compile_id
        state.gm._param_name_to_source = {}
        for node in dynamo_inputs:
            node._dynamo_source = node.meta["grapharg"].source
        for node in placeholders[len(state.example_inputs) :]:
            node._dynamo_source = None
            node.meta["tensor_dict"] = {"_dynamo_static_input_type": "unguarded"}
    # Inference only: the quantized ops have no autograd formula, so trace and run without grad.
    with torch.no_grad():
        compiled = compile_fx(
            state.gm, [*state.example_inputs, *folded_examples], inner_compile=inner_compile, config_patches=patches
        )

    def run(*args: Any) -> Any:
        with torch.no_grad():
            return compiled(*args, *folded.for_call(args))

    return run
