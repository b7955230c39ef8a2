"""`search(model, *inputs, budget=...)`: a format per site, fewest weight bytes within an output budget.

    policy = lowbit_compile.search(model, *inputs, budget={"min_cosine": 0.995})
    result = lowbit_compile.policy_search.search_with_result(...)   # the policy and its numbers
    print(policy); policy.to_json()          # an ordinary Policy, one rule per module path
    torch.compile(model, backend="lowbit", options={"policy": policy})

How: every site starts at the candidate with the fewest weight bytes. `explain` measures each
site's sensitivity under each candidate: the model output's SQNR when only that site is
quantized. While the whole model's output misses the budget, the site that hurts most takes its
next larger candidate. Every step compiles the mixed policy and runs it on `inputs` once (the fused
graph, without Inductor). The search is greedy, not optimal. It runs on the inputs you give it,
so give it representative ones.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_leaves

from lowbit_compile.policy import OpKind, Policy, QuantSpec, Rule
from lowbit_compile.report import Report, sqnr

log = logging.getLogger(__name__)

# Fewest bytes first: the search moves a site right along this list when it hurts the output.
DEFAULT_CANDIDATES = (QuantSpec("int4_g128_asym"), QuantSpec("int4_g32_asym"), QuantSpec("int8_row"))


@dataclass
class SearchResult:
    """What `search` found: the policy, the model output's quality under it, and its weight bytes
    next to each single-candidate policy's (for the same sites)."""

    policy: Policy
    cosine: float
    sqnr_db: float
    weight_bytes: int
    bytes_by_candidate: dict[str, int]
    steps: int

    def summary(self) -> str:
        lines = [
            f"search: output cosine {self.cosine:.5f}, SQNR {self.sqnr_db:.1f} dB after {self.steps} steps",
            f"  weight bytes {self.weight_bytes / 2**20:.2f} MiB",
        ]
        lines += [f"  all {name}: {size / 2**20:.2f} MiB" for name, size in self.bytes_by_candidate.items()]
        return "\n".join(lines)


def output_quality(reference: Any, test: Any) -> tuple[float, float]:
    """(mean cosine over rows of the last dim, SQNR in dB) of every floating-point output tensor."""
    ref = [t for t in tree_leaves(reference) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    out = [t for t in tree_leaves(test) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    cosines = [F.cosine_similarity(a.double(), b.double(), dim=-1).flatten() for a, b in zip(ref, out)]
    flat = lambda ts: torch.cat([t.double().flatten() for t in ts])  # noqa: E731
    return torch.cat(cosines).mean().item(), sqnr(flat(ref), flat(out))


def _sensitivity(site: Any) -> float:
    """Output SQNR with only this site quantized; unknown counts as the worst."""
    return float("-inf") if site.output_sqnr_db is None else site.output_sqnr_db


def _run(model: Any, inputs: Sequence[Any], policy: Policy) -> Any:
    torch._dynamo.reset()
    compiled = torch.compile(
        model, backend="lowbit", dynamic=False, options={"policy": policy, "inductor": False, "compute_sqnr": False}
    )
    with torch.no_grad():
        return compiled(*inputs)


def _policy(choice: dict[str, QuantSpec], name: str) -> Policy:
    rules = tuple(Rule(fqn=fqn, op=OpKind.LINEAR, spec=spec) for fqn, spec in sorted(choice.items()))
    return Policy(rules=rules, default=None, name=name)


def search(model: Any, *inputs: Any, budget: dict[str, float], **kwargs: Any) -> Policy:
    """Pick a spec per linear site from `candidates` (fewest weight bytes first) so that the model's
    output on `inputs` keeps `budget`: {"min_cosine": c} (mean cosine of output rows to the
    unquantized model) and/or {"min_sqnr": dB}. Returns an ordinary `Policy` with one module-path
    rule per quantized site (print it, save it with `to_json`, review it). Keyword arguments as
    `search_with_result`, which also returns the numbers."""
    return search_with_result(model, *inputs, budget=budget, **kwargs).policy


def search_with_result(
    model: Any,
    *inputs: Any,
    budget: dict[str, float],
    candidates: Sequence[QuantSpec] = DEFAULT_CANDIDATES,
    name: str = "searched",
    max_steps: int = 200,
) -> SearchResult:
    """`search`, returning the policy with the output quality it reached, its weight bytes and those
    of each candidate alone. Raises ValueError if even the largest candidates miss the budget."""
    unknown = set(budget) - {"min_cosine", "min_sqnr"}
    if unknown or not budget:
        raise ValueError(f"budget takes min_cosine and/or min_sqnr, got {sorted(budget) or 'nothing'}")
    if not candidates:
        raise ValueError("search needs at least one candidate QuantSpec")
    from lowbit_compile.explain import explain

    with torch.no_grad():
        reference = model(*inputs)

    def within(cosine: float, quality: float) -> bool:
        return cosine >= budget.get("min_cosine", -1.0) and quality >= budget.get("min_sqnr", float("-inf"))

    # Per candidate: which sites it can take, their bytes and their sensitivity.
    # Only linear sites are searched: attention and activation x activation matmuls stay as they are.
    others = (Rule(op=OpKind.ATTENTION, spec=None), Rule(op=OpKind.MATMUL, spec=None))
    reports: list[Report] = [
        explain(model, *inputs, policy=Policy(rules=others, default=spec, name=f"candidate {spec.describe()}"))
        for spec in candidates
    ]
    by_fqn = []  # per candidate: module path -> its (first) linear site, None where it cannot run
    for report in reports:
        found: dict[str, Any] = {}
        for site in report.sites:
            if site.op == "linear" and site.fqn not in found:
                found[site.fqn] = site if site.format is not None else None
        by_fqn.append(found)
    paths = dict.fromkeys(fqn for found in by_fqn for fqn in found)
    sites = {fqn: [found.get(fqn) for found in by_fqn] for fqn in paths}
    sites = {fqn: options for fqn, options in sites.items() if any(options)}
    bytes_by_candidate = {
        spec.describe(): sum(s.weight_bytes_after for s in report.sites if s.format is not None)
        for spec, report in zip(candidates, reports)
    }

    level = {fqn: next(i for i, s in enumerate(options) if s is not None) for fqn, options in sites.items()}

    def choice() -> dict[str, QuantSpec]:
        return {fqn: candidates[i] for fqn, i in level.items()}

    steps = 0
    while True:
        cosine, quality = output_quality(reference, _run(model, inputs, _policy(choice(), name)))
        log.info("search step %d: cosine %.5f, SQNR %.1f dB", steps, cosine, quality)
        if within(cosine, quality):
            break
        # The site that hurts the output most at its current candidate moves to its next one.
        movable = [
            (_sensitivity(sites[fqn][i]), fqn)
            for fqn, i in level.items()
            if any(s is not None for s in sites[fqn][i + 1 :])
        ]
        if not movable or steps >= max_steps:
            raise ValueError(
                f"no policy from these candidates keeps the budget {budget}: with the largest "
                f"candidate at the most sensitive sites the output has cosine {cosine:.5f}, SQNR {quality:.1f} dB"
            )
        _, worst = min(movable)
        options = sites[worst]
        level[worst] = next(i for i in range(level[worst] + 1, len(options)) if options[i] is not None)
        steps += 1
    weight_bytes = sum(sites[fqn][i].weight_bytes_after for fqn, i in level.items())
    return SearchResult(_policy(choice(), name), cosine, quality, weight_bytes, bytes_by_candidate, steps)
