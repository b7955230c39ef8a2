"""Compile the int4 scale-search kernel (`kernels/weight_search.py`) for sm_90 on the CPU, with
whatever Triton is installed, for every format and option it is launched with (`tests/_sm90.py`):
front-end and lowering errors show in CI, not first at a compile on a GPU."""

from __future__ import annotations

import pytest
from _sm90 import compile_in_subprocess

triton = pytest.importorskip("triton")

SCRIPT = r'''
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from lowbit_compile.kernels import weight_search as K

fn = K.search_groups_kernel
assert isinstance(fn, triton.runtime.jit.JITFunction), type(fn)
POINTERS = {"w_ptr": "*bf16", "codes_ptr": "*u8", "rtn_codes_ptr": "*u8"}

def compile_case(case):
    sig, attrs = signature_of(fn, POINTERS)
    g = case["group"]
    cons = dict(GROUP=g, BLOCK_GROUPS=K.ELEMENTS_PER_PROGRAM // g, N_GRID=17, STEPS=6, ASYM=case["asym"],
                WEIGHTED=case["weighted"], QMIN=0.0 if case["asym"] else -8.0, QMAX=15.0 if case["asym"] else 7.0)
    src = ASTSource(fn=fn, signature=sig, constexprs=cons, attrs=attrs)
    try:
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": K.NUM_WARPS})
    except Exception as e:  # noqa: BLE001
        return {"error": f"{type(e).__name__}: {e}"[-600:]}
    return {"ok": True}

cases = json.loads(sys.stdin.read())
print(json.dumps([compile_case(c) for c in cases]))
'''


def test_search_kernel_compiles_for_sm90():
    cases = [
        dict(group=g, asym=asym, weighted=weighted)
        for g in (32, 64, 128)
        for asym in (True, False)
        for weighted in (False, True)
    ]
    results = compile_in_subprocess(SCRIPT, cases)
    for case, result in zip(cases, results):
        assert "error" not in result, (case, result.get("error"))
