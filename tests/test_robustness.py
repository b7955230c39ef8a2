"""Models that are not textbook: shared compiled code, weight updates, in-place state, data-dependent
scalars, global models, autocast, and dynamic batch and length."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn as nn
from torch._dynamo.utils import counters

import lowbit_compile
from lowbit_compile.models import LlamaConfig, TinyLlama
from lowbit_compile.report import sqnr
from _modules import Block

FAST = {"inductor": False}


pytestmark = pytest.mark.usefixtures("fresh_dynamo")


@pytest.mark.parametrize("inductor", [False, True])
def test_layers_compiled_one_by_one_use_their_own_weights(inductor: bool) -> None:
    torch.manual_seed(0)
    layers = [Block().eval() for _ in range(3)]
    x = torch.randn(4, 128)
    with torch.no_grad():
        expected = [layer(x) for layer in layers]
        for layer in layers:
            layer.compile(backend="lowbit", options={"policy": "w8a16", "inductor": inductor})
        for _ in range(2):  # the second round must hit the per-layer quantized copies
            for layer, reference in zip(layers, expected):
                assert 30 < sqnr(reference, layer(x)) < 70
    assert counters["stats"]["unique_graphs"] == 1  # one compiled graph serves all three layers


def test_weights_updated_in_place_are_requantized() -> None:
    torch.manual_seed(0)
    model, other = Block().eval(), Block().eval()
    compiled = torch.compile(model, backend="lowbit", options={"policy": "w8a8", **FAST})
    x = torch.randn(4, 128)
    with torch.no_grad():
        compiled(x)
        model.load_state_dict(other.state_dict())
        assert 25 < sqnr(other(x), compiled(x)) < 60


def test_in_place_cache_updates_are_kept() -> None:
    weight = nn.Parameter(torch.randn(64, 128) * 0.05)

    def step(x: torch.Tensor, cache: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        cache.index_copy_(1, position, x)  # a static KV-cache write, whose result nobody reads
        return cache @ weight.t()

    cache, eager_cache = torch.zeros(2, 8, 128), torch.zeros(2, 8, 128)
    x, position = torch.ones(2, 1, 128), torch.tensor([3])
    with torch.no_grad():
        out = torch.compile(step, backend="lowbit", options={"policy": "w8a8", **FAST})(x, cache, position)
        expected = step(x, eager_cache, position)
    assert torch.equal(cache, eager_cache) and cache.sum() == 256
    assert 30 < sqnr(expected, out) < 70


def test_compile_time_report_does_not_apply_input_mutations_twice() -> None:
    linear = nn.Linear(128, 64)

    def f(x: torch.Tensor) -> torch.Tensor:
        return linear(x.add_(1))

    x = torch.zeros(4, 128)
    with torch.no_grad():
        torch.compile(f, backend="lowbit", options={"policy": "w8a8"})(x)
    assert torch.equal(x, torch.ones(4, 128))


def test_data_dependent_scalars_do_not_drop_quantization() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(128, 64)

    def f(x: torch.Tensor, scale: float) -> torch.Tensor:
        return linear(x) * scale

    compiled = torch.compile(f, backend="lowbit", options={"policy": "w8a8", **FAST})
    x = torch.randn(4, 128)
    with torch.no_grad():
        for scale in (0.5, 0.7, 0.9):  # from the second call the float is a graph input (.item())
            quality = sqnr(f(x, scale), compiled(x, scale))
            assert 25 < quality < 70, f"scale {scale}: {quality:.1f} dB (not quantized?)"


def test_dynamic_true_compiles_one_graph_for_every_batch_and_length() -> None:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=256, num_layers=1, num_heads=4,
                         num_kv_heads=2)  # fmt: skip
    model = TinyLlama(config).eval()
    compiled = torch.compile(model, backend="lowbit", dynamic=True, options={"policy": "w8a8", **FAST})
    with torch.no_grad():
        for batch, length in ((2, 5), (3, 17), (2, 33), (4, 40)):
            tokens = torch.randint(0, 128, (batch, length))
            assert 25 < sqnr(model(tokens), compiled(tokens)) < 60
    assert counters["stats"]["unique_graphs"] == 1


def test_default_dynamism_recompiles_once_per_newly_varying_dim() -> None:
    torch.manual_seed(0)
    model = Block().eval()
    compiled = torch.compile(model, backend="lowbit", options={"policy": "w8a8", **FAST})
    with torch.no_grad():
        for batch, length in ((2, 5), (2, 9), (3, 17), (2, 33), (4, 40), (5, 7), (3, 3)):
            x = torch.randn(batch, length, 128)
            assert 25 < sqnr(model(x), compiled(x)) < 70
    # static, then length dynamic, then batch dynamic too: no compile per new size after that.
    assert counters["stats"]["unique_graphs"] == 3


MODEL = nn.Sequential()  # replaced per test; a module-level model reached from a function


def test_a_global_model_gets_module_paths_relative_to_it() -> None:
    global MODEL
    MODEL = nn.Sequential(nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 64))

    def f(x: torch.Tensor) -> torch.Tensor:
        return MODEL(x)

    policy = lowbit_compile.Policy(
        rules=(lowbit_compile.Rule(spec=None, fqn="2"),), default=lowbit_compile.QuantSpec("int8_row")
    )
    report = lowbit_compile.explain(f, torch.randn(3, 128), policy=policy)
    assert [(s.fqn, s.format is not None) for s in report.sites] == [("0", True), ("2", False)]


def _args_wrapper(forward):  # a `*args` decorator: `self` reaches the frame as args[0]
    @functools.wraps(forward)
    def wrapper(*args, **kwargs):
        return forward(*args, **kwargs)

    return wrapper


class WrappedForward(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(128, 128), nn.ReLU())
        self.head = nn.Linear(128, 64)

    @_args_wrapper
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def test_a_forward_wrapped_in_an_args_decorator_keeps_module_paths() -> None:
    """transformers >= 5.24 wraps forward so; Dynamo then names the root module `L['args'][0]`."""
    policy = lowbit_compile.Policy(
        rules=(lowbit_compile.Rule(spec=None, fqn="head"),), default=lowbit_compile.QuantSpec("int8_row")
    )
    report = lowbit_compile.explain(WrappedForward().eval(), torch.randn(3, 128), policy=policy)
    assert [(s.fqn, s.format is not None) for s in report.sites] == [("body.0", True), ("head", False)]


FIRST, SECOND = nn.Linear(128, 128), nn.Linear(128, 64)  # two global roots: both weights read "weight"


def test_two_global_modules_with_the_same_parameter_path_both_fold() -> None:
    def f(x: torch.Tensor) -> torch.Tensor:
        return SECOND(FIRST(x))

    torch.manual_seed(0)
    x = torch.randn(3, 128)
    compiled = torch.compile(f, backend="lowbit", options={"policy": "w8a16", **FAST})
    with torch.no_grad():
        assert 30 < sqnr(f(x), compiled(x)) < 70


def test_modules_in_a_list_argument_keep_their_index() -> None:
    """A list of modules passed in (Dynamo: L['layers'][0]): the index names each one."""
    layers = [nn.Linear(128, 128), nn.Linear(128, 64)]

    def f(x: torch.Tensor, layers: list[nn.Module]) -> torch.Tensor:
        return layers[1](layers[0](x))

    report = lowbit_compile.explain(f, torch.randn(3, 128), layers, policy="w8a16")
    assert sorted(s.fqn for s in report.sites) == ["0", "1"]


@pytest.mark.parametrize("name", ["w8a16", "w8a8", "auto"])
def test_autocast_output_dtype_matches_eager(name: str) -> None:
    torch.manual_seed(0)
    model = Block().eval()
    x = torch.randn(4, 128)
    compiled = torch.compile(model, backend="lowbit", options={"policy": name, **FAST})
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out, expected = compiled(x), model(x)
    assert out.dtype == expected.dtype == torch.bfloat16
    assert 20 < sqnr(expected.float(), out.float()) < 70


def test_compiled_calls_do_not_build_autograd_graphs() -> None:
    """With grad enabled the output gets one node whose backward raises (inference only, issue 9
    item 3; tests/test_user_messages.py), not a graph through the model; under no_grad, none."""
    model = Block()
    compiled = torch.compile(model, backend="lowbit", options={"policy": "w8a16", **FAST})
    with pytest.warns(lowbit_compile.InferenceOnlyWarning):
        out = compiled(torch.randn(2, 128))
    assert type(out.grad_fn).__name__ == "_NoBackwardBackward"
    assert all(fn is None or type(fn).__name__ == "AccumulateGrad" for fn, _ in out.grad_fn.next_functions)
    with torch.no_grad():
        assert compiled(torch.randn(2, 128)).grad_fn is None


class _Rotary(nn.Module):
    @torch.no_grad()  # as Hugging Face's rotary embeddings are
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cos(x)


class _WithNoGradHelper(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rotary = _Rotary()
        self.q = nn.Linear(128, 128)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.q(x) * self.rotary(x)


def test_a_no_grad_helper_inside_the_model_compiles_with_inductor() -> None:
    torch.manual_seed(0)
    model = _WithNoGradHelper().eval()
    x = torch.randn(2, 5, 128)
    out = torch.compile(model, backend="lowbit", options={"policy": "w8a16"})(x)  # grad mode on
    assert 30 < sqnr(model(x).detach(), out) < 70


def _explicit_attention(mask: torch.Tensor, mask_first: bool = False):
    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        scores = (q @ k.transpose(-2, -1)) * 0.125
        scores = mask + scores if mask_first else scores + mask
        return torch.softmax(scores, dim=-1) @ v

    return attend


@pytest.mark.parametrize(
    "mask,mask_first,matched",
    [
        (torch.randn(8, 8), False, True),
        (torch.randn(8, 8), True, True),  # mask + scores
        (torch.rand(8, 8) > 0.5, False, False),  # added as 0/1, which is not SDPA's bool mask
        (torch.randn(3, 2, 4, 8, 8), False, False),  # would enlarge the scores
    ],
)
def test_explicit_attention_masks_match_eager(mask: torch.Tensor, mask_first: bool, matched: bool) -> None:
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 8, 64) for _ in range(3))
    attend = _explicit_attention(mask, mask_first)
    report = lowbit_compile.explain(attend, q, k, v, policy="fp8-attention")
    assert report.counts().get("attention", 0) == int(matched)
    out = torch.compile(attend, backend="lowbit", options={"policy": "fp8-attention", **FAST})(q, k, v)
    expected = attend(q, k, v)
    assert out.shape == expected.shape
    if matched:
        assert 20 < sqnr(expected, out) < 60
    else:  # left as two unquantized matmuls
        torch.testing.assert_close(out, expected)


def test_replaced_parameter_storage_is_requantized() -> None:
    torch.manual_seed(0)
    model = Block().eval()
    compiled = torch.compile(model, backend="lowbit", options={"policy": "w8a16", **FAST})
    x = torch.randn(4, 128)
    with torch.no_grad():
        compiled(x)
        model.fc.weight.data = torch.randn(128, 128)  # no version bump, new storage
        assert 30 < sqnr(model(x), compiled(x)) < 70


def test_quantized_copies_of_freed_parameters_are_dropped() -> None:
    import gc
    import weakref

    compiled = torch.compile(lambda m, x: m(x), backend="lowbit", options={"policy": "w8a16", **FAST})
    x = torch.randn(4, 128)
    references = []
    with torch.no_grad():
        for _ in range(4):
            block = Block().eval()
            references.append(weakref.ref(block.fc.weight))
            assert 30 < sqnr(block(x), compiled(block, x)) < 70
            del block
    gc.collect()
    assert sum(reference() is not None for reference in references) <= 1  # at most the last one


def test_out_and_positional_inplace_writes_are_kept() -> None:
    linear = nn.Linear(128, 64)

    def f(x: torch.Tensor, cache: torch.Tensor, buffer: torch.Tensor) -> torch.Tensor:
        torch.mul(x, 2, out=cache)
        torch.nn.functional.relu(buffer, True)
        return linear(x)

    x = torch.randn(4, 128)
    cache, buffer = torch.zeros(4, 128), torch.randn(16)
    expected_buffer = buffer.clamp(min=0)
    with torch.no_grad():
        torch.compile(f, backend="lowbit", options={"policy": "w8a8", **FAST})(x, cache, buffer)
    assert torch.equal(cache, 2 * x) and torch.equal(buffer, expected_buffer)


class _SelfUpdating(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("weight", torch.randn(64, 128))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.weight.mul_(2)
        return torch.nn.functional.linear(x, self.weight)


def test_a_weight_updated_inside_the_graph_is_not_folded() -> None:
    torch.manual_seed(0)
    model, twin = _SelfUpdating(), _SelfUpdating()
    twin.load_state_dict(model.state_dict())
    x = torch.randn(4, 128)
    report = lowbit_compile.explain(_SelfUpdating(), x, policy="w8a16")
    assert "updated in place inside the graph" in report.sites[0].skip_reason
    with torch.no_grad():
        out = torch.compile(model, backend="lowbit", options={"policy": "w8a16", **FAST})(x)
        assert torch.allclose(out, twin(x))


def test_report_json_keeps_infinite_sqnr_and_dumps_never_overwrite(tmp_path) -> None:
    import json

    model = nn.Linear(128, 64)
    x = torch.zeros(2, 128)  # output = bias exactly: the quantized site is identical -> inf dB
    report = lowbit_compile.explain(model, x, policy="w8a16")
    assert json.loads(report.to_json())["sites"][0]["sqnr_db"] == "inf"
    for _ in range(2):
        torch._dynamo.reset()  # compile ids restart
        torch.compile(model, backend="lowbit", options={"dump_dir": str(tmp_path), **FAST})(x)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["graph_0_0", "graph_0_0.1"]
    # explain() and a compile of the same graph id are told apart by their headers (issue 9 item 8)
    torch._dynamo.reset()
    explained = tmp_path / "explained"
    lowbit_compile.explain(model, x, policy="w8a16")  # no dump dir: nothing written
    with torch._dynamo.config.patch({}):
        import os

        os.environ["LOWBIT_DUMP_DIR"] = str(explained)
        try:
            lowbit_compile.explain(model, x, policy="w8a16", sensitivity=False)
        finally:
            del os.environ["LOWBIT_DUMP_DIR"]
    (dump,) = explained.iterdir()
    assert "# made by: lowbit_compile.explain()" in (dump / "05_fused.py").read_text()
    assert "made by: lowbit_compile.explain()" in (dump / "00_about.txt").read_text()
    assert "# made by: torch.compile(backend='lowbit')" in (tmp_path / "graph_0_0" / "01_captured.py").read_text()
