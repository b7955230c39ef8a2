"""Fuzzed modules through backend="lowbit" (issue 9, item 9), on CPU and bounded for CI.

Random small modules built from linear / einsum / activation matmul / SDPA / explicit attention,
with random sizes (odd K, batch and length including 1), dtypes and recipes. For each: the compiled
output (Inductor) equals the `qdq` stage's output (the numerical reference) to within what their
different rounding allows, no NaN comes out of finite input, and every site is quantized or carries
a skip reason. Modules with no matmul, convolutions and graph breaks must compile and run too.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lowbit_compile
from lowbit_compile.backend import BackendOptions, compile_graph
from lowbit_compile.report import sqnr

FUZZ = settings(
    max_examples=30, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
BLOCKS = ("linear", "einsum", "matmul", "sdpa", "explicit")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class Fuzzed(nn.Module):
    def __init__(self, blocks: list[str], width: int, heads: int) -> None:
        super().__init__()
        self.blocks = blocks
        self.heads = heads
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in blocks)
        self.qkv = nn.ModuleList(nn.Linear(width, 3 * width, bias=False) for _ in blocks)
        self.w = nn.Parameter(torch.randn(width, width) / math.sqrt(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        for block, layer, qkv in zip(self.blocks, self.layers, self.qkv):
            if block == "linear":
                x = torch.relu(layer(x))
            elif block == "einsum":
                x = torch.einsum("blk,nk->bln", x, self.w)
            elif block == "matmul":
                x = torch.softmax(x @ x.transpose(-1, -2) / width, dim=-1) @ x
            else:
                q, k, v = qkv(x).view(batch, length, 3, self.heads, width // self.heads).unbind(2)
                q, k, v = (t.transpose(1, 2) for t in (q, k, v))
                if block == "sdpa":
                    a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
                else:
                    scores = q @ k.transpose(-1, -2) / math.sqrt(width // self.heads)
                    a = torch.softmax(scores, dim=-1) @ v
                x = x + a.transpose(1, 2).reshape(batch, length, width)
        return x


def _compile_with_reference(model: nn.Module, x: torch.Tensor, policy: str):
    """(compiled output, qdq-stage output, reports) for one call."""
    options = BackendOptions.parse({"policy": policy, "compute_sqnr": False})
    references, reports = [], []

    def keep_qdq(stage, state):
        if stage == "qdq":
            with torch.no_grad():
                references.append(state.gm(*state.example_inputs))

    def backend(gm, example_inputs):
        return compile_graph(gm, example_inputs, options, on_report=reports.append, on_stage_state=keep_qdq)

    torch._dynamo.reset()
    try:
        with torch.no_grad():
            out = torch.compile(model, backend=backend, dynamic=False)(x)
    finally:
        torch._dynamo.reset()
    return out, references, reports


def _first(output):
    return output[0] if isinstance(output, (tuple, list)) else output


@FUZZ
@given(
    blocks=st.lists(st.sampled_from(BLOCKS), min_size=1, max_size=3),
    width=st.sampled_from([32, 48, 64, 96]),
    heads=st.sampled_from([1, 2, 4]),
    batch=st.sampled_from([1, 2, 3]),
    length=st.sampled_from([1, 5, 8]),
    dtype=st.sampled_from(DTYPES),
    recipe=st.sampled_from(list(lowbit_compile.RECIPES)),
    seed=st.integers(0, 2**16),
)
def test_fuzzed_modules_match_their_qdq_reference(blocks, width, heads, batch, length, dtype, recipe, seed) -> None:
    torch.manual_seed(seed)
    model = Fuzzed(blocks, width, heads).to(dtype).eval()
    x = torch.randn(batch, length, width, dtype=dtype)
    out, references, reports = _compile_with_reference(model, x, recipe)
    assert len(references) == 1, "one graph, one qdq reference"
    reference = _first(references[0])
    assert torch.isfinite(out).all(), (recipe, blocks, dtype)
    assert out.shape == reference.shape and out.dtype == reference.dtype
    # Same quantized math, different rounding order (fused fp32 accumulation vs. the q/dq graph in
    # the model's dtype): ~bf16 rounding, plus rare activation codes one step apart.
    floor = {torch.float32: 35.0, torch.float16: 30.0, torch.bfloat16: 25.0}[dtype]
    assert sqnr(reference.float(), out.float()) > floor, (recipe, blocks, dtype, batch, length)
    for report in reports:
        for site in report.sites:
            assert site.format is not None or site.skip_reason, site


class _ConvOnly(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return self.conv(x).relu()


class _EmbeddingOnly(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 16)

    def forward(self, ids):
        return self.embed(ids).sum(-1)


class _GraphBreak(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(64, 64), nn.Linear(64, 32)

    def forward(self, x):
        x = self.a(x)
        torch._dynamo.graph_break()
        return self.b(x)


@pytest.mark.parametrize(
    "model, x",
    [
        (_ConvOnly(), torch.randn(2, 3, 8, 8)),
        (_EmbeddingOnly(), torch.randint(0, 50, (2, 5))),
        (_GraphBreak(), torch.randn(3, 64)),
        (nn.Sequential(nn.ReLU()), torch.randn(4, 4)),
    ],
    ids=["conv", "embedding", "graph_break", "no_matmul"],
)
@pytest.mark.parametrize("recipe", ["w8a16", "w4a16", "fp8", "auto"])
def test_modules_without_matmuls_or_with_graph_breaks_compile_and_run(model, x, recipe) -> None:
    model = model.eval()
    out, references, reports = _compile_with_reference(model, x, recipe)
    with torch.no_grad():
        expected = model(x)
    assert torch.isfinite(out).all()
    assert sqnr(expected.float(), out.float()) > 20
    assert len(references) == len(reports) >= 1
