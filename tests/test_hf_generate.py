"""Hugging Face `generate()` through backend="lowbit" (issue 9, item 2): greedy tokens equal eager's
with w8a16, and the backend compiles exactly the graphs Dynamo alone (`backend="eager"`) compiles.

Prefill + decode at batch 1 and 16 (4 prompts, 4 new tokens each) compile, on torch 2.13 with
transformers' DynamicCache: 4 graphs with `dynamic=True` and 6 by default, for Dynamo alone and for
`lowbit` (plain Inductor: 6 and 8). The issue's target of 2 is not met; the 4 are HF's prefill and
decode branches (an empty vs a filled cache) times Dynamo's size-1 specialisation of the batch, and
no Dynamo setting removes the latter for this model without graph breaks (DESIGN-NOTES.md,
"Recompiles in a generate() loop"). The counts below are the measured ones, so a regression fails.

The model's linear weights are put on the int8 per-channel grid first, so w8a16 stores them
exactly: the compiled tokens then differ from eager's only through fp32 summation order, not
through quantization noise, which on random weights flips near-tied greedy choices (measured: 24
of 382 tokens) and would make the comparison a test of the seed.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from lowbit_compile.passes.lower import keep_eager_cat_layout
from lowbit_compile.reference import fake_quantize

transformers = pytest.importorskip("transformers")


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=256,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.copy_(fake_quantize(module.weight, "int8_row"))
    return model


SHAPES = ((1, 9), (16, 9), (1, 13), (16, 5))
# Measured on torch 2.13 (transformers 5.x): Dynamo's own graphs for this loop, per `dynamic=`.
GRAPHS = {True: 4, None: 6}


def _generate(model, backend: str | None, dynamic: bool | None = None, **options):
    torch._dynamo.reset()
    counters.clear()
    forward = model.forward
    if backend is not None:
        model.forward = torch.compile(forward, backend=backend, dynamic=dynamic, **options)
    torch.manual_seed(1)
    outputs = []
    try:
        with torch.no_grad():
            for batch, length in SHAPES:
                ids = torch.randint(0, 256, (batch, length))
                outputs.append(model.generate(ids, max_new_tokens=4, do_sample=False))
    finally:
        model.forward = forward
        torch._dynamo.reset()
    return outputs, counters["stats"]["unique_graphs"]


@pytest.mark.slow
@pytest.mark.parametrize("dynamic", [True, None], ids=["dynamic", "default"])
def test_generate_w8a16_tokens_equal_eager_on_dynamos_graphs(dynamic) -> None:
    model = _model()
    reference, _ = _generate(model, None)
    _, dynamo_graphs = _generate(model, "eager", dynamic)
    tokens, graphs = _generate(model, "lowbit", dynamic, options={"policy": "w8a16", "compute_sqnr": False})
    for got, expected in zip(tokens, reference):
        assert torch.equal(got, expected)
    # The backend adds no graph of its own (no guard on a size), and the prefill's KV cache keeps
    # eager's strides, so decode does not compile twice as under plain Inductor.
    assert graphs == dynamo_graphs, (graphs, dynamo_graphs)
    assert graphs <= GRAPHS[dynamic], (graphs, GRAPHS[dynamic])


def test_cat_onto_empty_cache_keeps_eager_strides() -> None:
    """HF's DynamicCache starts as `cat([tensor([]), k])` with k transposed: eager returns a
    contiguous copy, Inductor's cat lowering (torch 2.13) returns k's transposed layout."""

    class Layer(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.k_proj = torch.nn.Linear(64, 64, bias=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            k = self.k_proj(x).view(x.shape[0], x.shape[1], 2, 32).transpose(1, 2)
            return torch.cat([torch.tensor([], dtype=k.dtype), k], dim=-2)

    layer = Layer().eval()
    x = torch.randn(3, 9, 64)
    torch._dynamo.reset()
    try:
        with torch.no_grad():
            expected = layer(x)
            got = torch.compile(layer, backend="lowbit", dynamic=True)(x)
    finally:
        torch._dynamo.reset()
    assert got.stride() == expected.stride() == (576, 288, 32, 1)
    torch.testing.assert_close(got, expected, rtol=2e-2, atol=2e-2)


def test_keep_eager_cat_layout_only_rewrites_cat_of_one_tensor() -> None:
    def f(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        empty = torch.tensor([])
        return torch.cat([empty, x], dim=-2), torch.cat([x, y], dim=-2), torch.cat([empty, x.half()], dim=0)

    x, y = torch.randn(2, 3, 4), torch.randn(2, 5, 4)
    gm = torch.fx.symbolic_trace(f)

    class Record(torch.fx.Interpreter):  # meta["val"] as the pipeline has it (real values here)
        def run_node(self, node: torch.fx.Node):
            node.meta["val"] = super().run_node(node)
            return node.meta["val"]

    Record(gm).run(x, y)
    # The first cat is x copied; the second joins two tensors; the third promotes half to float.
    assert keep_eager_cat_layout(gm.graph) == 1
    gm.recompile()
    for got, expected in zip(gm(x, y), f(x, y)):
        assert torch.equal(got, expected) and got.dtype == expected.dtype
