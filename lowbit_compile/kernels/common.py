"""Pieces every kernel family shares: the split-K reduction, one-config launchers, M buckets and
the flattened tile plan that a fused op carries from compile time to run time.

M buckets. A compiled graph serves every M (decode and prefill) without a recompile: the op body
launches each bucket's kernel with its grid multiplied by an indicator (1 if this call's M is in
the bucket, else 0, as SymInt arithmetic). A launch with an empty grid is skipped by Triton (and a
CUDA graph never records it), so exactly one bucket runs and no guard is put on M.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is optional
    triton = None
    tl = None

# Rows (first, last) each bucket serves (last None: no limit), and the M its configs are tuned at.
M_BUCKETS: tuple[tuple[int, int | None, int], ...] = ((1, 1, 1), (2, 16, 16), (17, 128, 128), (129, None, 4096))

# Copies of a weight made for timing candidates together exceed this (a model's weights do not stay
# in L2 between calls, so neither may the tuner's).
L2_BYTES = 64 * 2**20

SUM_BLOCK = 1024

if triton is not None:

    @triton.jit
    def splitk_sum_kernel(partial_ptr, out_ptr, numel, stride_ps, SPLIT_K: tl.constexpr, BLOCK: tl.constexpr):
        """out = sum of SPLIT_K fp32 partials (contiguous (M, N) each), cast to out's dtype."""
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < numel
        acc = tl.load(partial_ptr + offs, mask=mask, other=0.0)
        for s in tl.static_range(1, SPLIT_K):
            acc += tl.load(partial_ptr + s * stride_ps + offs, mask=mask, other=0.0)
        tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def sum_partials(partials: torch.Tensor, out: torch.Tensor, split_k: int, split_stride, active=1, wrap=None) -> None:
    """out (M, N) = the sum of the `split_k` fp32 partials stacked in `partials`."""
    summing = wrap(splitk_sum_kernel) if wrap is not None else splitk_sum_kernel
    numel = out.shape[0] * out.shape[1]
    summing[(((numel + SUM_BLOCK - 1) // SUM_BLOCK) * active,)](
        partials, out, numel, split_stride, SPLIT_K=split_k, BLOCK=SUM_BLOCK
    )


_runner_cache: dict[tuple[Callable, int, int], object] = {}


def runner(kernel, num_warps: int, num_stages: int):
    """`kernel` with its warps and stages fixed, as a one-config autotuner: the form both Triton's
    launcher and Inductor's user-kernel codegen take these settings from."""
    key = (kernel, num_warps, num_stages)
    if key not in _runner_cache:
        config = triton.Config({}, num_warps=num_warps, num_stages=num_stages)
        _runner_cache[key] = triton.autotune(configs=[config], key=[])(kernel)
    return _runner_cache[key]


def bucket_indicator(m, first: int, last: int | None):
    """1 if first <= m <= last else 0, as SymInt arithmetic (no guard on a dynamic m)."""
    above = torch.sym_max(0, torch.sym_min(1, m - first + 1))
    if last is None:
        return above
    return above * torch.sym_max(0, torch.sym_min(1, last - m + 1))


def statically_zero(value) -> bool:
    if isinstance(value, int):
        return value == 0
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    return statically_known_true(value == 0)


def active_buckets(m, buckets):
    """(indicator, last row, config) of each bucket that may hold M rows (`bucket_indicator`), for
    the launches of one plan; buckets statically known to be empty are left out."""
    for first, last, config in buckets:
        active = bucket_indicator(m, first, last)
        if not statically_zero(active):
            yield active, last, config


def flatten_plan(buckets: list[tuple[int, int | None, tuple[int, ...]]]) -> list[int]:
    """[(first row, last row or None, config tuple)] -> the op's `int[]` plan argument."""
    flat: list[int] = []
    for first, last, config in buckets:
        flat += [first, -1 if last is None else last, *config]
    return flat


def unflatten_plan(flat: list[int], fields: int) -> list[tuple[int, int | None, tuple[int, ...]]]:
    """The inverse of `flatten_plan` for configs of `fields - 2` integers."""
    buckets = []
    for i in range(0, len(flat), fields):
        first, last, *config = flat[i : i + fields]
        buckets.append((first, None if last < 0 else last, tuple(config)))
    return buckets


def restrict_plan(flat: list[int], fields: int, first_row: int, last_row: int | None) -> list[int]:
    """The buckets of a plan clipped to rows [first_row, last_row] (None: no limit); buckets that
    fall outside are dropped. `auto_mm` splits M between two kernel families this way."""
    kept = []
    for first, last, config in unflatten_plan(flat, fields):
        lo = max(first, first_row)
        hi = last if last_row is None else (last_row if last is None else min(last, last_row))
        if hi is None or lo <= hi:
            kept.append((lo, hi, config))
    return flatten_plan(kept)


def timed_launch(launch: Callable[..., None], weights, activations, bias, out, meta, config) -> Callable[[], None]:
    """A tuning candidate's launch of `config`: compiled (and failing early) here, outside the
    timing; each call then takes the next of `weights` (copies of one weight that together exceed
    L2: in a model no weight stays in L2 between calls). A bucket's candidates share `activations`
    and `out` (they are timed one at a time; compiled at once, their first launches all write the
    same output, which nothing reads)."""
    launch(*activations, *weights[0], bias, out, meta, config)
    turn = [0]

    def run_once() -> None:
        turn[0] = (turn[0] + 1) % len(weights)
        launch(*activations, *weights[turn[0]], bias, out, meta, config)

    return run_once


def once_per_key(make: Callable) -> Callable:
    """`functools.cache` for the tuner's builders (weight copies, a bucket's operands), which its
    threads call at once: one build per argument, the others wait for it (no duplicate 1 GB
    outputs)."""
    lock = threading.Lock()
    cached = functools.cache(make)

    @functools.wraps(make)
    def get(*args):
        with lock:
            return cached(*args)

    return get
