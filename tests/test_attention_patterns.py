"""Attention as model code writes it (issue 7): Hugging Face's eager attention (BERT, Llama) and
hand-written variants are one attention site each; where a softmax between matmuls is not matched,
the report says which part of the pattern failed; and the accuracy gate works on attention sites.

Every compiled result is checked against the `qdq` stage's output (the numerical reference) and,
more loosely, against eager. Sizes are odd (sequence 9) and models are tiny, built offline.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lowbit_compile import Policy, QuantSpec, Rule, reference
from lowbit_compile.backend import BackendOptions, compile_graph
from lowbit_compile.passes.annotate import annotate_sites
from lowbit_compile.passes.capture import capture_graph
from lowbit_compile.passes.state import PipelineState, Site
from lowbit_compile.policy import as_policy
from lowbit_compile.report import Report, sqnr

BATCH, HEADS, SEQ, HEAD_DIM = 2, 4, 9, 64
FP8 = "fp8_e4m3_row"
FP8_ATTENTION = f"A={FP8}"
RECIPE_ATTENTION = "A=attn_fp8_t128"  # fp8-attention: q, k, v quantized per 128-token block inside the op
EAGER_BAND = (20.0, 60.0)  # fp8 q, k, v against eager (tests/test_sites.py uses the same)
SKIPPED_MATMUL = "policy: rule 0 (op='matmul') leaves it unquantized"

pytestmark = pytest.mark.usefixtures("fresh_dynamo")


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


def compile_with_reference(model: Any, *args: Any, policy: Any, inductor: bool = False, **kwargs: Any):
    """(compiled output, qdq-stage output, reports) of one call through backend="lowbit"."""
    options = BackendOptions.parse({"policy": policy, "inductor": inductor})
    references: list[Any] = []
    reports: list[Report] = []

    def keep_qdq(stage: str, state: Any) -> None:
        if stage == "qdq":
            with torch.no_grad():
                references.append(state.gm(*state.example_inputs))

    def backend(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
        return compile_graph(gm, example_inputs, options, on_report=reports.append, on_stage_state=keep_qdq)

    torch._dynamo.reset()
    try:
        with torch.no_grad(), torch._inductor.config.patch(force_disable_caches=True):
            out = torch.compile(model, backend=backend, dynamic=False)(*args, **kwargs)
    finally:
        torch._dynamo.reset()
    assert len(references) == 1 and len(reports) == 1, "one graph"
    return out, references[0], reports[0]


def first(output: Any) -> torch.Tensor:
    """The main tensor of a graph's outputs or of a Hugging Face model output."""
    if isinstance(output, (tuple, list)):
        return output[0]
    for name in ("logits", "last_hidden_state"):
        if hasattr(output, name):
            return getattr(output, name)
    return output


def assert_matches_reference(out: Any, reference: Any, dtype: torch.dtype = torch.float32) -> None:
    """The compiled output is the qdq reference up to rounding order: the fused ops accumulate in
    fp32, the qdq graph runs in the model's dtype (bf16: the floor of tests/test_fuzz.py, which the
    linear sites of the bf16 Llama alone come within 3 dB of)."""
    out, reference = first(out), first(reference)
    assert out.shape == reference.shape and out.dtype == reference.dtype
    assert torch.isfinite(out).all()
    floor = {torch.float32: 60.0, torch.bfloat16: 25.0}[dtype]
    assert sqnr(reference.float(), out.float()) > floor


def annotated_sites(model: Any, *args: Any) -> list[Site]:
    """The annotated `Site` records (attributes the report does not show) under fp8-attention."""
    sites: list[Site] = []

    def annotate_only(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
        state = PipelineState(gm=gm, example_inputs=list(example_inputs), policy=as_policy("fp8-attention"))
        capture_graph(state)
        annotate_sites(state)
        sites.extend(state.sites)
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=annotate_only)(*args)
    return sites


def attention_rows(report: Report) -> list:
    return [site for site in report.sites if site.op == "attention"]


class Function(nn.Module):
    def __init__(self, function: Any) -> None:
        super().__init__()
        self.function = function

    def forward(self, *args: Any) -> Any:
        return self.function(*args)


def qkv(dtype: torch.dtype = torch.float32, kv_heads: int = HEADS) -> tuple[torch.Tensor, ...]:
    return (
        torch.randn(BATCH, HEADS, SEQ, HEAD_DIM, dtype=dtype),
        torch.randn(BATCH, kv_heads, SEQ, HEAD_DIM, dtype=dtype),
        torch.randn(BATCH, kv_heads, SEQ, HEAD_DIM, dtype=dtype),
    )


# -- Hugging Face eager attention ------------------------------------------------------------------

transformers = pytest.importorskip("transformers")


def tiny_bert() -> nn.Module:
    config = transformers.BertConfig(
        vocab_size=128,
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=256,
        max_position_embeddings=64,
        attn_implementation="eager",
    )
    return transformers.BertModel(config, add_pooling_layer=False).eval()


def tiny_llama(dtype: torch.dtype = torch.float32) -> nn.Module:
    config = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        attn_implementation="eager",
    )
    return transformers.LlamaForCausalLM(config).to(dtype).eval()


def ids_and_padding() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, 128, (BATCH, SEQ))
    attention_mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    attention_mask[1, 6:] = 0  # padding: a float mask with finfo.min in HF's eager path
    return ids, attention_mask


def test_hf_bert_eager_attention_is_one_site_per_layer() -> None:
    model = tiny_bert()
    assert model.config._attn_implementation == "eager"
    ids, attention_mask = ids_and_padding()
    out, reference, report = compile_with_reference(model, ids, attention_mask=attention_mask, policy="fp8-attention")
    assert report.counts() == {"linear": 12, "attention": 2}, report.table()  # no plain matmul sites
    for index, site in enumerate(attention_rows(report)):
        assert site.fqn == f"encoder.layer.{index}.attention.self"
        assert (site.source_op, site.format, site.skip_reason) == ("matmul-softmax-matmul", RECIPE_ATTENTION, None)
        assert site.shapes["k"] == f"({BATCH},2,{SEQ},64)"
        assert site.sqnr_db > 25
    assert_matches_reference(out, reference)
    with torch.no_grad():
        eager = model(ids, attention_mask=attention_mask).last_hidden_state
    assert sqnr(eager, first(out)) > 20


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_hf_llama_eager_attention_is_one_gqa_site_per_layer(dtype) -> None:
    """Llama's eager path: repeat_kv'd K and V, an additive causal + padding mask, softmax in fp32
    cast back to the model's dtype, dropout(training=False). K and V are taken unrepeated (GQA)."""
    model = tiny_llama(dtype)
    ids, attention_mask = ids_and_padding()
    out, reference, report = compile_with_reference(
        model, ids, attention_mask=attention_mask, use_cache=False, policy="fp8-attention"
    )
    assert report.counts() == {"linear": 15, "attention": 2}, report.table()
    for index, site in enumerate(attention_rows(report)):
        assert site.fqn == f"model.layers.{index}.self_attn"
        assert (site.format, site.skip_reason) == (RECIPE_ATTENTION, None)
        assert site.shapes["q"] == f"({BATCH},4,{SEQ},32)"
        assert site.shapes["k"] == site.shapes["v"] == f"({BATCH},2,{SEQ},32)"  # unrepeated: enable_gqa
    assert_matches_reference(out, reference, dtype)
    with torch.no_grad():
        eager = model(ids, attention_mask=attention_mask).logits
    assert sqnr(eager.float(), first(out).float()) > 15


@pytest.mark.parametrize("name", ["bert", "llama"])
def test_hf_eager_attention_under_dynamic_shapes(name) -> None:
    """dynamic=True: one graph for every size, and HF's `self.scaling` reaches the graph as a
    SymFloat (`.item()` of a 0-d input), which the site carries as a computed scale (Llama through
    Inductor, BERT without, to keep the test short)."""
    from torch._dynamo.utils import counters

    model, extra = (tiny_bert(), {}) if name == "bert" else (tiny_llama(), {"use_cache": False})
    reports: list[Report] = []
    options = BackendOptions.parse({"policy": "fp8-attention", "inductor": name == "llama"})
    compiled = torch.compile(
        model, backend=lambda gm, inputs: compile_graph(gm, inputs, options, on_report=reports.append), dynamic=True
    )
    for batch, length in ((2, 9), (3, 13), (2, 6)):
        ids = torch.randint(0, 128, (batch, length))
        attention_mask = torch.ones(batch, length, dtype=torch.long)
        attention_mask[0, -2:] = 0
        with torch.no_grad():
            out, eager = (first(m(ids, attention_mask=attention_mask, **extra)) for m in (compiled, model))
        assert sqnr(eager, out) > 20
    assert counters["stats"]["unique_graphs"] == 1
    # Dynamo restarts the first compile once, having specialised floats it traced itself (layer
    # norm eps, dropout p); the scale stays a SymFloat in both (no guard on it).
    report = reports[-1]
    assert report.counts()["attention"] == 2 and "matmul" not in report.counts(), report.table()
    assert all(site.format == RECIPE_ATTENTION and site.sqnr_db > 25 for site in attention_rows(report))


# -- hand-written variants -------------------------------------------------------------------------


def inplace_fill(q, k, v, mask):
    scores = q @ k.transpose(-2, -1) / math.sqrt(HEAD_DIM)
    scores.masked_fill_(mask, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def repeat_kv(x: torch.Tensor, n: int) -> torch.Tensor:
    """Hugging Face's repeat_kv."""
    batch, heads, length, dim = x.shape
    return x[:, :, None, :, :].expand(batch, heads, n, length, dim).reshape(batch, heads * n, length, dim)


def fp32_softmax(q, k, v):
    scores = torch.matmul(q, k.transpose(2, 3)) * 0.125
    return torch.matmul(F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype), v)


# name -> (function of q, k, v, bool mask (True = masked out); the scale the site must carry;
#          kv heads; the site's mask is None)
VARIANTS = {
    "dropout_in_eval": (
        lambda q, k, v, m: F.dropout(torch.softmax(q @ k.transpose(-2, -1) * 0.125, -1), p=0.1, training=False) @ v,
        0.125, HEADS, True),
    "nn_dropout_in_eval": (
        lambda q, k, v, m: nn.Dropout(0.1).eval()(torch.softmax(q @ k.transpose(-2, -1) * 0.125, -1)) @ v,
        0.125, HEADS, True),
    "masked_fill_-inf": (
        lambda q, k, v, m: torch.softmax((q @ k.transpose(-2, -1) * 0.125).masked_fill(m, float("-inf")), -1) @ v,
        0.125, HEADS, False),
    "masked_fill_finfo_min": (
        lambda q, k, v, m: torch.softmax((q @ k.mT * 0.125).masked_fill(m, torch.finfo(q.dtype).min), -1) @ v,
        0.125, HEADS, False),
    "masked_fill_before_the_scale": (
        lambda q, k, v, m: torch.softmax(torch.masked_fill(q @ k.transpose(-2, -1), m, -1e9) / 8.0, -1) @ v,
        0.125, HEADS, False),
    "masked_fill_in_place": (inplace_fill, 0.125, HEADS, False),
    "k_pre_transposed": (
        lambda q, k, v, m: torch.softmax(q @ k.permute(0, 1, 3, 2).contiguous() * 0.125, -1) @ v, 0.125, HEADS, True),
    "q_scaled_before_the_matmul": (
        lambda q, k, v, m: torch.softmax((q * 0.125) @ k.transpose(-2, -1), -1) @ v, 0.125, HEADS, True),
    "q_and_k_scaled_before_the_matmul": (
        lambda q, k, v, m: torch.softmax((q / 2.0) @ (k * 0.25).transpose(-2, -1), -1) @ v, 0.125, HEADS, True),
    "softmax_in_fp32_cast_back": (lambda q, k, v, m: fp32_softmax(q, k, v), 0.125, HEADS, True),
    "repeat_kv": (lambda q, k, v, m: fp32_softmax(q, repeat_kv(k, 2), repeat_kv(v, 2)), 0.125, 2, True),
    "repeat_interleave": (
        lambda q, k, v, m: fp32_softmax(q, k.repeat_interleave(2, dim=1), torch.repeat_interleave(v, 2, dim=1)),
        0.125, 2, True),
}  # fmt: skip


def padding_mask() -> torch.Tensor:
    masked = torch.rand(BATCH, 1, 1, SEQ) > 0.7
    masked[..., 0] = False  # no row masked entirely (eager gives NaN there with -inf)
    return masked


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", list(VARIANTS))
def test_hand_written_attention_variants_are_one_site(name, dtype) -> None:
    function, scale, kv_heads, no_mask = VARIANTS[name]
    model = Function(function)
    args = (*qkv(dtype, kv_heads), padding_mask())
    out, reference, report = compile_with_reference(model, *args, policy="fp8-attention")
    assert report.counts() == {"attention": 1}, report.table()
    (site,) = report.sites
    assert (site.source_op, site.format, site.skip_reason) == ("matmul-softmax-matmul", RECIPE_ATTENTION, None)
    assert site.shapes["k"] == f"({BATCH},{kv_heads},{SEQ},{HEAD_DIM})"
    assert_matches_reference(out, reference, dtype)
    with torch.no_grad():
        eager = model(*args)
    low, high = EAGER_BAND
    assert low - (5 if dtype == torch.bfloat16 else 0) < sqnr(eager.float(), out.float()) < high
    (annotated,) = annotated_sites(model, *args)
    assert annotated.attrs["scale"] == pytest.approx(scale)
    assert (annotated.inputs["mask"] is None) is no_mask
    assert annotated.attrs["enable_gqa"] is (kv_heads != HEADS)
    assert annotated.attrs["k_transposed"] is (name == "k_pre_transposed")


def test_masked_fill_keeps_a_row_masked_entirely_finite_with_finfo_min() -> None:
    """HF's eager masks use finfo.min, so a padded query row masked entirely averages all values in
    eager; the additive mask the site gets does the same (and no NaN comes out)."""
    q, k, v = qkv()
    mask = torch.zeros(BATCH, 1, SEQ, SEQ, dtype=torch.bool)
    mask[1, :, 0, :] = True  # query 0 of batch 1 sees nothing
    function = VARIANTS["masked_fill_finfo_min"][0]
    out, reference, _ = compile_with_reference(Function(function), q, k, v, mask, policy="fp8-attention")
    assert torch.isfinite(out).all()
    assert_matches_reference(out, reference)
    eager = function(q, k, v, mask)
    assert sqnr(eager[1, :, 0], out[1, :, 0]) > 20


# -- not matched: the report says which part failed ------------------------------------------------

# name -> (function of q, k, v, float mask; words the skip reason must contain)
NOT_ATTENTION = {
    "relu_between_softmax_and_pv": (
        lambda q, k, v, m: torch.relu(torch.softmax(q @ k.transpose(-2, -1), dim=-1)) @ v,
        "between softmax and the PV matmul: `relu`"),
    "dropout_in_training": (
        lambda q, k, v, m: F.dropout(torch.softmax(q @ k.transpose(-2, -1), dim=-1), p=0.1, training=True) @ v,
        "dropout with p=0.1 in training mode"),
    "tanh_before_softmax": (
        lambda q, k, v, m: torch.softmax(torch.tanh(q @ k.transpose(-2, -1)), dim=-1) @ v,
        "between the QK^T matmul and softmax: `tanh`"),
    "mask_added_before_the_scale": (
        lambda q, k, v, m: torch.softmax(((q @ k.transpose(-2, -1)) + m) * 0.2, -1) @ v,
        "the mask is added before the scaling"),
    "weights_returned": (
        lambda q, k, v, m: (lambda p: (p @ v, p))(torch.softmax(q @ k.transpose(-2, -1), dim=-1)),
        "the probabilities (`softmax`) have 2 users"),
    "masked_fill_with_a_small_value": (
        lambda q, k, v, m: torch.softmax((q @ k.transpose(-2, -1)).masked_fill(m > 0, -5.0), -1) @ v,
        "`masked_fill` fills with -5.0"),
    "softmax_over_another_dim": (
        lambda q, k, v, m: torch.softmax(q @ k.transpose(-2, -1), dim=-2) @ v, "softmax is over dim -2"),
    "probabilities_on_the_right": (
        lambda q, k, v, m: m @ torch.softmax(q @ k.transpose(-2, -1), dim=-1),
        "the probabilities are the right operand of the second matmul"),
}  # fmt: skip


@pytest.mark.parametrize("name", list(NOT_ATTENTION))
def test_a_failed_match_names_the_failing_part(name) -> None:
    function, words = NOT_ATTENTION[name]
    model = Function(function)
    args = (*qkv(), torch.randn(BATCH, HEADS, SEQ, SEQ))
    out, _, report = compile_with_reference(model, *args, policy="fp8-attention")
    assert report.counts() == {"matmul": 2}, report.table()
    for site in report.sites:
        assert site.skip_reason.startswith(f"{SKIPPED_MATMUL}; not matched as attention: ")
        assert words in site.skip_reason, site.skip_reason
    assert words in report.table()
    if name != "dropout_in_training":
        with torch.no_grad():
            torch.testing.assert_close(first(out), first(model(*args)))


def test_only_a_softmax_next_to_a_matmul_is_reported() -> None:
    model = Function(lambda x, y: torch.softmax(x, dim=-1) @ y)  # no QK^T matmul before it
    report = compile_with_reference(model, torch.randn(3, 5, 7), torch.randn(3, 7, 4), policy="fp8-attention")[2]
    (site,) = report.sites
    assert site.skip_reason.endswith("not matched as attention: the scores do not come from a matmul")
    classifier = Function(lambda x, w: torch.softmax(torch.relu(torch.relu(torch.relu(x @ w)) * 2 + 1), dim=-1))
    report = compile_with_reference(classifier, torch.randn(3, 8), torch.randn(8, 5), policy="fp8-attention")[2]
    (site,) = report.sites
    assert site.skip_reason == SKIPPED_MATMUL


# -- the accuracy gate on attention sites ----------------------------------------------------------

INT8 = "int8_row"


def outlier_qkv(dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
    """q, k, v with three channels of K 20x larger, as in real LLMs: int8 per-token K loses the rest."""
    q, k, v = qkv(dtype)
    k[..., [3, 17, 40]] *= 20
    return q, k, v


def sdpa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v)


def hf_like(q, k, v):
    """Hugging Face's eager attention, without the mask."""
    scores = torch.matmul(q, k.transpose(2, 3)) * HEAD_DIM**-0.5
    probabilities = F.dropout(F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype), p=0.0, training=False)
    return torch.matmul(probabilities, v)


def gated(floor: float, fallback: QuantSpec | None) -> Policy:
    spec = QuantSpec(activation=INT8, min_sqnr=floor, fallback=fallback)
    return Policy(rules=(Rule(spec=spec, op="attention"),), default=None, name="gated-attention")


FLOOR = 35.0  # int8 per-token attention: ~41 dB on Gaussian q, k, v, 28-32 dB with the K outliers; fp8 ~27-28


@pytest.mark.parametrize("function", [sdpa, hf_like], ids=["sdpa", "explicit"])
def test_outlier_k_trips_the_attention_floor_and_falls_back(function) -> None:
    model = Function(function)
    # Gaussian K passes the floor: int8 stays.
    _, _, report = compile_with_reference(model, *qkv(), policy=gated(FLOOR, QuantSpec(activation=FP8)))
    (site,) = report.sites
    assert site.format == f"A={INT8} floor {FLOOR:g} dB" and not site.fell_back_from and site.sqnr_db > FLOOR
    # Outlier-heavy K fails it: the site falls back to fp8 and says from what and why.
    args = outlier_qkv()
    out, reference, report = compile_with_reference(model, *args, policy=gated(FLOOR, QuantSpec(activation=FP8)))
    (site,) = report.sites
    assert site.op == "attention" and site.format == FP8_ATTENTION
    (reason,) = site.fell_back_from
    assert reason.startswith(f"A={INT8} floor {FLOOR:g} dB: ") and reason.endswith(f" dB < {FLOOR:g} dB")
    assert f"fell back from A={INT8} floor {FLOOR:g} dB" in report.table()
    assert_matches_reference(out, reference)
    fp8_only = Policy(rules=(Rule(spec=QuantSpec(activation=FP8), op="attention"),), default=None)
    fp8_out, _, _ = compile_with_reference(model, *args, policy=fp8_only)
    torch.testing.assert_close(out, fp8_out)


@pytest.mark.parametrize("function", [sdpa, hf_like], ids=["sdpa", "explicit"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_no_fallback_left_runs_unquantized_attention_and_says_why(function, dtype) -> None:
    model = Function(function)
    args = outlier_qkv(dtype)
    policy = gated(FLOOR, QuantSpec(activation=FP8, min_sqnr=FLOOR))  # fp8 misses it too (~26 dB)
    out, _, report = compile_with_reference(model, *args, policy=policy, inductor=True)
    (site,) = report.sites
    assert site.op == "attention" and site.format is None and site.kernel is None
    assert site.skip_reason.startswith(f"accuracy gate: A={INT8} floor {FLOOR:g} dB: ")
    assert f"; A={FP8} floor {FLOOR:g} dB: " in site.skip_reason
    assert site.skip_reason.endswith("no fallback left: the model's own attention runs unquantized")
    with torch.no_grad():
        eager = model(*args)
    assert out.dtype == dtype
    torch.testing.assert_close(out, eager, **({} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}))


def test_block_attention_dynamic_lengths_compile_one_graph() -> None:
    """Sequence lengths through one `dynamic=True` compile of a token-block attention format: one
    graph for every length, within one 128-token block or above it. (The qdq stage once spelled the
    per-block quantization out as graph nodes, and propagating shapes through its reshapes guarded
    on "blocks != 1": a second graph for lengths within one block.)"""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    causal = Function(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True))
    compiled = torch.compile(causal, backend="lowbit", dynamic=True, options={"policy": "int8-attention"})
    with torch.no_grad():
        for length in (200, 333, 1024, 77, 5):
            q, k, v = (torch.randn(2, length, 4, 64).transpose(1, 2) for _ in range(3))
            expected = reference.attention(q, k, v, None, True, None, False, "attn_int8_t128")
            torch.testing.assert_close(compiled(q, k, v), expected.to(q.dtype), atol=1e-4, rtol=1e-4)
    assert counters["stats"]["unique_graphs"] == 1
    torch._dynamo.reset()
