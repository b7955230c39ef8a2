"""The site SQNR measurement works on chunks of weight rows for large weights (compile-time GPU
memory): `reference.rows_of` slices a quantized tensor by rows, and `report._linear_outputs` gives
the same outputs chunked as whole, while never dequantizing more than a chunk at once."""

import pytest
import torch

from lowbit_compile import report
from lowbit_compile.formats import FORMATS
from lowbit_compile.reference import dequantize, quantize, rows_of

ROW_LOCAL = [name for name, f in FORMATS.items() if f.granularity.value != "tensor"]


@pytest.mark.parametrize("fmt", ROW_LOCAL)
def test_rows_of_dequantizes_to_the_same_rows(fmt):
    torch.manual_seed(0)
    x = torch.randn(300, 256) * torch.rand(300, 1) * 4
    q = quantize(x, fmt)
    whole = dequantize(q, fmt)
    step = FORMATS[fmt].block_rows or 37
    for start in range(0, 300, step * 2):
        stop = min(300, start + step * 2 - (0 if FORMATS[fmt].block_rows else 5))
        part = rows_of(q, fmt, start, stop)
        torch.testing.assert_close(dequantize(part, fmt), whole[start:stop], rtol=0, atol=0)


@pytest.mark.parametrize("fmt", ["int8_tensor", "fp8_e4m3_tensor"])
def test_rows_of_says_none_for_one_scale_over_all_rows(fmt):
    assert rows_of(quantize(torch.randn(8, 32), fmt), fmt, 0, 4) is None


def test_rows_of_refuses_a_start_inside_a_row_block():
    q = quantize(torch.randn(256, 128), "fp8_e4m3_128x128")
    with pytest.raises(ValueError, match="multiple of the 128-row blocks"):
        rows_of(q, "fp8_e4m3_128x128", 64, 192)


@pytest.mark.parametrize("fmt", ["int4_g128_asym", "int8_row", "fp8_e4m3_128x128", "nvfp4", "int8_tensor"])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_outputs_chunked_equal_whole_and_bound_the_dequantized_rows(monkeypatch, fmt, bias):
    torch.manual_seed(1)
    n, k = 333, 256
    weight = torch.randn(n, k, dtype=torch.bfloat16)
    b = torch.randn(n) if bias else None
    x = torch.randn(5, k, dtype=torch.bfloat16)
    x_test = x.float() * 1.01
    q = quantize(weight, fmt)
    whole = report._linear_outputs(x.float(), x_test, weight, b, q, fmt)

    seen = []
    real = report.dequantize

    def recording(part, f, *args):
        seen.append(part.data.shape[0])
        return real(part, f, *args)

    monkeypatch.setattr(report, "MEASURE_CHUNK_ELEMENTS", 64 * k)
    monkeypatch.setattr(report, "dequantize", recording)
    chunked = report._linear_outputs(x.float(), x_test, weight, b, q, fmt)
    for got, want in zip(chunked, whole):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    if fmt == "int8_tensor":  # one scale for every row: measured whole
        assert seen == [n]
    else:
        limit = 128 if fmt == "fp8_e4m3_128x128" else 64
        assert sum(seen) == n and max(seen) <= limit and len(seen) > 1
