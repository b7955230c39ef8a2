"""Compiling Triton kernels for sm_90 (Hopper) on a CPU host, for the *_compile_sm90 tests.

Triton's compiler needs no GPU (`triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))`
runs every stage to the cubin with the wheel's ptxas). The kernels must be JITFunctions, which they
are not under TRITON_INTERPRET=1 (CI's setting), so each test's compile script runs in a subprocess
without it: it reads a JSON list of cases on stdin and prints a JSON list of results last."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


# Put before every compile script: the signature most of our kernels are compiled with.
PRELUDE = r"""
def signature_of(fn, pointers, int_divisible=lambda name: False):
    # (signature, attrs) for triton.compile: constexpr parameters as such, pointers typed by
    # `pointers` (default *fp32) and 16-byte aligned, ints i32, 16-divisible where int_divisible(name)
    constexprs = {p.name for p in fn.params if p.is_constexpr}
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = pointers.get(name, "*fp32")
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[name] = "i32"
            if int_divisible(name):
                attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, attrs
"""


def compile_in_subprocess(script: str, cases: list) -> list:
    """Run `script` on `cases`; its results. Skips where this Triton cannot compile for NVIDIA GPUs
    at all (decided here, before the compile: a failing subprocess is always a test failure)."""
    try:
        from triton.backends import backends
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError as e:  # pragma: no cover - Triton builds before the compile-only API
        pytest.skip(f"this Triton has no compile-only API: {e}")
    if "nvidia" not in backends:  # pragma: no cover - e.g. a ROCm-only Triton build
        pytest.skip(f"this Triton has no NVIDIA backend (backends: {sorted(backends)})")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, "-c", PRELUDE + script], input=json.dumps(cases), capture_output=True, text=True, env=env,
        cwd=ROOT, timeout=600,
    )  # fmt: skip
    if proc.returncode != 0:
        raise AssertionError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])
