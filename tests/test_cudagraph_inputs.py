"""CUDA graphs and in-place-updated buffers (issue 5): which graph inputs Inductor treats as static.

Inductor's CUDA graphs copy every non-static input into the graph's own memory on each replay and
refuse to capture a graph that mutates a non-static input ("skipping cudagraphs due to mutated
inputs"). Static inputs are the `static_input_idxs` that `compile_fx` hands `compile_fx_inner`,
which come from aot_autograd's `fw_metadata.static_input_indices`. That decision is made on any
device, so the CPU tests observe it directly: a static KV cache written with `index_copy_` must be
static, and so must the parameters and the folded (quantized) weights; only the tokens and
positions are copied. The GPU test checks the outcome: CUDA graphs captured, none skipped.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch._dynamo.utils import counters
from torch._inductor.compile_fx import compile_fx, compile_fx_inner
from torch._inductor.cudagraph_utils import check_for_mutation_ignore_cuda_graph_managed_tensor

import lowbit_compile.passes.lower
from lowbit_compile.models import LlamaConfig, StaticCacheLlama
from lowbit_compile.report import sqnr

pytestmark = pytest.mark.usefixtures("fresh_dynamo")

CONFIG = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_layers=1, num_heads=8, num_kv_heads=2)
MAX_LEN = 64
PREFILL = 8
QUANTIZED_LINEARS = CONFIG.num_layers * 7 + 1  # q, k, v, o, gate, up, down per layer, and lm_head


def _model(batch: int = 2, device: str = "cpu", dtype: torch.dtype = torch.float32) -> StaticCacheLlama:
    torch.manual_seed(0)
    model = StaticCacheLlama(CONFIG).eval().to(device, dtype)
    model.allocate_cache(batch, MAX_LEN)
    return model


def _steps(batch: int, device: str, decode_steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(tokens, positions) for one prefill and `decode_steps` single-token steps."""
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, CONFIG.vocab_size, (batch, PREFILL + decode_steps), generator=generator).to(device)
    steps = [(tokens[:, :PREFILL], torch.arange(PREFILL, device=device))]
    for position in range(PREFILL, PREFILL + decode_steps):
        steps.append((tokens[:, position : position + 1].contiguous(), torch.tensor([position], device=device)))
    return steps


class _Spy:
    """Stands in for `compile_fx_inner` and records what Inductor is told about each graph."""

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def __call__(self, gm: torch.fx.GraphModule, example_inputs, **kwargs):
        compiled = compile_fx_inner(gm, example_inputs, **kwargs)
        static = list(kwargs.get("static_input_idxs") or ())
        self.calls.append(
            {
                "inputs": list(example_inputs),
                "static": static,
                "mutated": sorted(compiled.mutated_input_idxs),
                # The test the CUDA-graph tree applies before capturing (None: nothing blocks it).
                "mutation_blocks_cudagraphs": check_for_mutation_ignore_cuda_graph_managed_tensor(
                    gm, compiled.mutated_inputs, compiled.mutated_input_idxs, static
                ),
            }
        )
        return compiled


def _run_lowbit(monkeypatch: pytest.MonkeyPatch, model: StaticCacheLlama, steps, policy: str = "w8a16"):
    spy = _Spy()
    monkeypatch.setattr(lowbit_compile.passes.lower, "compile_fx_inner", spy)
    compiled = torch.compile(model, backend="lowbit", options={"policy": policy})
    with torch._inductor.config.patch(force_disable_caches=True), torch.no_grad():
        outputs = [compiled(tokens, positions) for tokens, positions in steps]
    return spy.calls, outputs


def test_cache_buffers_parameters_and_folded_weights_are_static_inputs(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model()
    reference = copy.deepcopy(model)
    steps = _steps(2, "cpu", decode_steps=3)
    with torch.no_grad():
        expected = [reference(tokens, positions) for tokens, positions in steps]
    calls, outputs = _run_lowbit(monkeypatch, model, steps)
    assert len(calls) == 2  # prefill, then one graph for every decode step
    for call in calls:
        inputs, static = call["inputs"], set(call["static"])
        tensors = {i for i, x in enumerate(inputs) if isinstance(x, torch.Tensor)}
        # Only the tokens and the positions (int64) are per-call inputs; everything else is static:
        # parameters, the KV-cache buffers, and the folded quantized weights appended after them.
        assert tensors - static == {i for i in tensors if inputs[i].dtype == torch.int64}
        assert len(tensors - static) == 2
        folded_data = [i for i in tensors if inputs[i].dtype == torch.int8]
        assert len(folded_data) == QUANTIZED_LINEARS and set(folded_data) <= static
        # The graph writes the K and V cache of every layer, and those writes do not block capture.
        assert len(call["mutated"]) == 2 * CONFIG.num_layers
        assert set(call["mutated"]) <= static
        assert call["mutation_blocks_cudagraphs"] is None
    # And it still computes the right thing, writing the module's own cache buffers in place.
    for want, got in zip(expected, outputs):
        assert 25 < sqnr(want, got) < 80
    written = PREFILL + 3
    for ours, theirs in zip(model.layers, reference.layers):
        assert 25 < sqnr(theirs.attn.k_cache[:, :, :written], ours.attn.k_cache[:, :, :written]) < 80
        assert ours.attn.v_cache[:, :, written:].abs().max() == 0


def test_lowbit_marks_the_same_dynamo_inputs_static_as_plain_inductor(monkeypatch: pytest.MonkeyPatch) -> None:
    model, steps = _model(), _steps(2, "cpu", decode_steps=0)
    plain = _Spy()
    compiled = torch.compile(model, backend=lambda gm, inputs: compile_fx(gm, inputs, inner_compile=plain))
    with torch._inductor.config.patch(force_disable_caches=True), torch.no_grad():
        compiled(*steps[0])
    torch._dynamo.reset()
    (ours,), _ = _run_lowbit(monkeypatch, model, steps)
    (theirs,) = plain.calls
    dynamo_inputs = len(theirs["inputs"])  # ours are Dynamo's inputs, then the folded weights
    assert len(ours["inputs"]) == dynamo_inputs + 4 * QUANTIZED_LINEARS
    assert [i for i in ours["static"] if i < dynamo_inputs] == sorted(theirs["static"])
    assert ours["mutated"] == theirs["mutated"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize(
    "policy, batch, floor",
    # w4a16 at batch 1: decode runs the K-major int4 GEMV, whose split-K counters live in the folded
    # scales (written and reset inside every call, under capture too)
    [("w8a16", 2, 25), ("w4a16", 1, 10)],
)
def test_static_kv_cache_decode_runs_in_cuda_graphs(
    monkeypatch: pytest.MonkeyPatch, policy: str, batch: int, floor: float
) -> None:
    monkeypatch.setenv("LOWBIT_INT4_KMAJOR", "1")  # int4 folds K-major (opt-in, ops.weight_packing)
    model = _model(batch=batch, device="cuda", dtype=torch.bfloat16)
    reference = copy.deepcopy(model)
    steps = _steps(batch, "cuda", decode_steps=6)
    options = {"policy": policy, "inductor_config": {"triton.cudagraphs": True}}
    compiled = torch.compile(model, backend="lowbit", options=options)
    with torch.no_grad():
        for tokens, positions in steps:
            expected = reference(tokens, positions)
            torch.compiler.cudagraph_mark_step_begin()
            got = compiled(tokens, positions)
            assert floor < sqnr(expected, got) < 60
    assert counters["inductor"]["cudagraph_skips"] == 0
    # The decode graph was captured (the prefill, run once, only warms up), copying the tokens and
    # positions on replay, never the weights, folded weights or caches (40+ inputs per capture).
    recorded = counters["inductor"]["cudagraph_recorded_non_static_inputs"]
    assert 0 < recorded <= 8
    assert counters["stats"]["unique_graphs"] == 2
    written = PREFILL + 6
    for ours, theirs in zip(model.layers, reference.layers):
        assert floor - 5 < sqnr(theirs.attn.k_cache[:, :, :written].float(), ours.attn.k_cache[:, :, :written].float())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_plain_inductor_control_captures_the_same_model() -> None:
    # The reference behaviour the lowbit test above must match (mode="reduce-overhead").
    model = _model(batch=2, device="cuda", dtype=torch.bfloat16)
    compiled = torch.compile(model, mode="reduce-overhead")
    with torch.no_grad():
        for tokens, positions in _steps(2, "cuda", decode_steps=4):
            torch.compiler.cudagraph_mark_step_begin()
            compiled(tokens, positions)
    assert counters["inductor"]["cudagraph_skips"] == 0
    assert counters["inductor"]["cudagraph_recorded_non_static_inputs"] > 0
