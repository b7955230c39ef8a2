"""Host cost of the per-call folded-weight check (`FoldedWeights.for_call`), on CPU (and CUDA if present).

A Llama-3-8B compiled whole folds 225 weights (32 layers x q, k, v, o, gate, up, down, and lm_head);
the compiled graph checks on every call that they are the parameters it quantized, unchanged. The
cost is per parameter, not per byte, so small tensors stand in for the real ones. Reported, in us per
call:

- `fast`: the same parameter set as the previous call (every decode step of one model);
- `alternate`: two parameter sets taking turns (layers compiled one by one share one graph), which
  finds the other set in the cache without quantizing;
- `old`: the algorithm before 2026-11-23 (a Python loop building id tuples, dereferencing weak
  references and reading `_version` and `data_ptr()` per parameter), reimplemented here.

    PYTHONPATH=. python benchmarks/bench_host_overhead.py [--weights 225] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import timeit
import weakref
from typing import Any

import torch

from lowbit_compile.passes.fold import FoldedSource, FoldedWeights


def _old_state(tensor: torch.Tensor) -> tuple[int, int]:
    try:
        version = tensor._version
    except RuntimeError:
        version = -1
    return version, tensor.data_ptr()


class OldFoldedWeights:
    """The per-call check as it was (passes/fold.py before 2026-11-23), without the quantizing branch."""

    def __init__(self, sources: list[FoldedSource], parameters: list[torch.Tensor], tensors: list[torch.Tensor]):
        self.sources = sources
        self.tensors = tensors
        self._sets: dict[tuple[int, ...], Any] = {}
        self._remember(parameters, tensors)

    def _remember(self, parameters: list[torch.Tensor], tensors: list[torch.Tensor]) -> None:
        for key, (references, _, _) in list(self._sets.items()):
            if any(reference() is None for reference in references):
                del self._sets[key]
        references = [weakref.ref(p) for p in parameters]
        self._sets[tuple(id(p) for p in parameters)] = (references, [_old_state(p) for p in parameters], tensors)

    def for_call(self, args: tuple[Any, ...]) -> list[torch.Tensor]:
        parameters = [args[source.input_index] for source in self.sources]
        entry = self._sets.get(tuple(id(p) for p in parameters))
        if entry is not None:
            references, states, tensors = entry
            same = all(r() is p for r, p in zip(references, parameters))
            if same and states == [_old_state(p) for p in parameters]:
                return tensors
        raise AssertionError("the benchmark only calls with known, unchanged sets")


def _model_args(weights: int, device: str) -> tuple[list[FoldedSource], tuple[Any, ...]]:
    """Dynamo-like call arguments: the token ids, then every parameter (norm weights and the
    embedding are not folded), with `weights` folded 2-D weights among them."""
    parameters: list[torch.Tensor] = [torch.nn.Parameter(torch.randn(8, 8, device=device))]  # embedding
    folded_indices = []
    for i in range(weights):
        if i % 7 == 0:  # a norm weight before each layer's projections
            parameters.append(torch.nn.Parameter(torch.ones(8, device=device)))
        folded_indices.append(len(parameters) + 1)  # +1: the token ids come first
        parameters.append(torch.nn.Parameter(torch.randn(8, 8, device=device)))
    args = (torch.zeros(1, 1, dtype=torch.long, device=device), *parameters)
    sources = [FoldedSource(i, False, "int8_row", f"w{i}") for i in folded_indices]
    return sources, args


def _time(fn: Any, number: int) -> float:
    """Best of 7 repeats, in us per call."""
    return min(timeit.repeat(fn, number=number, repeat=7)) / number * 1e6


def measure(weights: int, device: str, number: int) -> dict[str, float]:
    sources, args = _model_args(weights, device)
    _, other_args = _model_args(weights, device)
    parameters = [args[s.input_index] for s in sources]
    other = [other_args[s.input_index] for s in sources]
    tensors = [torch.empty(0, device=device) for _ in range(4 * weights)]

    new = FoldedWeights(sources, parameters, tensors)
    old = OldFoldedWeights(sources, parameters, tensors)
    assert new.for_call(args) is tensors and old.for_call(args) is tensors
    results = {
        "fast": _time(lambda: new.for_call(args), number),
        "old": _time(lambda: old.for_call(args), number),
    }
    # Two sets taking turns: the second one is quantized on its first call (not timed), then found.
    new.for_call(other_args)

    def alternate() -> None:
        new.for_call(args)
        new.for_call(other_args)

    results["alternate"] = _time(alternate, number) / 2
    old._remember(other, tensors)

    def old_alternate() -> None:
        old.for_call(args)
        old.for_call(other_args)

    results["old_alternate"] = _time(old_alternate, number) / 2
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=int, nargs="+", default=[7, 225])
    parser.add_argument("--number", type=int, default=2000)
    parser.add_argument("--json", help="write the results here")
    options = parser.parse_args()
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print(
        f"torch {torch.__version__}, Python {platform.python_version()}, {platform.processor() or platform.machine()}"
    )
    print("us per for_call: fast = same set as the last call; alternate = two sets taking turns")
    print(f"{'device':>6} {'weights':>7} {'fast':>8} {'old':>8} {'speedup':>8} {'alternate':>10} {'old alt':>8}")
    rows = []
    for device in devices:
        for weights in options.weights:
            r = measure(weights, device, options.number)
            rows.append({"device": device, "weights": weights, **r})
            print(
                f"{device:>6} {weights:>7} {r['fast']:8.2f} {r['old']:8.2f} {r['old'] / r['fast']:7.1f}x "
                f"{r['alternate']:10.2f} {r['old_alternate']:8.2f}"
            )
    if options.json:
        with open(options.json, "w") as f:
            json.dump({"torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
