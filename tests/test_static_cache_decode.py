"""`StaticCacheLlama`: a decode step (SDPA with `enable_gqa` and an additive mask over the cache)
gives the logits of running the whole sequence as a prompt (folded GQA, boolean mask), and
`benchmarks/profile_decode.py` files the kernels a decode step runs under the right category."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from lowbit_compile.models import LlamaConfig, StaticCacheLlama

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.mark.parametrize("batch", [1, 3])
def test_decode_steps_match_the_whole_sequence_as_a_prompt(batch):
    config = LlamaConfig(num_layers=2, num_heads=8, num_kv_heads=2)
    torch.manual_seed(batch)
    model = StaticCacheLlama(config).eval()
    tokens = torch.randint(0, config.vocab_size, (batch, 10))
    with torch.no_grad():
        model.allocate_cache(batch, 32)
        model(tokens[:, :7], torch.arange(7))
        steps = [model(tokens[:, p : p + 1], torch.tensor([p])) for p in range(7, 10)]
        for p, logits in zip(range(7, 10), steps):
            model.allocate_cache(batch, 32)
            whole = model(tokens[:, : p + 1], torch.arange(p + 1))
            torch.testing.assert_close(logits, whole, rtol=1e-4, atol=1e-5)


def test_profile_decode_categories():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import profile_decode
    finally:
        sys.path.remove(str(BENCHMARKS))
    names = {  # kernels seen in decode steps on an H100 (RESULTS.md, fourteenth session)
        "weight_only_kernel": "linear",
        "splitk_sum_kernel": "linear",
        "nvjet_sm90_tst_64x8_64x16_2x1_v_bz_splitK_TNT": "linear",
        "void cublasLt::splitKreduce_kernel<32, 16, int, float, __nv_bfloat16>": "linear",
        "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7_64x128x128": "attention",
        "pytorch_flash::flash_fwd_kernel": "attention",
        "attention_kernel": "attention",
        "triton_poi_fused__unsafe_view_mul_silu_6": "other",
        "triton_red_fused__to_copy_add_mean_mul_pow_rsqrt_view_12": "other",
    }
    assert {name: profile_decode.category(name) for name in names} == names
    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU
    events = [SimpleNamespace(name="k", device_type=cuda, device_time=4.0)] * 4
    events += [SimpleNamespace(name="host", device_type=cpu, device_time=9.0)]
    assert profile_decode.kernel_times(SimpleNamespace(events=lambda: events), steps=2) == {
        "k": {"us": 8.0, "calls": 2.0}
    }
