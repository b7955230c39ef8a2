"""The int4 scale-search kernel (`kernels/weight_search.py`) in Triton's interpreter (CPU, CI),
against the torch search it replaces on CUDA (`weight_search.search_quantize`, same grid and rounds):
symmetric and asymmetric groups of 32, weighted and not; codes consistent with the scales it
returns; never worse than round-to-nearest, group by group; RTN's exact result for zero and
non-finite groups; and `search_quantize` dispatching to it."""

from __future__ import annotations

import os

import pytest
import torch

from lowbit_compile import reference, weight_search
from lowbit_compile.formats import Format, get_format

triton = pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1 before triton is imported"
)

from lowbit_compile.kernels import weight_search as kernel  # noqa: E402


def weights(rows: int, k: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    """Gaussian rows with a few outliers per row (the case the search is for)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, k, generator=g)
    spots = torch.randint(0, k, (rows, 3), generator=g)
    w.scatter_(1, spots, 6 * torch.randn(rows, 3, generator=g))
    return w.to(dtype)


def group_errors(w: torch.Tensor, q: reference.QuantizedTensor, fmt, importance=None) -> torch.Tensor:
    """Squared reconstruction error per group (R, G) of a reference-layout quantization."""
    fmt = get_format(fmt)
    diff = reference.dequantize(q, fmt, torch.float32) - w.float()
    squares = diff.square() if importance is None else diff.square() * importance
    return squares.unflatten(-1, (-1, fmt.group_size)).sum(-1)


def run_kernel(w, fmt, importance=None, steps=weight_search.REFINE_STEPS, grid=weight_search.SHRINK_GRID):
    fmt = get_format(fmt)
    rtn = reference.quantize(w, fmt)
    grid = torch.tensor(grid, dtype=torch.float32)
    codes, scale, zero = kernel.search_groups(
        w.contiguous(), reference.unpack_4bit(rtn.data).contiguous(), rtn.scale.contiguous(),
        None if rtn.zero_point is None else rtn.zero_point.contiguous(), fmt, grid, steps, importance,
    )  # fmt: skip
    return rtn, reference.QuantizedTensor(reference.pack_4bit(codes), scale, zero, None), codes


@pytest.mark.parametrize("fmt", ["int4_g32_asym", "int4_g32"])
@pytest.mark.parametrize("weighted", [False, True])
def test_kernel_matches_the_torch_search(fmt, weighted):
    w = weights(24, 96, seed=1)  # 72 groups: the last program's block is partly empty
    importance = torch.rand(96, generator=torch.Generator().manual_seed(2)) * 3 if weighted else None
    rtn, got, codes = run_kernel(w, fmt, importance)
    expected = weight_search.search_quantize(w, fmt, importance=importance)
    assert got.data.dtype == torch.uint8 and got.data.shape == expected.data.shape
    assert got.scale.shape == expected.scale.shape and got.scale.dtype == torch.float32
    assert (got.zero_point is None) == (expected.zero_point is None)
    err, want, rtn_err = (group_errors(w, q, fmt, importance) for q in (got, expected, rtn))
    # never worse than round-to-nearest, group by group (the search's guarantee)
    assert bool((err <= rtn_err).all())
    # the same search: per group the error torch's search reaches (sums in another order move the
    # least-squares scales by ulps: 1e-6 relative here; a near tie of the grid may go the other way)
    close = ((err - want).abs() <= 1e-4 * want).float().mean()
    assert close >= 0.97, f"only {close:.2f} of the groups end where torch's search does"
    assert err.sum() <= want.sum() * 1.001
    # it searched (RTN leaves this much error on these outlier rows)
    assert err.sum() < rtn_err.sum() * 0.97
    # the codes are the nearest ones for the scales (and zero points) it returned
    f = get_format(fmt)
    w_groups = w.unflatten(-1, (-1, f.group_size))
    zero = None if got.zero_point is None else got.zero_point.unsqueeze(-1)
    nearest = weight_search._encode(w_groups, got.scale.unsqueeze(-1), zero, f) + (8 if f.symmetric else 0)
    searched = got.scale != rtn.scale
    assert torch.equal(codes.unflatten(-1, (-1, f.group_size))[searched], nearest[searched].to(torch.uint8))


def test_refinement_rounds_lower_the_error():
    w = weights(16, 64, seed=3)
    _, grid_only, _ = run_kernel(w, "int4_g32_asym", steps=0)
    _, refined, _ = run_kernel(w, "int4_g32_asym")
    before, after = (group_errors(w, q, "int4_g32_asym") for q in (grid_only, refined))
    assert bool((after <= before).all()) and after.sum() < before.sum() * 0.995


@pytest.mark.parametrize("fmt", ["int4_g32_asym", "int4_g32"])
def test_groups_the_search_does_worse_on_keep_round_to_nearest(fmt):
    # A grid of one poor factor and no refinement: most groups lose to RTN and must keep it exactly.
    w = weights(8, 64, seed=6)
    rtn, got, _ = run_kernel(w, fmt, steps=0, grid=(0.4,))
    err, rtn_err = group_errors(w, got, fmt), group_errors(w, rtn, fmt)
    kept = got.scale == rtn.scale
    assert kept.float().mean() > 0.5 and bool((err <= rtn_err).all())
    assert torch.equal(err[kept], rtn_err[kept])


@pytest.mark.parametrize("fmt", ["int4_g32_asym", "int4_g32"])
def test_zero_and_non_finite_groups_keep_round_to_nearest(fmt):
    w = weights(4, 128, seed=4, dtype=torch.bfloat16)  # bf16 read as it is
    w[0, :32] = 0.0
    w[1, 40] = float("nan")
    w[2, 70] = float("inf")
    w[3, 100] = float("-inf")
    rtn, got, _ = run_kernel(w, fmt)
    for row, group in ((0, 0), (1, 1), (2, 2), (3, 3)):
        cols = slice(group * 16, group * 16 + 16)  # packed bytes of the group
        assert torch.equal(got.data[row, cols], rtn.data[row, cols])
        assert torch.equal(got.scale[row, group], rtn.scale[row, group]) or (
            got.scale[row, group].isnan() and rtn.scale[row, group].isnan()
        )
    assert float(got.scale[0, 0]) == 0.0
    # the finite groups were searched
    assert (got.scale != rtn.scale).any()


def test_search_quantize_dispatches_to_the_kernel(monkeypatch):
    calls = []
    original = kernel.search_groups

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return original(*args, **kwargs)

    monkeypatch.setattr(kernel, "search_groups", spy)
    monkeypatch.setattr(weight_search, "_use_kernel", lambda x, fmt: kernel.supports(fmt))
    w = weights(6, 64, seed=5).reshape(2, 3, 64)  # leading dims fold into rows
    q = weight_search.search_quantize(w, "int4_g32_asym")
    assert calls == [torch.Size([6, 64])]
    rtn = reference.quantize(w, "int4_g32_asym")
    assert q.data.shape == rtn.data.shape and q.scale.shape == rtn.scale.shape
    assert q.zero_point.shape == rtn.zero_point.shape
    assert bool((group_errors(w, q, "int4_g32_asym") <= group_errors(w, rtn, "int4_g32_asym")).all())
    assert (q.scale != rtn.scale).any()


def test_which_tensors_and_formats_take_the_kernel():
    assert not weight_search._use_kernel(torch.zeros(4, 32), get_format("int4_g32_asym"))  # CPU: torch
    assert all(kernel.supports(get_format(f"int4_g{g}{s}")) for g in (32, 64, 128) for s in ("", "_asym"))
    assert not kernel.supports(Format("test_int4_row", "int4", "row"))  # one group per row: torch
