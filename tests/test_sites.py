"""Site finding: which matmuls `explain` reports, as what, and with what decision; and that the
compiled graph (fused stage, run without Inductor) still computes the model.

Every model here is a small module at odd sizes (M = 7, N = 72, sequence 9); K = 256 or 128 so
that grouped formats divide it, unless a test is about K not dividing.
"""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lowbit_compile
from lowbit_compile import Policy, QuantSpec, Rule
from lowbit_compile.policy import as_policy
from lowbit_compile.report import Report, SiteReport, sqnr
from lowbit_compile.passes.annotate import annotate_sites
from lowbit_compile.passes.capture import capture_graph
from lowbit_compile.passes.state import PipelineState, Site

M, K, N = 7, 256, 72
BATCH, HEADS, SEQ, HEAD_DIM = 2, 4, 9, 64
INT8_BAND = (30.0, 80.0)  # SQNR in dB of an int8 x int8 site on Gaussian data (DESIGN.md floor: 35)
FP8_ATTENTION_BAND = (20.0, 60.0)
INT4_BAND = (15.0, 40.0)
W8A8 = "A=int8_row W=int8_row"
FP8_ATTENTION = "A=attn_fp8_t128"  # the fp8-attention recipe's attention format


pytestmark = pytest.mark.usefixtures("fresh_dynamo")


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


# -- helpers -------------------------------------------------------------------------------------


def explain(model: nn.Module, *args: Any, policy: Any = "w8a8") -> Report:
    torch._dynamo.reset()
    return lowbit_compile.explain(model, *args, policy=policy)


def only_site(report: Report) -> SiteReport:
    assert len(report.sites) == 1, report.table()
    return report.sites[0]


def find_sites(model: nn.Module, *args: Any, policy: Any = "w8a8") -> list[Site]:
    """The annotated `Site` objects (layout, attributes) that the report summarises."""
    sites: list[Site] = []

    def backend(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
        state = PipelineState(gm=gm, example_inputs=list(example_inputs), policy=as_policy(policy))
        capture_graph(state)
        annotate_sites(state)
        sites.extend(state.sites)
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=backend)(*args)
    return sites


def run_compiled(model: nn.Module, *args: Any, policy: Any = "w8a8") -> Any:
    """The model compiled with the lowbit backend up to the fused stage, run without Inductor."""
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="lowbit", options={"policy": policy, "inductor": False})
    with torch.no_grad():
        return compiled(*args)


def eager(model: nn.Module, *args: Any) -> Any:
    with torch.no_grad():
        return model(*args)


def assert_band(value: float | None, band: tuple[float, float]) -> None:
    assert value is not None and math.isfinite(value) and band[0] < value < band[1], value


def assert_compiled_close(model: nn.Module, *args: Any, policy: Any, band: tuple[float, float]) -> None:
    expected, actual = eager(model, *args), run_compiled(model, *args, policy=policy)
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    assert_band(sqnr(expected, actual), band)


def assert_compiled_exact(model: nn.Module, *args: Any, policy: Any) -> None:
    """Nothing quantized: the compiled graph must compute what eager does."""
    torch.testing.assert_close(run_compiled(model, *args, policy=policy), eager(model, *args))


class Nested(nn.Module):
    """`model.block.<name> = inner`, so the sites of `inner` report the FQN `block.<name>`."""

    def __init__(self, inner: nn.Module, name: str = "proj") -> None:
        super().__init__()
        self.block = nn.Module()
        self.block.add_module(name, inner)
        self.name = name

    def forward(self, *args: Any) -> Any:
        return getattr(self.block, self.name)(*args)


class WeightForm(nn.Module):
    """A (N, K) or (K, N) parameter and a bias, used through `form(self, x)`."""

    def __init__(self, form: Any, weight_shape: tuple[int, int] = (N, K)) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(*weight_shape) / math.sqrt(K))
        self.bias = nn.Parameter(torch.randn(N))
        self.form = form

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.form(self, x)


class Function(nn.Module):
    """A module around a function of activations only (attention, bmm)."""

    def __init__(self, function: Any) -> None:
        super().__init__()
        self.function = function

    def forward(self, *args: Any) -> Any:
        return self.function(*args)


def qkv(kv_heads: int = HEADS) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (
        torch.randn(BATCH, HEADS, SEQ, HEAD_DIM),
        torch.randn(BATCH, kv_heads, SEQ, HEAD_DIM),
        torch.randn(BATCH, kv_heads, SEQ, HEAD_DIM),
    )


# -- linear sites: every spelling of activation x parameter ------------------------------------


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_nn_linear(bias):
    model = Nested(nn.Linear(K, N, bias=bias))
    x = torch.randn(M, K)
    report = explain(model, x, policy="w8a8")
    site = only_site(report)
    assert report.counts() == {"linear": 1}
    assert (site.fqn, site.op, site.source_op) == ("block.proj", "linear", "linear")
    assert (site.format, site.kernel, site.skip_reason, site.decided_by) == (W8A8, "scaled_mm [reference]", None, "default")
    assert site.shapes == {"x": f"({M},{K})", "weight": f"({N},{K})", "out": f"({M},{N})"}
    assert site.weight_bytes_before == N * K * 4
    assert site.weight_bytes_after == N * K + N * 4  # int8 codes + one fp32 scale per output channel
    assert_band(site.sqnr_db, INT8_BAND)
    assert report.weight_bytes() == (site.weight_bytes_before, site.weight_bytes_after)
    assert_compiled_close(model, x, policy="w8a8", band=INT8_BAND)


def test_nn_linear_weight_only():
    model = Nested(nn.Linear(K, N))
    site = only_site(explain(model, torch.randn(M, K), policy="w8a16"))
    assert (site.format, site.kernel) == ("A=16bit W=int8_row", "weight_only_mm [reference]")
    assert site.weight_bytes_before > site.weight_bytes_after > 0
    assert_band(site.sqnr_db, (35.0, 80.0))  # weight-only: less noise than w8a8


# name -> (form, x shape, source_op); the weight is stored (N, K) as in nn.Linear
NK_FORMS = {
    "F.linear": (lambda m, x: F.linear(x, m.weight, m.bias), (M, K), "linear"),
    "F.linear_no_bias": (lambda m, x: F.linear(x, m.weight), (M, K), "linear"),
    "F.linear_keywords": (lambda m, x: F.linear(input=x, weight=m.weight, bias=m.bias), (M, K), "linear"),
    "x@W.t()": (lambda m, x: x @ m.weight.t(), (M, K), "matmul"),
    "x@W.T": (lambda m, x: x @ m.weight.T, (M, K), "matmul"),
    "x@W.mT": (lambda m, x: x @ m.weight.mT, (M, K), "matmul"),
    "x@W.transpose(0,1)": (lambda m, x: x @ m.weight.transpose(0, 1), (M, K), "matmul"),
    "x@W.permute(1,0)": (lambda m, x: x @ m.weight.permute(1, 0), (M, K), "matmul"),
    "torch.matmul(x,W.t())": (lambda m, x: torch.matmul(x, m.weight.t()), (M, K), "matmul"),
    "torch.matmul(x,other=W.t())": (lambda m, x: torch.matmul(x, other=m.weight.t()), (M, K), "matmul"),
    "x.matmul(W.t())": (lambda m, x: x.matmul(m.weight.t()), (M, K), "matmul"),
    "x.__matmul__(W.t())": (lambda m, x: x.__matmul__(m.weight.t()), (M, K), "matmul"),
    "torch.mm(x,W.t())": (lambda m, x: torch.mm(x, m.weight.t()), (M, K), "mm"),
    "x.mm(W.t())": (lambda m, x: x.mm(m.weight.t()), (M, K), "mm"),
    "torch.addmm(b,x,W.t())": (lambda m, x: torch.addmm(m.bias, x, m.weight.t()), (M, K), "addmm"),
    "b.addmm(x,W.t())": (lambda m, x: m.bias.addmm(x, m.weight.t()), (M, K), "addmm"),
    "einsum(bsk,nk->bsn)": (lambda m, x: torch.einsum("bsk,nk->bsn", x, m.weight), (2, M, K), "einsum"),
    "3-D x@W.t()": (lambda m, x: x @ m.weight.t(), (2, M, K), "matmul"),
}

# the weight is stored (K, N) and used as x @ W
KN_FORMS = {
    "x@W": (lambda m, x: x @ m.weight, (2, M, K), "matmul"),
    "torch.matmul(x,W)": (lambda m, x: torch.matmul(x, m.weight), (M, K), "matmul"),
    "torch.mm(x,W)": (lambda m, x: torch.mm(x, m.weight), (M, K), "mm"),
    "einsum(...k,kn->...n)": (lambda m, x: torch.einsum("...k,kn->...n", x, m.weight), (2, 3, M, K), "einsum"),
    "einsum(bsk,kn->bsn)": (lambda m, x: torch.einsum("bsk,kn->bsn", x, m.weight), (2, M, K), "einsum"),
}


def _check_linear_form(form: Any, x_shape: tuple[int, ...], source_op: str, weight_shape: tuple[int, int]) -> None:
    model = Nested(WeightForm(form, weight_shape))
    x = torch.randn(*x_shape)
    report = explain(model, x, policy="w8a8")
    site = only_site(report)
    assert report.counts() == {"linear": 1}
    assert (site.fqn, site.op, site.source_op, site.format, site.kernel) == (
        "block.proj",
        "linear",
        source_op,
        W8A8,
        "scaled_mm [reference]",
    )
    assert site.skip_reason is None
    # The report always states the weight as (N, K), whatever its storage.
    assert site.shapes["weight"] == f"({N},{K})"
    assert site.shapes["x"] == "(" + ",".join(map(str, x_shape)) + ")"
    assert site.shapes["out"] == "(" + ",".join(map(str, (*x_shape[:-1], N))) + ")"
    assert site.weight_bytes_before == N * K * 4 > site.weight_bytes_after
    assert_band(site.sqnr_db, INT8_BAND)
    (annotated,) = find_sites(model, x, policy="w8a8")
    assert annotated.weight_layout == ("nk" if weight_shape == (N, K) else "kn")
    assert (annotated.n, annotated.k, annotated.weight_path) == (N, K, "block.proj.weight")
    assert_compiled_close(model, x, policy="w8a8", band=INT8_BAND)


@pytest.mark.parametrize("name", list(NK_FORMS))
def test_linear_forms_nk(name):
    _check_linear_form(*NK_FORMS[name], weight_shape=(N, K))


@pytest.mark.parametrize("name", list(KN_FORMS))
def test_linear_forms_kn(name):
    _check_linear_form(*KN_FORMS[name], weight_shape=(K, N))


@pytest.mark.parametrize("x_shape", [(M, K), (3, M, K), (2, 3, 5, K)], ids=["2d", "3d", "4d"])
def test_linear_activation_rank(x_shape):
    model = Nested(nn.Linear(K, N))
    x = torch.randn(*x_shape)
    site = only_site(explain(model, x, policy="w8a8"))
    assert site.shapes["x"] == "(" + ",".join(map(str, x_shape)) + ")"
    assert site.shapes["out"] == "(" + ",".join(map(str, (*x_shape[:-1], N))) + ")"
    assert site.format == W8A8
    assert_band(site.sqnr_db, INT8_BAND)
    assert_compiled_close(model, x, policy="w8a8", band=INT8_BAND)


class TiedLM(nn.Module):
    def __init__(self, vocab: int = 100, dim: int = 128) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.norm = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.lm_head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.embed(ids)
        return hidden, self.lm_head(self.norm(hidden))


@pytest.mark.parametrize("policy, band", [("w8a8", INT8_BAND), ("w4a16", INT4_BAND)])
def test_lm_head_tied_to_embedding(policy, band):
    model = TiedLM()
    ids = torch.randint(0, 100, (2, 9))
    report = explain(model, ids, policy=policy)
    site = only_site(report)  # the embedding lookup is not a matmul site
    assert (site.fqn, site.op, site.skip_reason) == ("lm_head", "linear", None)
    assert site.weight_bytes_before == 100 * 128 * 4 > site.weight_bytes_after
    assert_band(site.sqnr_db, band)
    hidden, logits = run_compiled(model, ids, policy=policy)
    hidden_eager, logits_eager = eager(model, ids)
    torch.testing.assert_close(hidden, hidden_eager, rtol=0, atol=0)  # the lookup reads the unquantized table
    assert_band(sqnr(logits_eager, logits), band)
    assert model.embed.weight is model.lm_head.weight  # compiling left the tie (and the module) alone


# -- activation x activation --------------------------------------------------------------------


def test_bmm_of_activations_is_reported_and_skipped():
    model = Nested(Function(torch.bmm), name="scores")
    a, b = torch.randn(3, M, 64), torch.randn(3, 64, 5)
    report = explain(model, a, b, policy="w8a8")
    site = only_site(report)
    assert report.counts() == {"matmul": 1}
    assert (site.fqn, site.op, site.source_op) == ("block.scores", "matmul", "bmm")
    assert site.format is None and site.kernel is None and site.sqnr_db is None
    assert site.skip_reason == "policy: rule 0 (op='matmul') leaves it unquantized"
    assert site.shapes == {"operand0": "(3,7,64)", "operand1": "(3,64,5)", "out": "(3,7,5)"}
    assert (site.weight_bytes_before, site.weight_bytes_after) == (0, 0)
    # A policy that would quantize it still reports why it cannot.
    site = only_site(explain(model, a, b, policy=Policy(default=QuantSpec("int8_row", "int8_row"))))
    assert "activation x activation" in site.skip_reason and site.format is None
    assert_compiled_exact(model, a, b, policy="w8a8")


@pytest.mark.parametrize(
    "form",
    [
        lambda m, x: F.linear(x, m.weight.to(x.dtype)),  # a cast of the weight is a computed tensor
        lambda m, x: F.linear(x, m.weight * 2),
        lambda m, x: torch.addmm(m.bias, x, m.weight.t(), beta=0.5),
    ],
    ids=["linear(x, W.to())", "linear(x, 2W)", "addmm(beta=0.5)"],
)
def test_matmul_not_recognised_as_linear_is_still_reported(form):
    # Used to be missing from the report altogether.
    model = Nested(WeightForm(form))
    x = torch.randn(M, K)
    site = only_site(explain(model, x, policy="w8a8"))
    assert site.op == "matmul" and site.format is None and site.skip_reason
    assert_compiled_exact(model, x, policy="w8a8")


def test_einsum_taking_a_diagonal_is_not_a_linear():
    # "ii,ij->ij" scales row i of W by x[i, i]: it used to be fused as x @ W, silently wrong.
    model = Nested(WeightForm(lambda m, x: torch.einsum("ii,ij->ij", x, m.weight), (K, N)))
    x = torch.randn(K, K)
    site = only_site(explain(model, x, policy="w8a8"))
    assert (site.op, site.source_op, site.format) == ("matmul", "einsum", None)
    assert_compiled_exact(model, x, policy="w8a8")


# -- attention -----------------------------------------------------------------------------------


def _mask(kind: str) -> torch.Tensor:
    if kind == "float":
        return torch.randn(SEQ, SEQ)
    keep = torch.rand(BATCH, 1, SEQ, SEQ) > 0.4
    return keep | torch.eye(SEQ, dtype=torch.bool)  # no fully masked row (NaN in eager too)


SDPA_CASES = {
    "causal": (lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True), HEADS, None),
    "float_mask": (lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m), HEADS, "float"),
    "bool_mask": (lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m), HEADS, "bool"),
    "gqa": (lambda q, k, v: F.scaled_dot_product_attention(q, k, v, enable_gqa=True), 2, None),
    "scale": (lambda q, k, v: F.scaled_dot_product_attention(q, k, v, scale=0.3), HEADS, None),
}


@pytest.mark.parametrize("name", list(SDPA_CASES))
def test_sdpa(name):
    function, kv_heads, mask = SDPA_CASES[name]
    model = Nested(Function(function), name="attn")
    args = (*qkv(kv_heads), *((_mask(mask),) if mask else ()))
    report = explain(model, *args, policy="fp8-attention")
    site = only_site(report)
    assert report.counts() == {"attention": 1}
    assert (site.fqn, site.op, site.source_op) == ("block.attn", "attention", "sdpa")
    assert (site.format, site.kernel, site.skip_reason, site.decided_by) == (FP8_ATTENTION, "block_attention [reference]", None, "rule 1")
    kv_shape = f"({BATCH},{kv_heads},{SEQ},{HEAD_DIM})"
    assert site.shapes == {"q": f"({BATCH},{HEADS},{SEQ},{HEAD_DIM})", "k": kv_shape, "v": kv_shape,
                           "out": f"({BATCH},{HEADS},{SEQ},{HEAD_DIM})"}  # fmt: skip
    assert (site.weight_bytes_before, site.weight_bytes_after) == (0, 0)
    assert_band(site.sqnr_db, FP8_ATTENTION_BAND)
    (annotated,) = find_sites(model, *args, policy="fp8-attention")
    assert annotated.attrs["is_causal"] is (name == "causal")
    assert annotated.attrs["enable_gqa"] is (name == "gqa")
    assert annotated.attrs["scale"] == (0.3 if name == "scale" else None)
    assert (annotated.inputs["mask"] is not None) is (mask is not None)
    assert_compiled_close(model, *args, policy="fp8-attention", band=FP8_ATTENTION_BAND)


def test_sdpa_under_a_linear_recipe_is_reported_and_skipped():
    model = Nested(Function(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)), name="attn")
    site = only_site(explain(model, *qkv(), policy="w8a8"))
    assert (site.op, site.format, site.skip_reason) == (
        "attention",
        None,
        "policy: rule 1 (op='attention') leaves it unquantized",
    )


def test_attention_with_dropout_is_skipped_with_a_reason():
    model = Nested(Function(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, dropout_p=0.25)), name="attn")
    args = qkv()
    site = only_site(explain(model, *args, policy="fp8-attention"))
    assert site.op == "attention" and site.format is None and site.kernel is None
    assert "dropout" in site.skip_reason
    assert run_compiled(model, *args, policy="fp8-attention").shape == args[0].shape


# name -> (function of q, k, v[, mask], the scale the site must carry, has mask)
EXPLICIT_CASES = {
    "mul_scale_and_mask": (
        lambda q, k, v, m: torch.softmax((q @ k.transpose(-2, -1)) * 0.2 + m, dim=-1) @ v, 0.2, True),
    "mul_scale": (lambda q, k, v: torch.softmax((q @ k.transpose(-2, -1)) * 0.2, dim=-1) @ v, 0.2, False),
    "div_sqrt_d": (
        lambda q, k, v: F.softmax((q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1]), dim=-1) @ v, 0.125, False),
    "scalar_on_the_left": (lambda q, k, v: torch.softmax(0.3 * torch.matmul(q, k.mT), dim=-1) @ v, 0.3, False),
    "methods_and_cast": (
        lambda q, k, v: (q.matmul(k.transpose(2, 3)) / 4.0).float().softmax(dim=-1).to(q.dtype).matmul(v),
        0.25, False),
    "unscaled": (lambda q, k, v: torch.softmax(q @ k.transpose(-2, -1), dim=-1) @ v, 1.0, False),
}  # fmt: skip


@pytest.mark.parametrize("name", list(EXPLICIT_CASES))
def test_explicit_attention_is_one_site(name):
    function, scale, has_mask = EXPLICIT_CASES[name]
    model = Nested(Function(function), name="attn")
    args = (*qkv(), *((torch.randn(SEQ, SEQ),) if has_mask else ()))
    report = explain(model, *args, policy="fp8-attention")
    site = only_site(report)  # not two matmuls
    assert report.counts() == {"attention": 1}
    assert (site.fqn, site.op, site.source_op) == ("block.attn", "attention", "matmul-softmax-matmul")
    assert (site.format, site.kernel, site.skip_reason) == (FP8_ATTENTION, "block_attention [reference]", None)
    assert_band(site.sqnr_db, FP8_ATTENTION_BAND)
    (annotated,) = find_sites(model, *args, policy="fp8-attention")
    assert annotated.attrs["scale"] == pytest.approx(scale)
    assert (annotated.inputs["mask"] is not None) is has_mask
    assert annotated.attrs["is_causal"] is False
    assert_compiled_close(model, *args, policy="fp8-attention", band=FP8_ATTENTION_BAND)


LOOKALIKES = {
    # SDPA adds the mask after scaling; here the mask is scaled too.
    "mask_added_before_scale": lambda q, k, v, m: torch.softmax(((q @ k.transpose(-2, -1)) + m) * 0.2, -1) @ v,
    "add_with_alpha": lambda q, k, v, m: torch.softmax(torch.add(q @ k.transpose(-2, -1), m, alpha=2.0), -1) @ v,
    # probabilities as the right operand: m @ softmax(q k^T), not attention over v
    "probabilities_on_the_right": lambda q, k, v, m: m @ torch.softmax(q @ k.transpose(-2, -1), dim=-1),
}


@pytest.mark.parametrize("name", list(LOOKALIKES))
def test_explicit_attention_lookalikes_are_not_attention(name):
    # Each used to be taken for attention and compiled to a different result (or shape).
    model = Nested(Function(LOOKALIKES[name]), name="attn")
    args = (*qkv(), torch.randn(BATCH, HEADS, SEQ, SEQ))
    report = explain(model, *args, policy="fp8-attention")
    assert report.counts() == {"matmul": 2}, report.table()
    assert_compiled_exact(model, *args, policy="fp8-attention")


class ParameterValues(nn.Module):
    """Attention over learned values (memory slots): v is a parameter, so P @ V looks like a linear."""

    def __init__(self) -> None:
        super().__init__()
        self.values = nn.Parameter(torch.randn(SEQ, HEAD_DIM))

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        return torch.softmax((q @ k.transpose(-2, -1)) * 0.125, dim=-1) @ self.values


class ParameterKeys(nn.Module):
    """Scores against learned keys: q @ K^T is a linear site, so no attention site is formed."""

    def __init__(self) -> None:
        super().__init__()
        self.keys = nn.Parameter(torch.randn(SEQ, HEAD_DIM))

    def forward(self, q: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return torch.softmax((q @ self.keys.t()) * 0.125, dim=-1) @ v


def test_explicit_attention_over_parameters_compiles():
    # Both used to crash the backend: the same matmul was claimed by a linear and an attention site.
    q = torch.randn(BATCH, SEQ, HEAD_DIM)
    model = Nested(ParameterValues(), name="attn")
    assert explain(model, q, q.clone(), policy="fp8-attention").counts() == {"attention": 1}
    assert_compiled_close(model, q, q.clone(), policy="fp8-attention", band=FP8_ATTENTION_BAND)

    model = Nested(ParameterKeys(), name="attn")
    v = torch.randn(BATCH, SEQ, HEAD_DIM)
    assert explain(model, q, v, policy="fp8-attention").counts() == {"linear": 1, "matmul": 1}
    assert_compiled_close(model, q, v, policy="fp8-attention", band=(25.0, 80.0))


# -- sites that cannot be quantized: skipped with a reason, never a crash -------------------------


def test_k_not_divisible_by_group_size():
    model = Nested(nn.Linear(96, N))
    x = torch.randn(M, 96)
    site = only_site(explain(model, x, policy="w4a16"))
    assert (site.fqn, site.op) == ("block.proj", "linear")
    assert site.skip_reason == "weight: K=96 not divisible by group size 128"
    assert site.format is None and site.kernel is None and site.sqnr_db is None
    assert (site.weight_bytes_before, site.weight_bytes_after) == (0, 0)
    assert_compiled_exact(model, x, policy="w4a16")


def test_integer_operands():
    form = WeightForm(lambda m, x: x @ m.weight.t())
    form.weight = nn.Parameter(torch.randint(-8, 8, (N, K)), requires_grad=False)
    model = Nested(form)
    x = torch.randint(-8, 8, (M, K))
    site = only_site(explain(model, x, policy="w8a8"))
    assert site.op == "linear" and site.format is None
    assert site.skip_reason == "weight: dtype torch.int64 is not floating point"
    assert_compiled_exact(model, x, policy="w8a8")


def test_glob_rule_skips_matching_sites():
    policy = Policy(rules=(Rule(spec=None, fqn="block.*"),), default=QuantSpec("int8_row", "int8_row"))
    site = only_site(explain(Nested(nn.Linear(K, N)), torch.randn(M, K), policy=policy))
    assert (site.format, site.decided_by, site.skip_reason) == (
        None,
        "rule 0",
        "policy: rule 0 (fqn='block.*') leaves it unquantized",
    )


# -- a whole block: counters, FQNs, policy rules, report output ---------------------------------


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(dim, dim, bias=False) for _ in range(3))
        self.o_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, s, self.heads, d // self.heads).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x)),
                                             is_causal=True)  # fmt: skip
        return self.o_proj(out.transpose(1, 2).reshape(b, s, d))


class MLP(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.up = nn.Linear(dim, 2 * dim)
        self.down = nn.Linear(2 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x)))


class Layer(nn.Module):
    def __init__(self, dim: int = 128, heads: int = 2) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads)
        self.mlp = MLP(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm(x))
        return x + self.mlp(x)


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([Layer(), Layer()])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


def test_block_counts_fqns_and_rules():
    policy = Policy(
        rules=(
            Rule(spec=None, fqn="layers.*.mlp.*"),
            Rule(spec=QuantSpec(activation="fp8_e4m3_row"), op="attention"),
        ),
        default=QuantSpec("int8_row", "int8_row"),
        name="no-mlp",
    )
    model = Tiny()
    x = torch.randn(2, SEQ, 128)
    report = explain(model, x, policy=policy)
    assert report.counts() == {"linear": 12, "attention": 2}
    by_fqn = {site.fqn: site for site in report.sites}
    expected = {
        f"layers.{i}.{path}"
        for i in range(2)
        for path in ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj", "attn", "mlp.up", "mlp.down")
    }
    assert set(by_fqn) == expected and len(report.sites) == len(expected)
    assert [site.index for site in report.sites] == list(range(14))
    for fqn, site in by_fqn.items():
        if ".mlp." in fqn:
            assert (site.format, site.decided_by, site.sqnr_db) == (None, "rule 0", None)
            assert site.skip_reason == "policy: rule 0 (fqn='layers.*.mlp.*') leaves it unquantized"
        elif fqn.endswith(".attn"):
            assert (site.op, site.format, site.decided_by) == ("attention", "A=fp8_e4m3_row", "rule 1")
            assert_band(site.sqnr_db, FP8_ATTENTION_BAND)
        else:
            assert (site.op, site.format, site.kernel, site.decided_by) == ("linear", W8A8, "scaled_mm [reference]", "default")
            assert_band(site.sqnr_db, INT8_BAND)
    assert len(report.quantized) == 10 and len(report.skipped) == 4
    before, after = report.weight_bytes()
    assert before == 2 * 4 * 128 * 128 * 4 > after

    table = report.table()
    assert "layers.1.mlp.down" in table and "10/14 sites quantized" in table
    loaded = json.loads(report.to_json())
    assert loaded["policy"] == "no-mlp" and len(loaded["sites"]) == 14
    assert {site["fqn"] for site in loaded["sites"]} == expected
    assert_compiled_close(model, x, policy=policy, band=(20.0, 80.0))


# -- known bugs (outside the files this suite may fix); remove the marker once fixed -----------


class Chain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(K, K)
        self.fc2 = nn.Linear(K, N)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc1(x))  # fc2's activation is fc1's output, with nothing in between


@pytest.mark.parametrize("policy", ["w8a8", "w8a16"])
def test_directly_chained_linear_sites(policy):
    model = Chain()
    x = torch.randn(M, K)
    assert explain(model, x, policy=policy).counts() == {"linear": 2}
    assert_compiled_close(model, x, policy=policy, band=INT8_BAND)


class AttentionThenProjection(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.o_proj = nn.Linear(HEAD_DIM, N)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.o_proj(F.scaled_dot_product_attention(q, k, v))


def test_attention_output_directly_into_linear():
    model = AttentionThenProjection()
    args = qkv()
    assert explain(model, *args, policy="fp8-attention").counts() == {"attention": 1, "linear": 1}


def test_one_weight_used_in_both_layouts():
    model = Nested(WeightForm(lambda m, x: F.linear(x, m.weight) + x @ m.weight, (K, K)))
    x = torch.randn(M, K)
    assert explain(model, x, policy="w8a8").counts() == {"linear": 2}
