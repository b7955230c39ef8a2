"""GPU suite (`pytest -m gpu`): the same pipeline through Inductor's Triton backend on CUDA, in bf16.

No device kernels are registered yet, so the fused ops run their reference implementations on the
GPU: this checks that everything compiles, runs and stays correct there, not that it is fast.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters
from torch.testing import FileCheck

from lowbit_compile.models import LlamaConfig, TinyLlama
from lowbit_compile.report import sqnr
from lowbit_compile.testing import run_and_get_graphs

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.usefixtures("fresh_dynamo"),
]

LLAMA = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_layers=2, num_heads=8, num_kv_heads=2)
# logits SQNR bands (dB) against eager bf16; bf16 itself limits the top end.
BANDS = {
    "w8a16": (25, 60),
    "w8a8": (20, 50),
    "fp8": (15, 40),
    "w4a16": (8, 35),
    "fp8-block": (15, 40),
    "mxfp8": (12, 40),
    "nvfp4": (5, 30),
    "fp8-attention": (12, 40),
    "auto": (20, 60),
}


def _llama():
    torch.manual_seed(0)
    model = TinyLlama(LLAMA).eval().to("cuda", torch.bfloat16)
    return model, torch.randint(0, LLAMA.vocab_size, (2, 64), device="cuda")


@pytest.mark.parametrize("name", list(BANDS))
def test_recipes_compile_to_triton_and_match_eager(name: str) -> None:
    model, tokens = _llama()
    with torch.no_grad():
        expected = model(tokens)
    logits, graphs = run_and_get_graphs(model, tokens, policy=name)
    low, high = BANDS[name]
    quality = sqnr(expected, logits)
    print(f"{name}: logits SQNR {quality:.1f} dB")
    assert low < quality < high
    assert logits.dtype == torch.bfloat16 and logits.is_cuda
    FileCheck().check("@triton.jit").run(graphs["output_code"])
    assert "15/17 sites quantized" in graphs["report"] or "17/17 sites quantized" in graphs["report"]


def test_dynamic_lengths_and_cuda_graphs() -> None:
    model, _ = _llama()
    compiled = torch.compile(
        model, backend="lowbit", options={"policy": "w8a8", "inductor_config": {"triton.cudagraphs": True}}
    )
    with torch.no_grad():
        for length in (7, 19, 64, 200, 33):
            tokens = torch.randint(0, LLAMA.vocab_size, (2, length), device="cuda")
            assert 20 < sqnr(model(tokens), compiled(tokens)) < 50
    assert counters["stats"]["unique_graphs"] == 2


def test_reduce_overhead_mode_captures_cuda_graphs_with_static_folded_weights() -> None:
    """Serving users compile decode with `mode="reduce-overhead"` (issue 9 item 1): CUDA graphs are
    captured (no skips) and replayed, and the folded weights are not copied as inputs."""
    model, _ = _llama()
    counters.clear()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="lowbit", options={"policy": "w8a16", "mode": "reduce-overhead"})
    with torch.no_grad():
        for _ in range(3):
            tokens = torch.randint(0, LLAMA.vocab_size, (1, 16), device="cuda")
            assert 20 < sqnr(model(tokens), compiled(tokens)) < 60
    assert counters["inductor"]["cudagraph_skips"] == 0
    assert counters["inductor"]["cudagraph_recorded_non_static_inputs"] <= 2  # the tokens, not weights


class _Block(torch.nn.Module):
    # A module of our own: Dynamo does not trace a bare nn.Linear compiled with Module.compile().
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(256, 256)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.fc(x))


def test_layers_compiled_one_by_one_with_cuda_graphs_use_their_own_weights() -> None:
    torch.manual_seed(0)
    layers = [_Block().to("cuda", torch.bfloat16).eval() for _ in range(3)]
    x = torch.randn(8, 256, device="cuda", dtype=torch.bfloat16)
    options = {"policy": "w8a8", "inductor_config": {"triton.cudagraphs": True}}
    with torch.no_grad():
        expected = [layer(x) for layer in layers]
        for layer in layers:
            layer.compile(backend="lowbit", options=options)
        for _ in range(3):
            for layer, reference in zip(layers, expected):
                assert 25 < sqnr(reference, layer(x)) < 60
    assert counters["stats"]["unique_graphs"] == 1


@pytest.mark.parametrize("name", ["w4a16", "fp8", "fp8-attention"])
def test_warm_compile_is_served_by_aot_autograd_cache(name: str, tmp_path, monkeypatch) -> None:
    # Every graph of a real model has a method call (`.view`) on a fused op's output; AOTAutograd's
    # cache bypassed those graphs until our nodes carried `example_value` (issue 5, warm compile).
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "triton"))
    monkeypatch.setenv("LOWBIT_CACHE_DIR", str(tmp_path / "lowbit"))
    from _caches import compile_with_caches

    model, tokens = _llama()
    first, logits_first = compile_with_caches(model, tokens, options={"policy": name})
    assert first.get("autograd_cache_bypass", 0) == 0, first
    second, logits_second = compile_with_caches(model, tokens, options={"policy": name})
    assert second.get("autograd_cache_hit", 0) >= 1 and second.get("autograd_cache_miss", 0) == 0, second
    torch.testing.assert_close(logits_second, logits_first, rtol=0, atol=0)
