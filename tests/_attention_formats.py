"""Attention formats of 16-token blocks for the interpreter tests (`test_kernels_attention*.py`):
a few tiles then cover every code path of the kernels at tiny sizes."""

from __future__ import annotations

from lowbit_compile import formats

formats.register_format(formats.Format("fp8_e4m3_t16", "fp8_e4m3", "token_block", block_rows=16))
formats.register_format(formats.Format("int8_t16", "int8", "token_block", block_rows=16))
FP8 = formats.register_attention_format(
    formats.AttentionFormat("test_attn_fp8_t16", "fp8_e4m3_t16", "fp8_e4m3_t16", "fp8_e4m3_t16", smooth_k=True)
).name
INT8 = formats.register_attention_format(
    formats.AttentionFormat("test_attn_int8_t16", "int8_t16", "int8_t16", "fp8_e4m3_t16", smooth_k=True)
).name
