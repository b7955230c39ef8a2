"""The per-call check of folded weights (`FoldedWeights.for_call`) and the `release_weights` option.

The check must stay safe while being cheap: each distinct set of parameters is quantized once, when
first seen; an updated set (load_state_dict, in-place writes under no_grad, `p.data = t`) is
quantized again; a freed set is dropped (its ids may be reused by new objects). With
release_weights=True the original weights of folded sites are freed once quantized; the compiled
graph keeps running on the packed copies, and whatever would need the originals says so, naming
the option.
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
import torch.nn as nn
from torch._dynamo.utils import counters

import lowbit_compile.passes.fold
from lowbit_compile.report import sqnr
from lowbit_compile.passes.fold import FoldedSource, FoldedWeights
from lowbit_compile.passes.state import quantize_weight
from _modules import Block

pytestmark = pytest.mark.usefixtures("fresh_dynamo")

FMT = "int8_row"


def _parameters(n: int = 3, seed: int = 0) -> list[nn.Parameter]:
    generator = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(16, 32, generator=generator)) for _ in range(n)]


def _args(parameters: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """Dynamo-like call arguments: an activation first, then the parameters."""
    return (torch.randn(2, 32), *parameters)


class _Counting:
    """FoldedWeights over 3 parameters, counting the weights it quantizes."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, parameters: list[nn.Parameter]) -> None:
        self.quantized: list[int] = []  # ids: holding the parameters would keep them alive

        def counting(parameter: torch.Tensor, transposed: bool, fmt: str, search: bool = True) -> list[torch.Tensor]:
            self.quantized.append(id(parameter))
            return quantize_weight(parameter, transposed, fmt, search)

        monkeypatch.setattr(lowbit_compile.passes.fold, "quantize_weight", counting)
        sources = [FoldedSource(i + 1, False, FMT, f"w{i}") for i in range(len(parameters))]
        tensors = [t for p in parameters for t in quantize_weight(p, False, FMT)]
        self.folded = FoldedWeights(sources, parameters, tensors)

    def data(self, args: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
        """The quantized data (int8) of each weight, for this call."""
        return self.folded.for_call(args)[0::4]


def _expected(parameter: torch.Tensor) -> torch.Tensor:
    return quantize_weight(parameter, False, FMT)[0]


def _ids(tensors: list[torch.Tensor]) -> list[int]:
    return [id(t) for t in tensors]


def test_the_same_set_is_never_quantized_again(monkeypatch: pytest.MonkeyPatch) -> None:
    parameters = _parameters()
    folded = _Counting(monkeypatch, parameters)
    args = _args(parameters)
    first = folded.folded.for_call(args)
    for _ in range(3):
        assert folded.folded.for_call(args) is first
    assert folded.quantized == []


def test_two_sets_taking_turns_are_each_quantized_once(monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = _parameters(seed=0), _parameters(seed=1)
    folded = _Counting(monkeypatch, a)
    for _ in range(3):
        assert all(torch.equal(d, _expected(p)) for d, p in zip(folded.data(_args(a)), a))
        assert all(torch.equal(d, _expected(p)) for d, p in zip(folded.data(_args(b)), b))
    assert folded.quantized == _ids(b)  # the second set, once; the first was quantized at compile time


def test_a_set_sharing_some_parameters_is_a_new_set(monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = _parameters(seed=0), _parameters(seed=1)
    mixed = [a[0], b[1], a[2]]
    folded = _Counting(monkeypatch, a)
    folded.data(_args(a))
    assert all(torch.equal(d, _expected(p)) for d, p in zip(folded.data(_args(mixed)), mixed))
    assert len(folded.quantized) == 3


@pytest.mark.parametrize("update", ["load_state_dict", "in_place_no_grad", "data_assignment"])
def test_updated_parameters_are_quantized_again(monkeypatch: pytest.MonkeyPatch, update: str) -> None:
    module = nn.Linear(32, 16)
    parameters = [module.weight, *_parameters(2)]
    folded = _Counting(monkeypatch, parameters)
    args = _args(parameters)
    folded.data(args)
    new = torch.randn(16, 32)
    if update == "load_state_dict":  # bumps the version counter
        module.load_state_dict({"weight": new, "bias": module.bias.detach()})
    elif update == "in_place_no_grad":
        with torch.no_grad():
            module.weight.copy_(new)
    else:  # p.data = t: same object and version, new storage
        module.weight.data = new
    data = folded.data(args)
    assert torch.equal(data[0], _expected(new)) and folded.quantized == _ids(parameters)
    folded.quantized.clear()
    folded.data(args)
    assert folded.quantized == []  # and then stable again


def test_inference_tensors_take_the_fast_path_and_storage_changes_are_seen(monkeypatch: pytest.MonkeyPatch) -> None:
    with torch.inference_mode():
        parameters = _parameters()  # no version counters
    mixed = [parameters[0], *_parameters(2, seed=3)]
    folded = _Counting(monkeypatch, parameters)
    args = _args(parameters)
    first = folded.folded.for_call(args)
    assert folded.folded.for_call(args) is first and folded.quantized == []
    folded.data(_args(mixed))
    mixed_args = _args(mixed)
    assert folded.folded.for_call(mixed_args) is folded.folded.for_call(mixed_args)  # a mixed set is stable too
    with torch.inference_mode():
        new = torch.randn(16, 32)
    parameters[1].data = new
    assert torch.equal(folded.data(args)[1], _expected(new))


def test_freed_sets_are_dropped_and_reused_ids_are_never_trusted(monkeypatch: pytest.MonkeyPatch) -> None:
    a = _parameters(seed=0)
    folded = _Counting(monkeypatch, a)
    reused = 0
    for seed in range(1, 6):
        b = _parameters(seed=seed)
        ids = [id(p) for p in b]
        assert all(torch.equal(d, _expected(p)) for d, p in zip(folded.data(_args(b)), b))
        references = [weakref.ref(t) for t in folded.folded.for_call(_args(b))]
        assert len(folded.folded._sets) == 2
        del b
        gc.collect()
        assert len(folded.folded._sets) == 1 and folded.folded._last is None  # dropped with its parameters
        folded.data(_args(a))  # the latest quantized copy is now a's: b's copy is gone too
        assert all(reference() is None for reference in references)
        c = _parameters(seed=100 + seed)  # often takes b's ids: must still be quantized for itself
        reused += any(id(p) in ids for p in c)
        assert all(torch.equal(d, _expected(p)) for d, p in zip(folded.data(_args(c)), c))
        del c
    assert folded.quantized  # the new sets were quantized, never served b's copy
    print(f"{reused} of 5 new sets reused a freed parameter's id")


# ---------------------------------------------------------------------------------------------
# release_weights=True


def _options(inductor: bool = False, policy: str = "w8a16", release: bool = True) -> dict:
    return {"policy": policy, "inductor": inductor, "release_weights": release}


def test_release_weights_is_a_documented_option() -> None:
    from lowbit_compile.backend import OPTION_DOCS, BackendOptions

    assert "release_weights" in OPTION_DOCS
    assert BackendOptions.parse({"release_weights": True}).release_weights
    assert not BackendOptions.parse({}).release_weights


@pytest.mark.parametrize("inductor", [False, True])
def test_released_weights_are_freed_and_the_compiled_output_is_unchanged(inductor: bool) -> None:
    torch.manual_seed(0)
    model, twin = Block().eval(), Block().eval()
    twin.load_state_dict(model.state_dict())
    x = torch.randn(4, 128)
    with torch.no_grad():
        kept = torch.compile(twin, backend="lowbit", options=_options(inductor, release=False))(x)
        compiled = torch.compile(model, backend="lowbit", options=_options(inductor))
        out = compiled(x)
        torch.testing.assert_close(out, kept, rtol=0, atol=0)  # the same packed weights either way
        assert model.fc.weight.untyped_storage().nbytes() == 0  # the memory is freed
        assert model.fc.weight.shape == (128, 128)  # the parameter keeps its object and metadata
        assert model.fc.bias.untyped_storage().nbytes() == 128 * 4  # not folded: kept
        for _ in range(2):
            torch.testing.assert_close(compiled(x), out, rtol=0, atol=0)
    assert counters["stats"]["unique_graphs"] == 2  # one each for model and twin: no recompile after release


def test_the_eager_module_and_state_dict_name_the_option_after_release() -> None:
    model = Block().eval()
    x = torch.randn(4, 128)
    with torch.no_grad():
        torch.compile(model, backend="lowbit", options=_options())(x)
        with pytest.raises(RuntimeError, match=r"fc\.weight was released after quantization by the lowbit option "):
            model(x)
        with pytest.raises(RuntimeError, match=r"release_weights=True; state_dict\(\)"):
            model.state_dict()


def test_a_compile_needing_another_format_names_the_option() -> None:
    model = Block().eval()
    x = torch.randn(4, 128)
    with torch.no_grad():
        torch.compile(model, backend="lowbit", options=_options())(x)
        torch._dynamo.reset()
        recompiled = torch.compile(model, backend="lowbit", options=_options(policy="w4a16"))
        with pytest.raises(Exception, match=r"fc\.weight was released .* release_weights=True; this compile needs it"):
            recompiled(x)


def test_a_graph_meeting_a_released_weight_it_has_no_copy_for_names_the_option() -> None:
    torch.manual_seed(0)
    released, other = Block().eval(), Block().eval()
    x = torch.randn(4, 128)
    w4 = torch.compile(lambda m, x: m(x), backend="lowbit", options=_options(policy="w4a16", release=False))
    with torch.no_grad():
        w4(other, x)  # compiled for `other`'s parameters
        torch.compile(released, backend="lowbit", options=_options())(x)  # released as int8
        with pytest.raises(RuntimeError, match=r"release_weights=True; this compile needs it quantized as int4"):
            w4(released, x)  # same graph, a new set: its per-call check cannot quantize a released weight


@pytest.mark.parametrize("inductor", [False, True])
def test_a_recompile_for_a_new_shape_uses_the_kept_copies(inductor: bool) -> None:
    torch.manual_seed(0)
    model = Block().eval()
    x, wide = torch.randn(4, 128), torch.randn(6, 128)
    with torch.no_grad():
        expected = model(wide)
        compiled = torch.compile(model, backend="lowbit", options=_options(inductor))
        compiled(x)
        assert 30 < sqnr(expected, compiled(wide)) < 70  # a second graph, from the packed copy
    assert counters["stats"]["unique_graphs"] == 2


def test_load_state_dict_after_release_loads_and_requantizes() -> None:
    torch.manual_seed(0)
    model, other = Block().eval(), Block().eval()
    x = torch.randn(4, 128)
    with torch.no_grad():
        compiled = torch.compile(model, backend="lowbit", options=_options())
        compiled(x)
        model.load_state_dict(other.state_dict())
        assert 30 < sqnr(other(x), compiled(x)) < 70
        assert model.fc.weight.untyped_storage().nbytes() == 0  # released again once quantized


def test_assigning_new_data_to_a_released_weight_makes_it_live_again() -> None:
    torch.manual_seed(0)
    model = Block().eval()
    x = torch.randn(4, 128)
    with torch.no_grad():
        compiled = torch.compile(model, backend="lowbit", options=_options())
        compiled(x)
        new = torch.randn(128, 128) * 0.05
        model.fc.weight.data = new
        expected = torch.relu(x @ new.t() + model.fc.bias)
        assert 30 < sqnr(expected, compiled(x)) < 70


def test_layers_compiled_one_by_one_each_release_their_weights() -> None:
    torch.manual_seed(0)
    layers = [Block().eval() for _ in range(3)]
    x = torch.randn(4, 128)
    with torch.no_grad():
        expected = [layer(x) for layer in layers]
        for layer in layers:
            layer.compile(backend="lowbit", options=_options())
        for _ in range(2):
            for layer, reference in zip(layers, expected):
                assert 30 < sqnr(reference, layer(x)) < 70
        assert all(layer.fc.weight.untyped_storage().nbytes() == 0 for layer in layers)
        with pytest.raises(RuntimeError, match="release_weights=True"):
            layers[2]._call_impl(x)  # the eager module, past its compiled wrapper
    assert counters["stats"]["unique_graphs"] == 1


class UsesWeightTwice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(128, 128)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) + self.fc.weight.sum()  # the second use reads the original weight


def test_weights_still_read_by_the_graph_or_sharing_storage_are_not_released() -> None:
    torch.manual_seed(0)
    x = torch.randn(4, 128)
    model = UsesWeightTwice().eval()
    shared = Block().eval()
    alias = shared.fc.weight.detach().view(-1)  # another tensor on the same storage
    with torch.no_grad():
        expected = model(x)
        out = torch.compile(model, backend="lowbit", options=_options())(x)
        assert 30 < sqnr(expected, out) < 70
        assert model.fc.weight.untyped_storage().nbytes() == 128 * 128 * 4
        torch.compile(shared, backend="lowbit", options=_options())(x)
        assert shared.fc.weight.untyped_storage().nbytes() == 128 * 128 * 4
        assert torch.equal(alias.view(128, 128), shared.fc.weight)


@pytest.mark.parametrize("tie", [False, True])
def test_a_whole_model_keeps_only_packed_weights_and_what_it_reads_unquantized(tie: bool) -> None:
    from lowbit_compile.models import LlamaConfig, TinyLlama

    config = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_layers=2, tie_embeddings=tie)
    torch.manual_seed(0)
    model, twin = TinyLlama(config).eval(), TinyLlama(config).eval()
    twin.load_state_dict(model.state_dict())
    tokens = torch.randint(0, config.vocab_size, (2, 8))
    with torch.no_grad():
        kept = torch.compile(twin, backend="lowbit", options=_options(policy="w4a16", release=False))(tokens)
        out = torch.compile(model, backend="lowbit", options=_options(policy="w4a16"))(tokens)
    torch.testing.assert_close(out, kept, rtol=0, atol=0)
    released = {name for name, p in model.named_parameters() if p.untyped_storage().nbytes() == 0}
    projections = {n for n, _ in model.named_parameters() if n.endswith("proj.weight")}
    assert projections and projections <= released  # q, k, v, o, gate, up, down of every layer
    assert "embed_tokens.weight" not in released  # the embedding lookup reads it
    assert ("lm_head.weight" in released) == (not tie)  # tied: it is the embedding
    assert not any("norm" in name for name in released)


# ---------------------------------------------------------------------------------------------
# Packed layouts: on CUDA, int4 weight-only sites fold K-major (ops.weight_packing). Forced here on
# CPU, where the op's reference unpacks them: the same outputs, packed copies kept and re-made.


@pytest.fixture
def kmajor_everywhere(monkeypatch: pytest.MonkeyPatch) -> None:
    import lowbit_compile.ops as ops

    monkeypatch.setenv(ops.KMAJOR_ENV, "1")
    real = ops.weight_packing

    def everywhere(kernel: str, x_dtype: torch.dtype, device: torch.device, w_fmt: str) -> str | None:
        return real(kernel, torch.bfloat16, torch.device("cuda"), w_fmt)  # as if on a GPU

    monkeypatch.setattr(ops, "weight_packing", everywhere)


def test_weight_packing_is_decided_by_the_op_layer(monkeypatch: pytest.MonkeyPatch) -> None:
    from lowbit_compile.ops import KMAJOR_ENV, weight_packing

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.delenv(KMAJOR_ENV, raising=False)
    assert weight_packing("weight_only_mm", torch.bfloat16, cuda, "int4_g128_asym") is None  # opt-in
    monkeypatch.setenv(KMAJOR_ENV, "1")
    assert weight_packing("weight_only_mm", torch.bfloat16, cuda, "int4_g128_asym") == "kmajor"
    assert weight_packing("weight_only_mm", torch.float16, cuda, "int4_g32") == "kmajor"
    assert weight_packing("weight_only_mm", torch.bfloat16, cpu, "int4_g128_asym") is None  # no kernel on CPU
    assert weight_packing("weight_only_mm", torch.float32, cuda, "int4_g128_asym") is None  # the reference runs
    assert weight_packing("weight_only_mm", torch.bfloat16, cuda, "int8_row") is None
    assert weight_packing("auto_mm", torch.bfloat16, cuda, "int4_g128_asym") is None  # int4 x fp8 reads rows


@pytest.mark.parametrize("inductor", [False, True])
def test_kmajor_packed_weights_give_the_reference_layouts_output(
    monkeypatch: pytest.MonkeyPatch, kmajor_everywhere: None, inductor: bool
) -> None:
    import lowbit_compile.ops as ops
    from lowbit_compile.testing import run_and_get_graphs

    torch.manual_seed(0)
    model = Block().eval()
    x = torch.randn(4, 128)
    out, graphs = run_and_get_graphs(model, x, policy="w4a16", options={"inductor": inductor})
    assert "i32[16, 128]" in graphs["folded"] and "kmajor" in graphs["folded"]  # words [K/8, N]
    monkeypatch.setattr(ops, "weight_packing", lambda *args: None)  # the reference layout
    same, graphs = run_and_get_graphs(model, x, policy="w4a16", options={"inductor": inductor})
    assert "kmajor" not in graphs["folded"]
    torch.testing.assert_close(out, same, rtol=0, atol=0)  # one quantized weight; the reference unpacks exactly


def test_kmajor_packed_weights_are_packed_again_for_new_parameters(kmajor_everywhere: None) -> None:
    torch.manual_seed(0)
    model, other = Block().eval(), Block().eval()
    x = torch.randn(4, 128)
    with torch.no_grad():
        compiled = torch.compile(model, backend="lowbit", options=_options(policy="w4a16", release=False))
        first = compiled(x)
        model.load_state_dict(other.state_dict())
        second = compiled(x)  # the per-call check quantizes and packs the new weights
        assert 15 < sqnr(other(x), second) < 60 and not torch.equal(first, second)


def test_released_kmajor_copies_serve_a_recompile(kmajor_everywhere: None) -> None:
    torch.manual_seed(0)
    model = Block().eval()
    x, wide = torch.randn(4, 128), torch.randn(6, 128)
    with torch.no_grad():
        expected = model(wide)
        compiled = torch.compile(model, backend="lowbit", options=_options(policy="w4a16"))
        compiled(x)
        assert model.fc.weight.untyped_storage().nbytes() == 0
        assert 15 < sqnr(expected, compiled(wide)) < 60  # a second graph, from the kept packed copy
    assert counters["stats"]["unique_graphs"] == 2


# -- large weights are quantized in chunks of rows (bounded compile-time memory) -------------------


@pytest.mark.parametrize(
    "fmt, search, chunked",
    [
        ("int4_g128_asym", True, True),  # the int4 search, per group
        ("int4_g32", True, True),
        ("int8_row", False, True),  # per row
        ("fp8_e4m3_row", False, True),
        ("mxfp4", False, True),  # e8m0 scales per 32 along K
        ("fp8_e4m3_128x128", False, True),  # blocks of 128 rows: chunks stay whole blocks
        ("fp8_e4m3_tensor", False, False),  # one scale for the tensor: quantized whole
        ("nvfp4", False, False),  # a global scale: quantized whole
    ],
)
def test_large_weights_quantize_in_row_chunks_with_the_same_result(monkeypatch, fmt, search, chunked):
    import lowbit_compile.passes.state as state

    torch.manual_seed(0)
    weight = torch.randn(384, 256) * torch.linspace(0.1, 3.0, 384)[:, None]  # rows of different ranges
    whole = quantize_weight(weight, False, fmt, search)
    calls = []
    real = torch.ops.lowbit.quantize
    monkeypatch.setattr(state, "QUANTIZE_CHUNK_ELEMENTS", 100 * 256)  # 100 rows a chunk (128 for blocks)
    monkeypatch.setattr(state, "search_quantize", _counting(state.search_quantize, calls))
    monkeypatch.setattr(torch.ops.lowbit, "quantize", _counting(real, calls))
    state._SEARCHED.clear()
    parts = quantize_weight(weight.clone(), False, fmt, search)  # a new parameter: no cached search
    assert len(calls) == (4 if chunked and fmt != "fp8_e4m3_128x128" else 3 if chunked else 1)
    for before, after in zip(whole, parts):
        assert before.shape == after.shape and before.dtype == after.dtype
        assert torch.equal(before.view(torch.uint8) if before.dtype.itemsize == 1 else before,
                           after.view(torch.uint8) if after.dtype.itemsize == 1 else after)  # fmt: skip


def _counting(fn, calls):
    def counted(rows, *args, **kwargs):
        calls.append(rows.shape[0])
        return fn(rows, *args, **kwargs)

    return counted
