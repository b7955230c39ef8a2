"""Compile the int4 x fp8 GEMM (`int4_scaled_mm.int4_scaled_mm_kernel`, the large-M half of `w4-auto`)
for sm_90 (Hopper) on the CPU, at every tuner candidate of the buckets it runs under `w4-auto` (17-128
and > 128 rows), and read what it compiled to, held in CI without a GPU:

- the dot is Hopper's fp8 MMA (wgmma, `ttng.warp_group_dot`) wherever the tile has >= 64 rows;
- the int4 -> fp8 conversion is the packed fp16 -> e4m3 convert (`cvt.rn.satfinite.e4m3x2.f16x2`),
  not a float32 round trip;
- no spills (no local-memory loads or stores in the SASS, where the Triton wheel can disassemble).

The compiles run in a subprocess without TRITON_INTERPRET (tests/_sm90.py)."""

from __future__ import annotations

import pytest
from _sm90 import compile_in_subprocess

triton = pytest.importorskip("triton")

SCRIPT = r'''
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from lowbit_compile.kernels import int4_scaled_mm as I

fn = I.int4_scaled_mm_kernel
assert isinstance(fn, triton.runtime.jit.JITFunction), type(fn)
POINTERS = {"x_ptr": "*fp8e4nv", "w_ptr": "*u8", "out_ptr": "*bf16"}

def compile_case(case):
    meta = I.Int4ScaledMeta(case["n"], case["k"], 128)
    config = I.Int4ScaledConfig.from_tuple(case["config"])
    sig, attrs = signature_of(fn, POINTERS, int_divisible=lambda name: name != "M")
    cons = I.kernel_arguments(meta, config, has_bias=False)
    src = ASTSource(fn=fn, signature=sig, constexprs=cons, attrs=attrs)
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    try:
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
    except Exception as e:  # noqa: BLE001
        return {"error": f"{type(e).__name__}: {e}"[-600:]}
    try:
        sass = compiled.asm["sass"]  # disassembled on first access (needs the wheel's nvdisasm)
    except Exception:  # noqa: BLE001
        sass = ""
    ttgir, ptx = compiled.asm["ttgir"], compiled.asm["ptx"]
    return {
        "has_sass": bool(sass),
        "local": sum(sass.count(op) for op in ("STL", "LDL")),
        "wgmma": ttgir.count("ttng.warp_group_dot "),
        "cvt_f16x2": ptx.count("cvt.rn.satfinite.e4m3x2.f16x2"),
        "cvt_f32": ptx.count("e4m3x2.f32"),
        "registers": getattr(compiled, "n_regs", None),
        "shared": compiled.metadata.shared,
    }

cases = json.loads(sys.stdin.read())
print(json.dumps([compile_case(c) for c in cases]))
'''


def _compile(cases):
    return compile_in_subprocess(SCRIPT, cases)


SHARED_MEMORY_SM90 = 227 * 1024


def test_candidates_of_the_w4_auto_buckets_compile_for_sm90_without_spills():
    from lowbit_compile.kernels import int4_scaled_mm as int4

    meta = int4.Int4ScaledMeta(4096, 4096, 128)
    configs = list(dict.fromkeys(c for bucket_m in (128, 4096) for c in int4._candidates(bucket_m, meta)))
    results = _compile([dict(n=meta.n, k=meta.k, config=c.as_tuple()) for c in configs])
    for config, result in zip(configs, results):
        assert "error" not in result, (config, result)
        if result["shared"] > SHARED_MEMORY_SM90:
            continue  # the tuner skips a config that does not fit (it fails to launch)
        if config.BLOCK_M >= 64:
            assert result["wgmma"] >= 1, (config, result)
        assert result["cvt_f16x2"] >= 1 and result["cvt_f32"] == 0, (config, result)
        if result["has_sass"]:  # a Triton without nvdisasm gives no SASS
            assert result["local"] == 0, (config, result)
