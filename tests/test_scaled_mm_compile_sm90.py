"""Compile the fp8 block-scale GEMM kernel (`scaled_mm.scaled_mm_block_kernel`) for sm_90 (Hopper) on
the CPU, at every large-M tuner candidate it runs, and read the compiled loop: the facts its speed
rests on (issue 6, benchmarks/NOTES-scaled-mm.md v2), held in CI without a GPU.

- no spills (no local-memory loads or stores in the SASS);
- the MMAs are not serialized by ptxas (it waits after every wgmma when it sees registers of an
  in-flight product read: "wgmma serialized", C7514): as many `WARPGROUP.DEPBAR` as Triton's waits;
- paired K steps: one MMA wait in the loop for two products (the second stays in flight across the
  loop edge), one after it;
- overlapped pairs (PAIRED=2, NOTES v3): the second MMA is issued before the first product's
  promotion, some of whose FMAs the SASS places after that MMA (Triton 3.6: 52 of 64 at 128x128; without the pin
  LLVM moves the held product's promotion below it too and ptxas serializes every wgmma, C7514).

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
from lowbit_compile.kernels import scaled_mm as S

fn = S.scaled_mm_block_kernel
assert isinstance(fn, triton.runtime.jit.JITFunction), type(fn)

def compile_case(case):
    meta = S.ScaledMeta(case["n"], case["k"], False, True, False, False)
    config = S.ScaledMMConfig.from_tuple(case["config"])
    pointers = {"x_ptr": "*fp8e4nv", "w_ptr": "*fp8e4nv", "out_ptr": "*bf16"}
    sig, attrs = signature_of(fn, pointers, int_divisible=lambda name: name != "M")
    cons = S.kernel_arguments(meta, config, has_bias=False)
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
    ttgir = compiled.asm["ttgir"]
    # FMAs issued after the loop's last MMA (while it runs): from the loop's first MMA wait to the
    # branch that closes the loop
    lines = sass.splitlines()
    first_wait = next((i for i, l in enumerate(lines) if "WARPGROUP.DEPBAR" in l), len(lines))
    loop_end = next((i for i in range(first_wait, len(lines)) if "BRA" in lines[i]), len(lines))
    body = lines[first_wait:loop_end]
    last_mma = max((i for i, l in enumerate(body) if "GMMA" in l), default=len(body))
    return {
        "ffma_after_last_mma": sum("FFMA" in l for l in body[last_mma:]),
        "paired": config.PAIRED,
        "has_sass": bool(sass),
        "local": sum(sass.count(op) for op in ("STL", "LDL")),
        "depbar": sass.count("WARPGROUP.DEPBAR"),
        "waits": ttgir.count("ttng.warp_group_dot_wait"),
        "dots": ttgir.count("ttng.warp_group_dot "),
    }

cases = json.loads(sys.stdin.read())
print(json.dumps([compile_case(c) for c in cases]))
'''


def _compile(cases):
    return compile_in_subprocess(SCRIPT, cases)


def test_block_kernel_large_m_candidates_compile_for_sm90_without_spills_or_serialized_mma():
    from lowbit_compile.kernels import scaled_mm as scaled

    meta = scaled.ScaledMeta(4096, 4096, False, True, False, False)
    configs = [c for c in scaled._candidates(2048, meta) if scaled.uses_block_kernel(meta, c)]
    assert any(c.PAIRED for c in configs) and any(not c.PAIRED for c in configs)
    results = _compile([dict(n=meta.n, k=meta.k, config=c.as_tuple()) for c in configs])
    for config, result in zip(configs, results):
        assert "error" not in result, (config, result)
        assert result["dots"] == 2 if config.PAIRED else 1, (config, result)
        # one wait in the loop (paired: for both products; the second is waited a loop turn later)
        # and one after it
        assert result["waits"] == (2 if config.PAIRED else 1), (config, result)
        if result["has_sass"]:  # a Triton without nvdisasm gives no SASS
            assert result["local"] == 0, (config, result)
            assert result["depbar"] == result["waits"], (config, result)  # ptxas added no waits of its own
            if config.PAIRED == 2:  # the first product's promotion runs during the second product's MMA
                assert result["ffma_after_last_mma"] >= 16, (config, result)
