"""Compile the attention kernel for sm_90 (Hopper) on the CPU, with whatever Triton is installed:
front-end and compiler errors that only a GPU launch showed before are caught in CI.

Triton's compiler needs no GPU (`triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))`
runs every stage to the cubin with the wheel's ptxas). The kernel must be a JITFunction, which it
is not under TRITON_INTERPRET=1 (CI's setting), so the compiles run in a subprocess without it.
Cases are the ones that failed on the H100 (issue 7, Triton 3.6 image) plus their neighbours:
- the signature Inductor's wrapper gives a `triton_op` kernel: the float scale as fp64, ints equal
  to 1 (GROUP, unit strides) as constexprs, 16-divisible ints marked so;
- the default scale computed from a symbolic head dim (SCALE_FROM_D), with L = S = 1 constexprs;
- a direct launch at every prefill tile of the 128- and 64-token formats that the launcher can pick;
- a packed decode tile with split KV;
- and a tile smaller than its Q block fails with the kernel's own message."""

from __future__ import annotations

import pytest
from _sm90 import compile_in_subprocess

triton = pytest.importorskip("triton")

SCRIPT = r'''
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from lowbit_compile.kernels import attention as A

fn = A.attention_kernel
assert isinstance(fn, triton.runtime.jit.JITFunction), type(fn)
constexprs = {p.name for p in fn.params if p.is_constexpr}
INT_ARGS = [n for n in fn.arg_names if not n.endswith("_ptr") and n != "qk_scale" and n not in constexprs]

def compile_case(case):
    ones, inductor = set(case.get("ones", ())), case.get("inductor", False)
    sig, cons, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in ones:
            sig[name] = "constexpr"; cons[name] = 1
        elif name.endswith("_ptr"):
            sig[name] = "*fp32" if name in ("partial_ptr", "stats_ptr") and case["SPLITS"] > 1 else "*bf16"
            if case["prequant"] and name in ("ks_ptr", "vs_ptr"):
                sig[name] = "*fp32"
            elif case["prequant"] and name in ("kc_ptr", "vc_ptr"):
                sig[name] = "*i8" if name == "kc_ptr" and case["fmt"].startswith("int8") else "*fp8e4nv"
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name == "qk_scale":
            sig[name] = "fp64" if inductor else "fp32"
        else:
            sig[name] = "i32"
            if name not in ("GROUP", "H_Q", "H_KV", "Q_BUCKET", "KV_BUCKET"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    q_int8 = case["fmt"].startswith("int8")
    cons.update(HEAD_DIM=case["D"], HEAD_DIM_V=case["D"], IS_CAUSAL=case["causal"], MASK_KIND=case["mask"],
                QK_INT8=q_int8, QK_QMAX=127.0 if q_int8 else 448.0, V_QMAX=448.0, SMOOTH_K=True,
                Q_SCALE_ROWS=case["q_rows"], PACK_ROWS=case["pack"], SPLITS=case["SPLITS"], SOFT_FP8=False,
                SCALE_FROM_D=case["scale_from_d"], BLOCK_M=case["BLOCK_M"], BLOCK_N=case["BLOCK_N"],
                PREQUANT=case["prequant"], FOLD_V=case["fold_v"], KV_SCALE_ROWS=case.get("kv_rows", case["BLOCK_N"]),
                HEAD_GROUP=case.get("head_group", 1))
    src = ASTSource(fn=fn, signature=sig, constexprs=cons, attrs=attrs)
    options = {"num_warps": case["num_warps"], "num_stages": case["num_stages"]}
    if case.get("maxnreg"):
        options["maxnreg"] = case["maxnreg"]
    try:
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
    except Exception as e:  # noqa: BLE001
        return {"error": f"{type(e).__name__}: {e}"[-600:]}
    return {"ok": True, "wgmma": compiled.asm["ttgir"].count("warp_group_dot ")}

cases = json.loads(sys.stdin.read())
print(json.dumps([compile_case(c) for c in cases]))
'''


def _case(fmt="fp8", q_rows=128, block_m=128, warps=8, stages=2, **kw):
    case = dict(fmt=fmt, q_rows=q_rows, BLOCK_M=block_m, BLOCK_N=kw.pop("block_n", q_rows), num_warps=warps,
                num_stages=stages, D=128, causal=True, mask=0, pack=0, SPLITS=1, scale_from_d=False, fold_v=True)
    case.update(kw)
    case.setdefault("prequant", case["pack"] == 0)  # as the launcher: prefill reads pre-quantized K/V
    return case


def _compile(cases):
    return compile_in_subprocess(SCRIPT, cases)


def test_failed_h100_configurations_compile_for_sm90():
    from lowbit_compile.kernels import attention as kernel

    inductor_ones = ("GROUP", "stride_qd", "stride_kd", "stride_vd")
    cases = [
        # test_sdpa_output_code_holds_the_kernel: Inductor's signature (fp64 scale), both formats
        _case("fp8", warps=4, inductor=True, ones=inductor_ones, scale_from_d=True),
        _case("int8", warps=4, inductor=True, ones=inductor_ones, scale_from_d=True, head_group=8),
        # an explicit scale passed as fp64 (Inductor), not computed from D
        _case("int8", warps=8, inductor=True, ones=inductor_ones),
        # test_dynamic_sequence_lengths_one_graph, plus lengths of 1 specialised to constexprs
        _case("int8", inductor=True, ones=(*inductor_ones, "L", "S", "split_len"), scale_from_d=True),
        # test_masks_and_rows_masked_entirely: both mask kinds with the 64-token int8 format
        _case("int8", q_rows=64, block_m=64, mask=1, causal=True),
        _case("int8", q_rows=64, block_m=128, mask=2, causal=False, warps=4),
        # packed decode (L = 1, GQA 4 -> 16 rows), split KV, float mask
        _case("fp8", q_rows=1, block_m=16, block_n=128, pack=1, SPLITS=4, causal=False, mask=1, warps=4),
        # prefill that quantizes K/V in the loop (PREQUANTIZE_PREFILL off), and PV not folded into acc
        _case("int8", prequant=False),
        _case("fp8", fold_v=False, mask=1),
        # 64-key tiles inside 128-key scale blocks (an explicit config), register-capped
        _case("int8", block_m=64, block_n=64, kv_rows=128, warps=4, maxnreg=168),
    ]
    # every prefill tile the launcher can pick for the 128-token formats (one format each: time)
    for config in kernel.prefill_configs(128, 128):
        cases.append(_case("fp8", block_m=config.kwargs["BLOCK_M"], block_n=config.kwargs["BLOCK_N"], kv_rows=128,
                           warps=config.num_warps, stages=config.num_stages, causal=False,
                           fold_v=config.kwargs["FOLD_V"], maxnreg=config.maxnreg))  # fmt: skip
    # every decode config the autotuner can pick (packed L = 1 tile, GQA 4, split KV)
    for config in kernel.DECODE_CONFIGS:
        cases.append(_case("int8", q_rows=1, block_m=16, block_n=128, pack=1, SPLITS=2, causal=False,
                           warps=config.num_warps, stages=config.num_stages, maxnreg=config.maxnreg))  # fmt: skip
    results = _compile(cases)
    failures = [(c, r["error"]) for c, r in zip(cases, results) if "error" in r]
    assert not failures, failures
    # prefill tiles: QK^T and PV of both tile loops are Hopper wgmma (warp_group_dot), 8-bit operands
    assert all(r["wgmma"] == 4 for c, r in zip(cases, results) if c["pack"] == 0), results


def test_tile_smaller_than_q_block_only_where_its_scale_is_read_whole():
    """A prefill tile may be a fraction of a Q block (it reads the block's other rows for the scale);
    only the small-tile configs (with a register cap) are such fractions; a packed decode tile must
    hold whole blocks."""
    from lowbit_compile.kernels import attention as kernel

    for q_rows in (16, 32, 64, 128):
        for kv_rows in (16, 64, 128):
            configs = kernel.prefill_configs(q_rows, kv_rows)
            assert configs, q_rows
            for c in configs:
                block_m, block_n = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
                assert block_m % q_rows == 0 or (c.maxnreg is not None and q_rows % block_m == 0), (q_rows, c)
                assert kv_rows % block_n == 0, (kv_rows, c)
    (prefill, decode) = _compile([
        _case("fp8", q_rows=128, block_m=64, block_n=128, warps=4, maxnreg=168),
        _case("fp8", q_rows=32, block_m=16, block_n=128, pack=1, SPLITS=1, causal=False, warps=4),
    ])  # fmt: skip
    assert prefill.get("ok"), prefill
    assert "BLOCK_M % Q_SCALE_ROWS == 0" in decode.get("error", ""), decode


DECODE_SCRIPT = r'''
import json, re, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from lowbit_compile.kernels import attention_decode as AD

fn = AD.decode_attention_kernel
assert isinstance(fn, triton.runtime.jit.JITFunction), type(fn)
constexprs = {p.name for p in fn.params if p.is_constexpr}

def compile_case(case):
    sig, cons, attrs = {}, {}, {}
    ones = set(case.get("ones", ()))
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in ones:
            sig[name] = "constexpr"; cons[name] = 1
        elif name.endswith("_ptr"):
            sig[name] = "*fp32" if name in ("partial_ptr", "stats_ptr") and case["SPLITS"] > 1 else "*bf16"
            if name == "mask_ptr" and case["mask"] == 2:
                sig[name] = "*i1"
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name == "qk_scale":
            sig[name] = "fp64" if case.get("inductor") else "fp32"
        else:
            sig[name] = "i32"
            if name not in ("S", "GROUP", "H_KV", "KV_BUCKET"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    q_int8 = case["fmt"] == "int8"
    cons.update(HEAD_DIM=case["D"], HEAD_DIM_V=case["D"], GROUP_PAD=case["G"], IS_CAUSAL=False, MASK_KIND=case["mask"],
                QK_INT8=q_int8, QK_QMAX=127.0 if q_int8 else 448.0, V_QMAX=448.0, SMOOTH_K=q_int8,
                SPLITS=case["SPLITS"], SOFT_FP8=False, SCALE_FROM_D=case.get("scale_from_d", False), BLOCK_N=128,
                PREFETCH=case["PREFETCH"])
    options = {"num_warps": case["num_warps"], "num_stages": 1}
    try:
        compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=cons, attrs=attrs),
                                  target=GPUTarget("cuda", 90, 32), options=options)
    except Exception as e:  # noqa: BLE001
        return {"error": f"{type(e).__name__}: {e}"[-600:]}
    ttgir = compiled.asm["ttgir"]
    tile = f"tensor<128x{case['D']}x"
    whole_tile_converts = [line for line in ttgir.splitlines() if "convert_layout" in line and tile in line]
    return {"ok": True, "whole_tile_converts": len(whole_tile_converts), "dots": ttgir.count("tt.dot")}

cases = json.loads(sys.stdin.read())
print(json.dumps([compile_case(c) for c in cases]))
'''


def test_fma_decode_kernel_compiles_for_sm90_without_relayouting_a_tile():
    """The FMA decode kernel (`attention_decode.py`) at every autotuner config, both formats, GQA
    groups 1-16, both mask kinds, Inductor's signature: it compiles, runs no `tt.dot`, and never
    moves a whole K or V tile between layouts (what `_widen`'s joins are for: a broadcast let Triton
    spread the group over threads and re-layout each tile through shared memory)."""
    from lowbit_compile.kernels import attention_decode as AD

    def case(**kw):
        c = dict(fmt="fp8", G=4, D=128, mask=0, SPLITS=2, num_warps=8, PREFETCH=True)
        c.update(kw)
        return c

    cases = [case(fmt=fmt, num_warps=c.num_warps, PREFETCH=c.kwargs["PREFETCH"]) for c in AD.DECODE_CONFIGS
             for fmt in ("fp8", "int8")]  # fmt: skip
    cases += [
        case(G=8), case(G=16, D=64), case(G=2, mask=1, SPLITS=1), case(fmt="int8", mask=2),
        case(inductor=True, ones=("GROUP", "stride_qd", "stride_kd", "stride_vd"), scale_from_d=True),
    ]
    results = compile_in_subprocess(DECODE_SCRIPT, cases)
    failures = [(c, r["error"]) for c, r in zip(cases, results) if "error" in r]
    assert not failures, failures
    assert all(r["dots"] == 0 and r["whole_tile_converts"] == 0 for r in results), results
    (g1,) = compile_in_subprocess(DECODE_SCRIPT, [case(G=1)])  # no join at G = 1: compiles, any layout
    assert g1.get("ok"), g1
