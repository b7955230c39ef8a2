"""What Inductor emits for one w4a16 `nn.Linear` on CUDA: the output code, and the kernels and
copies in it (a folded input that a kernel writes, such as the K-major GEMV's split-K counters in
the packed scales, must not be cloned on every call).

    PYTHONPATH=. python benchmarks/experiments/output_code_w4a16.py --out $OUT
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import torch

from lowbit_compile.testing import run_and_get_graphs


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="benchmarks/out")
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--k", type=int, default=4096)
    parser.add_argument("--policy", default="w4a16")
    parser.add_argument("--m", type=int, default=3, help="rows; M > 1 compiles one graph for every M (all buckets)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    layer = torch.nn.Linear(args.k, args.n, bias=False).to("cuda", torch.bfloat16).eval()
    x = torch.randn(args.m, args.k, device="cuda", dtype=torch.bfloat16)
    _, graphs = run_and_get_graphs(layer, x, policy=args.policy, dynamic=True)
    code = graphs["output_code"]
    (out / f"output_code_{args.policy}.py").write_text(code)
    (out / f"fused_{args.policy}.txt").write_text(graphs["fused"] + "\n" + graphs["report"])
    call = code[code.find("def call(") :]
    print("kernels defined:", sorted(set(re.findall(r"def (\w+_kernel|triton_\w+)\(", code))))
    print("launches in call():", len(re.findall(r"\.run\(|\[grid|_kernel_\d*\.run|\)\]\(", call)))
    for word in ("clone", "copy_", "empty_strided_cuda", "aten.", "extern_kernels"):
        print(f"{word!r} in call(): {call.count(word)}")


if __name__ == "__main__":
    main()
