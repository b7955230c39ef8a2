"""Launch one weight-only config a few times, for `ncu` (hardware counters) to profile.

    ncu --clock-control none --kernel-name regex:weight_only --launch-skip 2 --launch-count 1 \
        python benchmarks/profile_weight_only.py --shape 4096x4096 --m 1 --config 1,8,256,4,3,1
"""

from __future__ import annotations

import argparse

import torch

from lowbit_compile import reference
from lowbit_compile.formats import get_format
from lowbit_compile.kernels import weight_only


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--format", default="int4_g128_asym")
    parser.add_argument("--shape", default="4096x4096")
    parser.add_argument("--m", type=int, default=1)
    parser.add_argument("--config", required=True, help="BLOCK_M,BLOCK_N,BLOCK_K,warps,stages,split_k")
    args = parser.parse_args(argv)
    n, k = (int(v) for v in args.shape.split("x"))
    config = weight_only.WeightOnlyConfig.from_tuple([int(v) for v in args.config.split(",")])
    q = reference.quantize(torch.randn(n, k, device="cuda"), args.format)
    zero = q.zero_point if q.zero_point is not None else torch.empty(0, device="cuda")
    meta = weight_only.WeightMeta.of(get_format(args.format), q.data)
    x = torch.randn(args.m, k, device="cuda", dtype=torch.bfloat16)
    out = torch.empty(args.m, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(4):
        weight_only.launch(x, q.data, q.scale, zero, None, out, meta, config)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
