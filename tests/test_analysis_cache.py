"""The memoised mutation analysis (kernels/analysis_cache.py): same answers as torch's own, one
TTIR generation per distinct kernel variant, foreign kernels untouched.

Torch's analysis generates TTIR, which needs JITFunctions (not under TRITON_INTERPRET=1, CI's
setting) and a target (no GPU here: an sm_90 one is given), so it runs in a subprocess
(tests/_sm90.py). The attention kernel is the subject because what it writes depends on a
constexpr: the output at SPLITS == 1, the partial results and their statistics above."""

from __future__ import annotations

import pytest
from _sm90 import compile_in_subprocess

triton = pytest.importorskip("triton")

SCRIPT = r'''
import json, sys
import sympy, torch, triton
from triton.backends.compiler import GPUTarget


class _Target:  # the analysis only needs a target to generate TTIR for
    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)


triton.runtime.driver.set_active(_Target())
from torch._higher_order_ops import triton_kernel_wrap as tkw
from torch._subclasses.fake_tensor import FakeTensorMode

import lowbit_compile.ops  # noqa: F401  (installs the cache)
from lowbit_compile.kernels import analysis_cache
from lowbit_compile.kernels import attention as A

name = next(n for n in analysis_cache.NAMES if hasattr(tkw, n))
cached = getattr(tkw, name)
raw = getattr(cached, "__wrapped_analysis__", None)
generations = [0]
generate_ttir = tkw.generate_ttir


def counting_generate_ttir(*args, **kwargs):
    generations[0] += 1
    return generate_ttir(*args, **kwargs)


tkw.generate_ttir = counting_generate_ttir
fn = A.attention_kernel
constexprs = {p.name for p in fn.params if p.is_constexpr}
mode = FakeTensorMode()


def attention_kwargs(splits, length, symbolic):
    values = dict(
        HEAD_DIM=64, HEAD_DIM_V=64, IS_CAUSAL=False, MASK_KIND=0, QK_INT8=False, QK_QMAX=448.0, V_QMAX=448.0,
        SMOOTH_K=True, Q_SCALE_ROWS=1, PACK_ROWS=1, SPLITS=splits, SOFT_FP8=False, SCALE_FROM_D=False,
        PREQUANT=False, FOLD_V=True, BLOCK_M=16, BLOCK_N=64, KV_SCALE_ROWS=64, qk_scale=0.125,
    )
    with mode:
        for arg in fn.arg_names:
            if arg.endswith("_ptr"):
                dtype = torch.float32 if arg in ("partial_ptr", "stats_ptr") else torch.bfloat16
                values[arg] = torch.empty(length, dtype=dtype)
            elif arg not in values:
                values[arg] = sympy.Symbol("s0") if (symbolic and arg == "S") else 64
    assert set(values) == set(fn.arg_names), sorted(set(fn.arg_names) ^ set(values))
    return values


def writes(result):
    accesses = getattr(result, "read_writes", None)
    names = [dep.name for dep in accesses.writes] if accesses is not None else list(result)
    return sorted(names)


out = {"installed": raw is not None}
for case in json.loads(sys.stdin.read()):
    kw = attention_kwargs(case["splits"], case["length"], case["symbolic"])
    before = dict(analysis_cache.stats), generations[0]
    result = cached(fn, kw, {})
    out.setdefault("calls", []).append(dict(
        case=case, writes=writes(result), reference=writes(raw(fn, dict(kw), {})),
        hit=analysis_cache.stats["hits"] - before[0]["hits"],
        generated=generations[0] - before[1] - 1,  # less the reference's own generation
    ))
    if hasattr(result, "read_writes"):  # a caller changing its copy does not change the cache
        result.read_writes.writes.clear()


import importlib.util, pathlib, tempfile  # noqa: E401  (a kernel of another package: in a file)

path = pathlib.Path(tempfile.mkdtemp()) / "foreign_kernels.py"
path.write_text(
    "import triton\nimport triton.language as tl\n\n@triton.jit\n"
    "def foreign_kernel(x_ptr, y_ptr, N: tl.constexpr):\n"
    "    tl.store(y_ptr + tl.arange(0, N), tl.load(x_ptr + tl.arange(0, N)))\n"
)
spec = importlib.util.spec_from_file_location("foreign_kernels", path)
foreign_module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(foreign_module)
foreign_kernel = foreign_module.foreign_kernel

with mode:
    foreign = {"x_ptr": torch.empty(4), "y_ptr": torch.empty(4), "N": 4}
before = dict(analysis_cache.stats), generations[0]
results = [writes(cached(foreign_kernel, dict(foreign), {})) for _ in range(2)]
out["foreign"] = dict(writes=results, stats_changed=analysis_cache.stats != before[0],
                      generated=generations[0] - before[1])
print(json.dumps(out))
'''


def test_cached_analysis_answers_as_torch_and_generates_once_per_variant() -> None:
    cases = [
        {"splits": 1, "length": 8, "symbolic": False},
        {"splits": 4, "length": 8, "symbolic": False},
        {"splits": 1, "length": 1000, "symbolic": False},  # other sizes: the same variant
        {"splits": 1, "length": 8, "symbolic": True},  # a symbolic length: generate_ttir's constant
        {"splits": 4, "length": 24, "symbolic": True},
        {"splits": 1, "length": 8, "symbolic": False},
    ]
    out = compile_in_subprocess(SCRIPT, cases)
    assert out["installed"]
    calls = out["calls"]
    for call in calls:  # the cached answer is torch's, whatever was cached before it
        assert call["writes"] == call["reference"], call
        expected = ["out_ptr"] if call["case"]["splits"] == 1 else ["partial_ptr", "stats_ptr"]
        assert call["writes"] == expected, call
    # SPLITS is a constexpr: its two values are two entries; sizes and a symbolic S are not
    assert [c["hit"] for c in calls] == [0, 0, 1, 0, 0, 1]
    assert [c["generated"] for c in calls] == [1, 1, 0, 1, 1, 0]
    foreign = out["foreign"]
    assert foreign["writes"] == [["y_ptr"], ["y_ptr"]]
    assert not foreign["stats_changed"] and foreign["generated"] == 2


# -- the memo's own logic, in process, with a stand-in analysis ---------------------------------------


def _kernel(module: str):
    def body() -> None:
        pass

    body.__module__ = module

    class Kernel:  # a JITFunction / Autotuner stand-in: the chain of `.fn` ends at the Python function
        fn = body

    return Kernel()


def test_the_memo_keys_on_dtype_sym_and_values_and_passes_the_rest_through(monkeypatch) -> None:
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from lowbit_compile.kernels import analysis_cache

    calls = []

    def analysis(*args, **kwargs):
        calls.append(args)
        return [name for name, value in args[1].items() if isinstance(value, torch.Tensor)]

    cached = analysis_cache.memoised(analysis)
    ours, theirs = _kernel("lowbit_compile.kernels.fake"), _kernel("someone_else.kernels")
    with FakeTensorMode():
        x8, x1000, xb = torch.empty(8), torch.empty(1000), torch.empty(8, dtype=torch.bfloat16)
    assert cached(ours, {"x": x8, "N": 4}, {}) == ["x"] and len(calls) == 1
    result = cached(ours, {"x": x1000, "N": 4}, {})  # another size: the same analysis
    assert result == ["x"] and len(calls) == 1
    result.append("changed")  # the caller's copy
    assert cached(ours, {"x": x8, "N": 4}, {}) == ["x"] and len(calls) == 1
    cached(ours, {"x": xb, "N": 4}, {})  # another dtype
    cached(ours, {"x": x8, "N": 8}, {})  # another value
    cached(ours, {"x": x8, "N": True}, {})  # a bool is not the int 1
    cached(ours, {"x": x8, "N": 1}, {})
    assert len(calls) == 5
    cached(ours, {"x": x8, "N": 1}, {})
    assert len(calls) == 5
    for args in (
        (theirs, {"x": x8, "N": 4}, {}),  # another package's kernel
        (ours, {"x": x8, "N": object()}, {}),  # an argument of a kind the key does not know
        (ours, {"x": x8, "N": 4}, {"x": ("stable", ([8],))}),  # TMA descriptors
        (ours, {"x": x8, "N": 4}),  # another call shape
    ):
        before = len(calls)
        cached(*args)
        cached(*args)
        assert len(calls) == before + 2, args


def test_install_wraps_once_and_can_be_switched_off(monkeypatch) -> None:
    from torch._higher_order_ops import triton_kernel_wrap

    from lowbit_compile.kernels import analysis_cache

    present = [name for name in analysis_cache.NAMES if hasattr(triton_kernel_wrap, name)]
    assert present, "torch renamed its Triton mutation analysis: update analysis_cache.NAMES"
    for name in present:
        monkeypatch.setattr(triton_kernel_wrap, name, getattr(triton_kernel_wrap, name))
        original = getattr(getattr(triton_kernel_wrap, name), "__wrapped_analysis__", None)
        if original is not None:  # lowbit_compile.ops installed it already
            monkeypatch.setattr(triton_kernel_wrap, name, original)
    monkeypatch.setenv("LOWBIT_ANALYSIS_CACHE", "0")
    assert analysis_cache.install() is False
    assert not any(hasattr(getattr(triton_kernel_wrap, n), "__wrapped_analysis__") for n in present)
    monkeypatch.delenv("LOWBIT_ANALYSIS_CACHE")
    assert analysis_cache.install() is True
    wrapped = {n: getattr(triton_kernel_wrap, n) for n in present}
    assert all(hasattr(w, "__wrapped_analysis__") for w in wrapped.values())
    assert analysis_cache.install() is True
    assert {n: getattr(triton_kernel_wrap, n) for n in present} == wrapped  # not wrapped twice


def test_the_memo_keys_floats_by_bits_autotuner_configs_and_one_cache_per_function(monkeypatch) -> None:
    from lowbit_compile.kernels import analysis_cache

    calls = []

    def analysis(*args):
        calls.append(args)
        return ["out"]

    def other_analysis(*args):
        calls.append(args)
        return ("a", "different", "type")

    cached, other = analysis_cache.memoised(analysis), analysis_cache.memoised(other_analysis)
    ours = _kernel("lowbit_compile.kernels.fake")
    nan = float("nan")
    for value in (nan, nan, 0.0, -0.0, 0.0):
        cached(ours, {"scale": value}, {})
    assert len(calls) == 3  # NaN once, 0.0 and -0.0 apart
    assert other(ours, {"scale": 0.0}, {}) == ("a", "different", "type") and len(calls) == 4

    class Config:
        def __init__(self, **kwargs):
            self.kwargs = kwargs

    ours.configs = [Config(BLOCK=16)]
    cached(ours, {"scale": 1.0}, {})
    cached(ours, {"scale": 1.0}, {})
    ours.configs = [Config(BLOCK=32)]  # generate_ttir reads the first config's kwargs
    cached(ours, {"scale": 1.0}, {})
    assert len(calls) == 6

    def broken_key(value):
        raise RuntimeError("an argument the key cannot read")

    monkeypatch.setattr(analysis_cache, "_argument_key", broken_key)
    assert cached(ours, {"scale": 1.0}, {}) == ["out"] and len(calls) == 7  # torch decides


def test_kernel_source_closure_is_memoised_per_kernel_of_ours(monkeypatch) -> None:
    from torch._inductor.codegen import wrapper

    from lowbit_compile.kernels import analysis_cache

    calls = []

    def closure(kernel, epilogue_fusion=None):
        calls.append((kernel, epilogue_fusion))
        return f"source of {id(kernel)} {epilogue_fusion}"

    cached = analysis_cache.memoised_source(closure)
    ours, other = _kernel("lowbit_compile.kernels.fake"), _kernel("lowbit_compile.kernels.fake2")
    first = cached(ours)
    assert first == closure(ours) and len(calls) == 2
    assert cached(ours) == first and cached(ours, None) == first and len(calls) == 2
    assert cached(other) == closure(other) and len(calls) == 4  # another kernel: its own entry
    theirs = _kernel("someone_else.kernels")
    for args, kw in (((theirs,), {}), ((ours, ("epilogue", "src")), {}), ((ours,), {"epilogue_fusion": None})):
        before = len(calls)
        cached(*args, **kw)
        cached(*args, **kw)
        assert len(calls) == before + 2, (args, kw)  # not ours; an epilogue's own source; another call shape
    # install() wraps Inductor's function once, and only with the cache on
    raw = getattr(wrapper, analysis_cache.SOURCE_NAME)
    raw = getattr(raw, "__wrapped_source__", raw)
    monkeypatch.setattr(wrapper, analysis_cache.SOURCE_NAME, raw)
    monkeypatch.setenv("LOWBIT_ANALYSIS_CACHE", "0")
    analysis_cache.install()
    assert getattr(wrapper, analysis_cache.SOURCE_NAME) is raw
    monkeypatch.delenv("LOWBIT_ANALYSIS_CACHE")
    analysis_cache.install()
    wrapped = getattr(wrapper, analysis_cache.SOURCE_NAME)
    assert wrapped.__wrapped_source__ is raw
    analysis_cache.install()
    assert getattr(wrapper, analysis_cache.SOURCE_NAME) is wrapped
