"""Hugging Face `generate()` through backend="lowbit" (issue 9, item 2): greedy tokens equal eager's
with w8a16, and the backend compiles no more graphs than plain Inductor does for the same loop.

Dynamo alone (`backend="eager"`) compiles 4 graphs for prefill + decode at batch 1 and 16 with
`dynamic=True` (size-1 specialisation x HF's prefill/decode branch), plain Inductor 6; the issue's
target of 2 needs Dynamo to stop specialising size 1 and is not met (README, DESIGN-NOTES).

The model's linear weights are put on the int8 per-channel grid first, so w8a16 stores them
exactly: the compiled tokens then differ from eager's only through fp32 summation order, not
through quantization noise, which on random weights flips near-tied greedy choices (measured: 24
of 382 tokens) and would make the comparison a test of the seed.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

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


def _generate(model, backend: str | None, **options):
    torch._dynamo.reset()
    counters.clear()
    forward = model.forward
    if backend is not None:
        model.forward = torch.compile(forward, backend=backend, dynamic=True, **options)
    torch.manual_seed(1)
    outputs = []
    try:
        with torch.no_grad():
            for batch, length in SHAPES:
                ids = torch.randint(0, 256, (batch, length))
                outputs.append(model.generate(ids, max_new_tokens=4, do_sample=False))
    finally:
        model.forward = forward
    return outputs, counters["stats"]["unique_graphs"]


@pytest.mark.slow
def test_generate_w8a16_tokens_equal_eager_and_no_extra_graphs() -> None:
    model = _model()
    reference, _ = _generate(model, None)
    _, inductor_graphs = _generate(model, "inductor")
    tokens, graphs = _generate(model, "lowbit", options={"policy": "w8a16", "compute_sqnr": False})
    for got, expected in zip(tokens, reference):
        assert torch.equal(got, expected)
    assert graphs <= inductor_graphs, (graphs, inductor_graphs)
    torch._dynamo.reset()
