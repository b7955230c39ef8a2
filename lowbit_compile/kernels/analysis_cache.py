"""Torch's mutation analysis of this package's Triton kernels, memoised.

At every `wrap_triton` launch it traces, torch.compile asks which tensors the kernel reads and
writes (`torch._higher_order_ops.triton_kernel_wrap.identify_accessed_tensors`; older torch:
`identify_mutated_tensors`): once in functionalization and again when Inductor lowers the launch
(and when it re-checks a graph), each time by generating the kernel's TTIR from its source: 20-100
ms per launch for our kernels. A model compiled whole has hundreds of quantized sites launching a
handful of kernel variants, so the same analysis runs hundreds of times.

The analysis is a function of the kernel and of what `generate_ttir` makes of each argument: a
fake tensor or an Inductor `TensorBox` becomes an empty tensor of its dtype, a symbolic value a
constant, anything else is passed on as it is. The cache key is exactly that (the dtype, "sym",
or the value itself; an argument of any other kind is not cached), so a hit returns what the
analysis would have returned. Only kernels defined in `lowbit_compile` go through the cache. A failed
analysis (torch then assumes every tensor is read and written: slower, never wrong) is kept like
any other answer for the rest of the process.
`LOWBIT_ANALYSIS_CACHE=0` turns it off (before `lowbit_compile` is imported). Hits and misses
count in `stats` and in `torch._dynamo.utils.counters["lowbit"]` (`analysis_cache_hits`, `..._misses`).
Inductor's kernel-source closure (`SOURCE_NAME`, asked for by every cache key) is memoised the same
way, per kernel (`memoised_source`; `analysis_cache_source_hits`, `..._misses`).
"""

from __future__ import annotations

import copy
import functools
import os
from typing import Any, Callable

import torch

NAMES = ("identify_accessed_tensors", "identify_mutated_tensors")  # newer torch, older torch

stats = {"hits": 0, "misses": 0, "source_hits": 0, "source_misses": 0}


class _Uncacheable(Exception):
    pass


def _python_function(kernel: Any) -> Any:
    """The Python function under a JITFunction / Autotuner / heuristics wrapper chain."""
    for _ in range(8):
        inner = getattr(kernel, "fn", None)
        if inner is None:
            break
        kernel = inner
    return kernel


def is_ours(kernel: Any) -> bool:
    return getattr(_python_function(kernel), "__module__", "").startswith("lowbit_compile.")


def _argument_key(value: Any) -> tuple:
    import sympy
    from torch._subclasses.fake_tensor import FakeTensor

    if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool, sympy.Expr)):
        return ("sym",)
    if isinstance(value, FakeTensor):
        return ("tensor", value.dtype)
    if isinstance(value, torch.Tensor):  # a real tensor goes to Triton as it is: its alignment counts
        return ("real tensor", value.dtype, value.data_ptr() % 16 == 0)
    try:
        from torch._inductor.ir import TensorBox

        if isinstance(value, TensorBox):
            return ("tensor", value.dtype)
    except ImportError:  # pragma: no cover - Inductor is part of torch
        pass
    if isinstance(value, float):  # by its bits: NaN equals itself, -0.0 is not 0.0
        return ("float", value.hex())
    if value is None or isinstance(value, (bool, int, str, torch.dtype)):
        return (type(value).__name__, value)
    raise _Uncacheable


def _arguments_key(kwargs: dict[str, Any]) -> tuple:
    return tuple(sorted((name, _argument_key(value)) for name, value in kwargs.items()))


def _key(kernel: Any, kwargs: dict[str, Any], tma_descriptor_metadata: Any) -> tuple:
    if tma_descriptor_metadata:
        raise _Uncacheable
    # an Autotuner's first config's kwargs join the arguments (generate_ttir): read them per call
    configs = getattr(kernel, "configs", None)
    first = _arguments_key(configs[0].kwargs) if configs else ()
    return (id(kernel), first, _arguments_key(kwargs))


def _count(what: str) -> None:
    from torch._dynamo.utils import counters

    stats[what] += 1
    counters["lowbit"][f"analysis_cache_{what}"] += 1


def memoised(analysis: Callable) -> Callable:
    cache: dict[tuple, tuple[Any, Any]] = {}  # key -> (kernel kept alive for its id, result)

    @functools.wraps(analysis)
    def cached(*args: Any, **kw: Any) -> Any:
        # (kernel, kwargs, tma_descriptor_metadata) as torch 2.11-2.13 call it; any other call shape
        # (a later torch's) goes straight through
        if len(args) != 3 or kw or not isinstance(args[1], dict) or not is_ours(args[0]):
            return analysis(*args, **kw)
        kernel, kwargs, tma_descriptor_metadata = args
        try:
            key = _key(kernel, kwargs, tma_descriptor_metadata)
        except Exception:  # noqa: BLE001 - _Uncacheable, or an argument the key cannot read: torch decides
            return analysis(kernel, kwargs, tma_descriptor_metadata)
        hit = cache.get(key)
        if hit is not None and hit[0] is kernel:
            _count("hits")
            return copy.deepcopy(hit[1])
        _count("misses")
        result = analysis(kernel, kwargs, tma_descriptor_metadata)
        cache[key] = (kernel, copy.deepcopy(result))
        return result

    cached.__wrapped_analysis__ = analysis  # type: ignore[attr-defined]
    return cached


# Inductor's source of a user kernel and everything it calls (`torch._inductor.codegen.wrapper`):
# AOTAutograd's cache key asks for it for every kernel of every triton_op node of a graph, on every
# compile, warm or not (87 nodes of a 4-layer Llama: 135 calls of a few ms each, disassembling each
# kernel's bytecode and walking its callees). For a kernel the answer depends on its source and
# the globals it reads, which Triton itself takes as fixed once the kernel has compiled (it refuses
# a launch after a global it used has changed), so it is memoised per kernel object.
SOURCE_NAME = "user_defined_triton_kernel_transitive_closure_source_code"


def memoised_source(closure: Callable) -> Callable:
    cache: dict[int, tuple[Any, str]] = {}  # id(kernel) -> (kernel kept alive for its id, source)

    @functools.wraps(closure)
    def cached(*args: Any, **kw: Any) -> Any:
        # (kernel) or (kernel, None) as torch 2.11-2.13 call it; an epilogue fusion (its own source)
        # or any other call shape goes straight through
        if kw or not args or len(args) > 2 or (len(args) == 2 and args[1] is not None) or not is_ours(args[0]):
            return closure(*args, **kw)
        kernel = args[0]
        hit = cache.get(id(kernel))
        if hit is not None and hit[0] is kernel:
            _count("source_hits")
            return hit[1]
        _count("source_misses")
        source = closure(kernel)
        cache[id(kernel)] = (kernel, source)
        return source

    cached.__wrapped_source__ = closure  # type: ignore[attr-defined]
    return cached


def install() -> bool:
    """Wrap torch's analysis (whichever name this torch has) and Inductor's kernel-source closure
    once; False if there is no analysis or the cache is switched off."""
    if os.environ.get("LOWBIT_ANALYSIS_CACHE", "1") == "0":
        return False
    try:
        from torch._higher_order_ops import triton_kernel_wrap
    except ImportError:  # pragma: no cover
        return False
    installed = False
    for name in NAMES:
        analysis = getattr(triton_kernel_wrap, name, None)
        if analysis is None:
            continue
        if not hasattr(analysis, "__wrapped_analysis__"):
            setattr(triton_kernel_wrap, name, memoised(analysis))
        installed = True
    try:
        from torch._inductor.codegen import wrapper
    except ImportError:  # pragma: no cover
        return installed
    closure = getattr(wrapper, SOURCE_NAME, None)
    if closure is not None and not hasattr(closure, "__wrapped_source__"):
        setattr(wrapper, SOURCE_NAME, memoised_source(closure))
    return installed


__all__ = ["NAMES", "SOURCE_NAME", "install", "is_ours", "memoised", "memoised_source", "stats"]
