"""Search a per-layer policy for all-MiniLM-L6-v2: the fewest weight bytes that keep the sentence
embeddings at mean cosine >= 0.995 to fp32 on the example corpus (issue 8 item 5).

    python examples/policy_search.py [--min-cosine 0.995] [--save policy.json]

Prints the policy found (one rule per module path, reviewable and saved as JSON if asked), its
weight bytes against all-w8a16 and all-w4a16, and the embedding quality of each, measured by
compiling each policy with backend="lowbit".
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lowbit_compile  # noqa: E402
from lowbit_compile.policy_search import output_quality, search_with_result  # noqa: E402
from semantic_search import CORPUS, MAX_LENGTH, QUERIES, load_encoder  # noqa: E402


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--min-cosine", type=float, default=0.995)
    parser.add_argument("--save", default=None, help="write the policy found as JSON here")
    args = parser.parse_args(argv)
    tokenizer, encoder = load_encoder("cpu")
    texts = [text for _, text in CORPUS] + [text for _, text in QUERIES]
    batch = tokenizer(texts, padding=True, truncation=True, max_length=MAX_LENGTH, return_tensors="pt")
    inputs = (batch["input_ids"], batch["attention_mask"])
    with torch.no_grad():
        reference = encoder(*inputs)

    result = search_with_result(encoder, *inputs, budget={"min_cosine": args.min_cosine}, name="minilm-searched")
    print(result.policy)
    print(result.summary())
    if args.save:
        Path(args.save).write_text(result.policy.to_json())
        print(f"policy saved to {args.save}")

    rows: dict[str, Any] = {}
    for label, policy in (("searched", result.policy), ("w8a16", "w8a16"), ("w4a16", "w4a16")):
        torch._dynamo.reset()
        report = lowbit_compile.explain(encoder, *inputs, policy=policy, sensitivity=False)
        compiled = torch.compile(encoder, backend="lowbit", options={"policy": policy, "compute_sqnr": False})
        with torch.no_grad():
            cosine, quality = output_quality(reference, compiled(*inputs))
        before, after = report.weight_bytes()
        rows[label] = {"cosine": cosine, "sqnr_db": quality, "bytes": after, "quantized": len(report.quantized)}
    torch._dynamo.reset()
    print(f"\nall-MiniLM-L6-v2, {len(texts)} sentences, budget mean cosine >= {args.min_cosine}")
    print("| policy | mean cosine to fp32 | output SQNR dB | quantized weight MiB | sites quantized |")
    print("|---|---|---|---|---|")
    for label, row in rows.items():
        print(
            f"| {label} | {row['cosine']:.5f} | {row['sqnr_db']:.1f} | {row['bytes'] / 2**20:.2f} | {row['quantized']} |"
        )
    return rows


if __name__ == "__main__":
    main()
