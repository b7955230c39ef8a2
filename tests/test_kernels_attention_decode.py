"""The FMA decode kernel (`kernels/attention_decode.py`, query length 1) in Triton's interpreter:
against `reference.attention` of the same format and float64 SDPA, over GQA groups that are and are
not powers of two, split KV, both prefetch settings, masks (a head that sees nothing), causal,
head dims to pad (D != Dv), NaN, and the op body. Each case also checks that the FMA kernel ran
(and the packed MMA tile did not), so a dispatch change cannot turn these into MMA tests."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from lowbit_compile import reference
from lowbit_compile.report import sqnr

triton = pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1 before triton is imported"
)

from _attention_formats import FP8, INT8  # noqa: E402  (16-token test formats)

from lowbit_compile import ops  # noqa: E402, F401  (registers the ops)
from lowbit_compile.kernels import attention as kernel  # noqa: E402

KERNEL_VS_REFERENCE_DB = 40.0
VS_EXACT_DB = {FP8: 22.0, INT8: 25.0}


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


@pytest.fixture
def fma_calls(monkeypatch):
    """Counts launches of the FMA decode path; fails the test if the packed MMA tile runs."""
    calls = []
    original = kernel._run_fma_decode

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return original(*args, **kwargs)

    monkeypatch.setattr(kernel, "DECODE_FMA", True)  # opt-in (slower than the MMA tile on H100)
    monkeypatch.setattr(kernel, "_run_fma_decode", spy)
    monkeypatch.setattr(kernel, "attention_kernel", None)  # the MMA kernel: launching it raises
    return calls


def heads_last(batch, heads, length, dim, dtype=torch.float16):
    return torch.randn(batch, length, heads, dim, dtype=dtype).transpose(1, 2)


def check(q, k, v, mask=None, causal=False, fmt=FP8, scale=None, config=None):
    config = {"num_warps": 4, "PREFETCH": True} if config is None else config
    gqa = q.shape[1] != k.shape[1]
    out = kernel.run(q, k, v, mask, causal, scale, gqa, fmt, torch.float32, config=config)
    expected = reference.attention(q, k, v, mask, causal, scale, gqa, fmt)
    exact_mask = mask if mask is None or mask.dtype == torch.bool else mask.double()
    exact = F.scaled_dot_product_attention(
        q.double(), k.double(), v.double(), attn_mask=exact_mask, is_causal=causal, scale=scale, enable_gqa=gqa
    ).float()
    assert out.shape == expected.shape and out.is_contiguous()
    assert torch.equal(out.isnan(), expected.isnan())
    assert sqnr(expected, out) >= KERNEL_VS_REFERENCE_DB, sqnr(expected, out)
    assert sqnr(exact, out) >= VS_EXACT_DB[fmt], sqnr(exact, out)
    return out


@pytest.mark.parametrize("fmt", [FP8, INT8])
@pytest.mark.parametrize("group", [1, 3, 4, 8])
@pytest.mark.parametrize("prefetch", [True, False])
def test_groups_and_split_kv(monkeypatch, fma_calls, fmt, group, prefetch):
    # 77 keys: five 16-key blocks, the last partial; 3 programs per "SM" (the CPU counts as 4) on
    # 4 (batch, kv head) programs give 3 splits of 32 keys, the last one partial.
    monkeypatch.setattr(kernel, "DECODE_FMA_PROGRAMS_PER_SM", 3)
    assert kernel._splits(2, 2, 77, 16, torch.device("cpu"), 3) == 3
    q, k, v = heads_last(2, 2 * group, 1, 32), heads_last(2, 2, 77, 32), heads_last(2, 2, 77, 32)
    check(q, k, v, fmt=fmt, config={"num_warps": 4, "PREFETCH": prefetch})
    assert len(fma_calls) == 1


@pytest.mark.parametrize("fmt", [FP8, INT8])
def test_one_split_masks_and_a_head_that_sees_nothing(fma_calls, fmt):
    q, k, v = heads_last(2, 8, 1, 32), heads_last(2, 2, 40, 32), heads_last(2, 2, 40, 32)
    additive = torch.randn(2, 8, 1, 40)
    additive[..., 5:19] = float("-inf")
    additive[1, 3] = torch.finfo(torch.float32).min  # eager-style finite fill: stays finite, averages V
    check(q, k, v, mask=additive, fmt=fmt, scale=0.2)
    keep = torch.rand(2, 8, 1, 40) > 0.3
    keep[0, 6] = False  # one head of the group sees no key: 0, as SDPA
    out = check(q, k, v, mask=keep, fmt=fmt)
    assert (out[0, 6] == 0).all()
    assert len(fma_calls) == 2


def test_causal_single_query_sees_key_zero_only(fma_calls):
    q, k, v = heads_last(1, 4, 1, 32), heads_last(1, 2, 50, 32), heads_last(1, 2, 50, 32)
    out = check(q, k, v, causal=True, fmt=INT8, scale=0.3)
    # key 0's value, as quantized in its block (v's block scale covers all 16 keys of block 0)
    assert sqnr(v[:, :, :1].repeat_interleave(2, 1).float(), out) >= 25.0
    assert len(fma_calls) == 1


def test_head_dims_to_pad_and_value_dim_unlike_key_dim(monkeypatch, fma_calls):
    monkeypatch.setattr(kernel, "DECODE_FMA_PROGRAMS_PER_SM", 2)
    q, k, v = heads_last(1, 4, 1, 48), heads_last(1, 2, 45, 48), heads_last(1, 2, 45, 40)
    check(q, k, v, fmt=FP8)
    check(q, k, v, fmt=INT8, config={"num_warps": 4, "PREFETCH": False})
    assert len(fma_calls) == 2


def test_nan_in_a_key_block_and_a_zero_query(fma_calls):
    q = heads_last(1, 4, 1, 32, torch.float32)
    k, v = heads_last(1, 2, 40, 32, torch.float32), heads_last(1, 2, 40, 32, torch.float32)
    q[:, 1] = 0  # a zero query: uniform attention over the keys, no NaN
    out = check(q, k, v, fmt=FP8)
    assert torch.isfinite(out).all()
    k[0, 1, 21, 3] = float("nan")  # kv head 1's block 1: both its q heads see it
    out = kernel.run(q, k, v, None, False, None, True, FP8, torch.float32, config={"num_warps": 4})
    expected = reference.attention(q, k, v, None, False, None, True, FP8)
    assert out[:, 2:].isnan().all() and expected[:, 2:].isnan().all()
    assert torch.isfinite(out[:, :2]).all()
    assert len(fma_calls) == 2


def test_op_body_decode_step(fma_calls):
    q, k, v = heads_last(2, 8, 1, 32), heads_last(2, 2, 33, 32), heads_last(2, 2, 33, 32)
    out = torch.ops.lowbit.block_attention_triton(q, k, v, None, False, None, True, INT8, torch.float16)
    expected = torch.ops.lowbit.block_attention(q, k, v, None, False, None, True, INT8, torch.float16)
    assert out.dtype == torch.float16 and out.shape == (2, 8, 1, 32)
    assert sqnr(expected.float(), out.float()) >= KERNEL_VS_REFERENCE_DB
    assert len(fma_calls) == 1


def test_packed_mma_tile_still_serves_decode_when_switched_off(monkeypatch):
    monkeypatch.setattr(kernel, "DECODE_FMA", False)
    assert not kernel.fma_decode(1, 4)
    monkeypatch.setattr(kernel, "_run_fma_decode", None)  # calling it would raise
    q, k, v = heads_last(1, 4, 1, 32), heads_last(1, 2, 40, 32), heads_last(1, 2, 40, 32)
    out = kernel.run(q, k, v, None, False, None, True, FP8, torch.float32, config=kernel.default_config(FP8))
    assert sqnr(reference.attention(q, k, v, None, False, None, True, FP8), out) >= KERNEL_VS_REFERENCE_DB


def test_dispatch(monkeypatch):
    assert not kernel.fma_decode(1, 4)  # off by default
    monkeypatch.setattr(kernel, "DECODE_FMA", True)
    assert kernel.fma_decode(1, 4) and kernel.fma_decode(1, 16) and kernel.fma_decode(1, 3)
    assert not kernel.fma_decode(2, 4)  # several queries: the packed MMA tile
    assert not kernel.fma_decode(1, 32)  # group beyond attention_decode.MAX_GROUP
