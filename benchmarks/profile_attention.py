"""Where the quantized attention kernel's time goes (issue 7), on a CUDA GPU.

    PYTHONPATH=. python benchmarks/profile_attention.py [--out DIR]

Prefill (causal B4 H32 S4096 D128, non-causal S8192): the whole op against its two launches, the
K/V pre-pass (`quantize_kv_kernel`) alone, with the pre-pass's bandwidth. Decode (B16 H32/8 S8192
D128): the op at several KV split counts and explicit configs, and a plain Triton kernel that only
reads K and V in the decode kernel's pattern (one program per (batch, kv head, split)): the floor
for a kernel that reads bf16 K/V once. CUDA-graph replay; ratios to bf16 flash SDPA of the same run.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import triton
import triton.language as tl

from bench_attention import _operands, _sdpa, _time_ms
from lowbit_compile.formats import get_attention_format
from lowbit_compile.kernels import attention as A
from lowbit_compile.kernels import attention_decode as AD


@triton.jit
def _read_kv_kernel(k_ptr, v_ptr, out_ptr, S, H_KV, split_len, stride_kb, stride_kh, stride_ks,
                    stride_vb, stride_vh, stride_vs, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    pid_bh = tl.program_id(1)
    split = tl.program_id(2)
    b = pid_bh // H_KV
    h = pid_bh % H_KV
    offs_d = tl.arange(0, HEAD_DIM)
    acc = tl.zeros((BLOCK_N, HEAD_DIM), tl.float32)
    n_begin = split * split_len
    n_end = tl.minimum(S, n_begin + split_len)
    for n0 in range(n_begin, n_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        k = tl.load(k_ptr + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_ks + offs_d[None, :])
        v = tl.load(v_ptr + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vs + offs_d[None, :])
        acc += k.to(tl.float32) * v.to(tl.float32)
    tl.store(out_ptr + (pid_bh * tl.num_programs(2) + split) * HEAD_DIM + offs_d, tl.sum(acc, 0))


def prefill(rows: list, fmt: str, causal: bool, s: int, prepass_variants: bool = False) -> None:
    q, k, v = _operands(4, 32, 32, s, s, 128)
    sdpa, _ = _sdpa(q, k, v, causal, False)
    bf16 = _time_ms(sdpa)
    whole = _time_ms(lambda: A.run(q, k, v, None, causal, None, False, fmt, torch.bfloat16))
    attention_format = get_attention_format(fmt)
    constants = dict(HEAD_DIM=128, HEAD_DIM_V=128, SOFT_FP8=False)
    block_n = attention_format.formats[1].block_rows
    pre = _time_ms(lambda: A._quantize_kv(k, v, attention_format, block_n, constants, None))
    moved = k.numel() * 2 * 2 + k.numel() * 2  # read bf16 K and V, write 8-bit codes
    if prepass_variants:
        names = ("QUANTIZE_KV_SPLIT", "QUANTIZE_KV_BLOCKS_PER_PROGRAM", "QUANTIZE_KV_WARPS", "QUANTIZE_KV_MAXNREG")
        old = {name: getattr(A, name) for name in names}
        try:
            for per_program in (2, 4, 8, 16):
                for warps, maxnreg in ((8, None), (8, 128), (16, None)):
                    for name, value in zip(names, (True, per_program, warps, maxnreg)):
                        setattr(A, name, value)
                    ms = _time_ms(lambda: A._quantize_kv(k, v, attention_format, block_n, constants, None))
                    rows.append(dict(case=f"prepass S{s} per_program={per_program} w{warps} maxnreg={maxnreg}",
                                     prepass_ms=ms, prepass_tbps=moved / ms / 1e9))  # fmt: skip
        finally:
            for name, value in old.items():
                setattr(A, name, value)
    if causal:  # the launch order of the Q blocks: head groups, longest rows first
        old_group = A.CAUSAL_HEAD_GROUP
        try:
            for group in (1, 2, 4, 8, 16, 32, 128):
                A.CAUSAL_HEAD_GROUP = group
                ms = _time_ms(lambda: A.run(q, k, v, None, causal, None, False, fmt, torch.bfloat16))
                rows.append(dict(case=f"causal S{s} {fmt} head_group={group}", bf16_ms=bf16, op_ms=ms, op_x=bf16 / ms))
        finally:
            A.CAUSAL_HEAD_GROUP = old_group
    rows.append(dict(case=f"{'causal' if causal else 'full'} S{s} {fmt}", bf16_ms=bf16, op_ms=whole, prepass_ms=pre,
                     kernel_ms=whole - pre, op_x=bf16 / whole, kernel_x=bf16 / (whole - pre),
                     prepass_tbps=moved / pre / 1e9))  # fmt: skip


def decode(rows: list, fmt: str) -> None:
    batch, hq, hkv, s = 16, 32, 8, 8192
    q, k, v = _operands(batch, hq, hkv, 1, s, 128)
    sdpa, _ = _sdpa(q, k, v, False, True)
    bf16 = _time_ms(sdpa)
    kv_bytes = 2 * k.numel() * 2
    old = (A.DECODE_PROGRAMS_PER_SM, A.MAX_SPLITS, A.DECODE_FMA, A.DECODE_FMA_PROGRAMS_PER_SM)
    A.MAX_SPLITS = 64
    A.DECODE_FMA = True  # opt-in kernel: timed here against the default packed MMA tile
    try:
        # the FMA decode kernel (attention_decode.py): tuned, then each config, at 1, 2 and 4
        # programs' worth of KV splits per SM
        for per_sm in (1, 2, 4):
            A.DECODE_FMA_PROGRAMS_PER_SM = per_sm
            splits = A._splits(batch, hkv, s, 128, q.device, per_sm)
            ms = _time_ms(lambda: A.run(q, k, v, None, False, None, True, fmt, torch.bfloat16))
            cfg = getattr(AD.decode_attention_kernel_tuned, "best_config", None)
            rows.append(dict(case=f"decode-fma {fmt} tuned per_sm={per_sm} splits={splits}", bf16_ms=bf16, op_ms=ms,
                             op_x=bf16 / ms, tbps=kv_bytes / ms / 1e9, config=str(cfg)))  # fmt: skip
            for c in AD.DECODE_CONFIGS:
                config = {"num_warps": c.num_warps, "PREFETCH": c.kwargs["PREFETCH"]}
                case = f"decode-fma {fmt} per_sm={per_sm} w{c.num_warps} prefetch={c.kwargs['PREFETCH']}"
                try:
                    ms = _time_ms(lambda: A.run(q, k, v, None, False, None, True, fmt, torch.bfloat16, config=config))
                except Exception as error:  # out of resources and the like
                    rows.append(dict(case=case, error=str(error)[:200]))
                    continue
                rows.append(dict(case=case, bf16_ms=bf16, op_ms=ms, op_x=bf16 / ms, tbps=kv_bytes / ms / 1e9))
        # the packed MMA tile (attention_kernel), as before the FMA kernel
        A.DECODE_FMA = False
        ms = _time_ms(lambda: A.run(q, k, v, None, False, None, True, fmt, torch.bfloat16, bf16_decode=True))
        rows.append(dict(case=f"decode {fmt} as the op dispatches it (DECODE_SDPA: bf16 SDPA)", bf16_ms=bf16, op_ms=ms,
                         op_x=bf16 / ms))  # fmt: skip
        for per_sm in (1,):
            A.DECODE_PROGRAMS_PER_SM = per_sm
            splits = A._splits(batch, hkv, s, 128, q.device)
            ms = _time_ms(lambda: A.run(q, k, v, None, False, None, True, fmt, torch.bfloat16))
            cfg = getattr(A.attention_kernel_decode, "best_config", None)
            rows.append(dict(case=f"decode-mma {fmt} tuned per_sm={per_sm} splits={splits}", bf16_ms=bf16, op_ms=ms,
                             op_x=bf16 / ms, tbps=kv_bytes / ms / 1e9, config=str(cfg)))  # fmt: skip
    finally:
        A.DECODE_PROGRAMS_PER_SM, A.MAX_SPLITS, A.DECODE_FMA, A.DECODE_FMA_PROGRAMS_PER_SM = old
    for splits in (2,):
        for warps in (8,):
            for block_n in (128,):
                out = torch.empty(batch * hkv * splits * 128, device="cuda")
                split_len = triton.cdiv(s, splits)

                def read(splits=splits, warps=warps, block_n=block_n, out=out, split_len=split_len):
                    _read_kv_kernel[(1, batch * hkv, splits)](
                        k, v, out, s, hkv, split_len, *k.stride()[:3], *v.stride()[:3], HEAD_DIM=128, BLOCK_N=block_n,
                        num_warps=warps, num_stages=3,
                    )  # fmt: skip

                ms = _time_ms(read)
                rows.append(dict(case=f"read-only K/V splits={splits} w{warps} n{block_n}", bf16_ms=bf16, op_ms=ms,
                                 op_x=bf16 / ms, tbps=kv_bytes / ms / 1e9))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path(os.environ["OUT"]) if os.environ.get("OUT") else None)
    parser.add_argument("--skip-prefill", action="store_true")
    parser.add_argument("--skip-decode", action="store_true")
    parser.add_argument("--prepass", action="store_true", help="time the K/V pre-pass's variants too")
    args = parser.parse_args()
    torch.manual_seed(0)
    rows: list = []
    print(f"# {torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__}")
    if not args.skip_prefill:
        for fmt in ("attn_fp8_t128", "attn_int8_t128"):
            prefill(rows, fmt, True, 4096, prepass_variants=fmt == "attn_fp8_t128" and args.prepass)
        prefill(rows, "attn_fp8_t128", False, 8192)
    for fmt in () if args.skip_decode else ("attn_fp8_t128", "attn_int8_t128"):
        decode(rows, fmt)
    for row in rows:
        print(" | ".join(f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}" for key, value in row.items()))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "profile_attention.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
