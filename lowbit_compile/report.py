"""The per-site report: what was found, what it was quantized to (or why not), and at what cost.

`Report` is a printable table and JSON-serialisable. `measure_site_sqnr` runs the captured graph
once on the compile-time example inputs and, at each site, compares the unquantized op with the
same op on fake-quantized operands (SQNR in dB, higher is better).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F

from lowbit_compile.calibration import fake_quantize_activation
from lowbit_compile.ops import kernel_name, quantized_tensor
from lowbit_compile.formats import is_attention_format
from lowbit_compile.reference import attention as attention_reference
from lowbit_compile.reference import dequantize, fake_quantize, row_chunk, rows_of

log = logging.getLogger(__name__)


def sqnr(reference: torch.Tensor, test: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB; inf when identical, nan if either has NaN."""
    reference, test = reference.double(), test.double()
    if torch.isnan(reference).any() or torch.isnan(test).any():
        return float("nan")
    signal = reference.pow(2).sum().item()
    noise = (reference - test).pow(2).sum().item()
    if noise == 0:
        return float("inf")
    if signal == 0:
        return float("-inf")
    return 10 * math.log10(signal / noise)


@dataclass
class SiteReport:
    index: int
    fqn: str
    op: str  # linear / matmul / attention
    source_op: str  # how it appeared in the model: linear, matmul, addmm, einsum, sdpa, ...
    shapes: dict[str, str]
    format: str | None  # e.g. "A=int8_row W=int8_row", None when skipped
    skip_reason: str | None
    kernel: str | None
    decided_by: str
    weight_bytes_before: int = 0
    weight_bytes_after: int = 0
    sqnr_db: float | None = None
    sqnr_note: str | None = None  # why the SQNR is missing, or why the accuracy gate was not checked
    fell_back_from: list[str] = field(default_factory=list)  # specs the accuracy gate rejected, and why
    output_sqnr_db: float | None = None  # sensitivity (explain): graph output SQNR, only this site quantized
    calibration: str | None = None  # what calibration changed at this site (smoothing, static scale), if any


@dataclass
class Report:
    policy: str
    policy_key: str
    graph: str = ""
    sites: list[SiteReport] = field(default_factory=list)

    @property
    def quantized(self) -> list[SiteReport]:
        return [s for s in self.sites if s.format is not None]

    @property
    def skipped(self) -> list[SiteReport]:
        return [s for s in self.sites if s.format is None]

    def counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for site in self.sites:
            counts[site.op] = counts.get(site.op, 0) + 1
        return counts

    def weight_bytes(self) -> tuple[int, int]:
        quantized = self.quantized
        return sum(s.weight_bytes_before for s in quantized), sum(s.weight_bytes_after for s in quantized)

    def __add__(self, other: Report) -> Report:
        merged = Report(self.policy, self.policy_key, self.graph, list(self.sites))
        offset = len(merged.sites)
        for site in other.sites:
            merged.sites.append(SiteReport(**{**asdict(site), "index": site.index + offset}))
        return merged

    def to_dict(self) -> dict[str, Any]:
        return {"policy": self.policy, "policy_key": self.policy_key, "sites": [asdict(s) for s in self.sites]}

    def to_json(self) -> str:
        """JSON text; an SQNR that is not a finite number is written as "inf" (identical), "-inf" or
        "nan", and null means not measured."""

        def encodable(value: Any) -> Any:
            return str(value) if isinstance(value, float) and not math.isfinite(value) else value

        data = self.to_dict()
        for site in data["sites"]:
            site["sqnr_db"] = encodable(site["sqnr_db"])
            site["output_sqnr_db"] = encodable(site["output_sqnr_db"])
        data["sensitivity"] = [site.index for site in self.sensitivity()]
        return json.dumps(data, indent=2)

    def sensitivity(self) -> list[SiteReport]:
        """Quantized sites with a measured sensitivity, worst first: lowest output SQNR when only that
        site is quantized (`explain(..., sensitivity=True)`, the default)."""
        measured = [s for s in self.sites if s.format is not None and s.output_sqnr_db is not None]
        return sorted(measured, key=lambda s: (s.output_sqnr_db, s.index))

    def sensitivity_table(self) -> str:
        """The sensitivity ranking as text: which site hurts the output most, and what it saves."""
        lines = ["sensitivity (output SQNR with only this site quantized; worst first):"]
        for s in self.sensitivity():
            saved = s.weight_bytes_before - s.weight_bytes_after
            lines.append(f"  {s.output_sqnr_db:7.1f} dB  #{s.index} {s.fqn or '<root>'}  {s.format}  saves {saved} bytes")
        return "\n".join(lines)

    def table(self) -> str:
        headers = ("#", "site", "op", "shapes", "format / skip reason", "kernel", "weight bytes", "SQNR dB")
        alone = any(s.output_sqnr_db is not None for s in self.sites)
        if alone:
            headers += ("output SQNR dB, only this site",)
        rows = []
        for s in self.sites:
            shapes = " ".join(f"{k}={v}" for k, v in s.shapes.items() if k != "out")
            decision = s.format if s.format is not None else f"skip: {s.skip_reason}"
            if s.format is not None and s.calibration:
                decision += f" [calibrated: {s.calibration}]"
            if s.format is not None and s.fell_back_from:
                decision += f" (fell back from {'; '.join(s.fell_back_from)})"
            weight = f"{s.weight_bytes_before}->{s.weight_bytes_after}" if s.weight_bytes_before else "-"
            quality = "-" if s.sqnr_db is None else f"{s.sqnr_db:.1f}"
            rows.append(
                (
                    str(s.index),
                    s.fqn or "<root>",
                    f"{s.op}({s.source_op})",
                    shapes,
                    decision,
                    s.kernel or "-",
                    weight,
                    quality,
                )
            )
            if alone:
                rows[-1] += ("-" if s.output_sqnr_db is None else f"{s.output_sqnr_db:.1f}",)
        widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
        graph = f" graph {self.graph}" if self.graph else ""
        lines = [
            f"lowbit report: policy {self.policy} (key {self.policy_key}){graph}",
            "  ".join(h.ljust(w) for h, w in zip(headers, widths)),
        ]
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
        notes: dict[str, list[str]] = {}
        for s in self.sites:
            if s.sqnr_note and s.format is not None:
                notes.setdefault(s.sqnr_note, []).append(str(s.index))
        for note, indices in notes.items():
            lines.append(f"SQNR of sites {','.join(indices)}: {note}")
        before, after = self.weight_bytes()
        lines.append(
            f"{len(self.quantized)}/{len(self.sites)} sites quantized; sites by op {self.counts()}; "
            f"quantized weights {before / 2**20:.2f} MiB -> {after / 2**20:.2f} MiB"
        )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _shape_text(shape: tuple[Any, ...]) -> str:
    return "(" + ",".join(str(d) for d in shape) + ")"


def _kernel_text(site: Any) -> str | None:
    """The fused op and what runs it on the site's device, e.g. `weight_only_mm [triton:w4a16]`."""
    if site.kernel is None:
        return None
    operand = site.inputs.get("x", site.inputs.get("q"))
    value = operand.meta.get("val") if isinstance(operand, torch.fx.Node) else None
    dtype = getattr(value, "dtype", None)
    device = getattr(value, "device", None)
    return kernel_name(
        site.kernel.value, dtype, device, site.spec.weight, site.spec.weight_only_below_m, site.spec.activation
    )


def build_report(sites: list[Any], policy: Any, graph: str = "") -> Report:
    report = Report(policy=policy.name, policy_key=policy.cache_key(), graph=graph)
    for site in sites:
        report.sites.append(
            SiteReport(
                index=site.index,
                fqn=site.fqn,
                op=site.kind.value,
                source_op=site.source_op,
                shapes={name: _shape_text(shape) for name, shape in site.shapes.items()},
                format=site.spec.describe() if site.quantized else None,
                skip_reason=site.skip_reason,
                kernel=_kernel_text(site),
                decided_by=site.decided_by,
                weight_bytes_before=site.weight_bytes_before,
                weight_bytes_after=site.weight_bytes_after,
                sqnr_db=site.sqnr_db,
                sqnr_note=site.sqnr_note,
                fell_back_from=list(site.fell_back_from),
                output_sqnr_db=site.output_sqnr_db,
                calibration=site.calibration.describe() if site.quantized and site.calibration is not None else None,
            )
        )
    return report


def coverage_problem(sites: list[Any]) -> str | None:
    """A warning text when the policy asked for a format that some sites could not take, or when the
    graph has no matmul site at all; None when every candidate site is quantized.

    Candidates are the sites the policy gave a spec: a site that a `Rule(spec=None)` (like the
    recipes' attention / matmul rules) or a `default=None` leaves unquantized is skipped on purpose."""
    if not sites:
        return "no matmul sites found: nothing to quantize in this graph"
    candidates = [site for site in sites if site.spec is not None]
    missed = [site for site in candidates if not site.quantized]
    if not missed:
        return None
    reasons: dict[str, int] = {}
    for site in missed:
        reasons[site.skip_reason] = reasons.get(site.skip_reason, 0) + 1
    top = sorted(reasons.items(), key=lambda item: -item[1])[:3]
    on_purpose = len(sites) - len(candidates)
    return (
        f"{len(sites)} matmul sites found, "
        f"{len(candidates) - len(missed)} of {len(candidates)} candidate sites quantized"
        + (f" ({on_purpose} left unquantized by the policy)" if on_purpose else "")
        + "; top skip reasons: "
        + "; ".join(f"{count}x {reason}" for reason, count in top)
    )


# -- per-site SQNR ---------------------------------------------------------------------------------


def _fake(x: torch.Tensor, fmt: str | None) -> torch.Tensor:
    return x.float() if fmt is None else fake_quantize(x.float(), fmt).float()


def _site_outputs(
    site: Any, env: dict[torch.fx.Node, Any], parameters: dict[str, Any], quantized_weight: Callable[[Any], list]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(unquantized output, fake-quantized output) of one site, in fp32."""
    spec = site.spec

    def value(name: str) -> Any:
        node = site.inputs[name]
        return env[node] if isinstance(node, torch.fx.Node) else node

    if site.kind.value == "attention":
        q, k, v, mask = value("q"), value("k"), value("v"), value("mask")
        attrs = site.attrs
        for name, divide in attrs.get("scale_factors", ()):  # as the qdq stage: computed scales multiply q
            q = q / value(name) if divide else q * value(name)
        kwargs = {"is_causal": attrs["is_causal"], "scale": attrs["scale"], "enable_gqa": attrs["enable_gqa"]}
        if attrs.get("k_transposed"):  # as the qdq stage: q @ kt with kt stored (..., D, S)
            k = k.transpose(-2, -1)
        if attrs.get("mask_fill") is not None:  # scores.masked_fill(mask, fill) as an additive mask
            mask = torch.zeros_like(mask, dtype=torch.float32).masked_fill(mask, attrs["mask_fill"])
        if isinstance(mask, torch.Tensor) and mask.dtype != torch.bool:
            mask = mask.float()
        reference = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, **kwargs)
        fmt = spec.activation
        if is_attention_format(fmt):  # the op quantizes q, k, v (and P) itself: its reference math
            return reference, attention_reference(q, k, v, mask, fmt=fmt, **kwargs)
        test = F.scaled_dot_product_attention(_fake(q, fmt), _fake(k, fmt), _fake(v, fmt), attn_mask=mask, **kwargs)
        return reference, test
    x, bias = value("x"), value("bias")
    weight = parameters[site.inputs["weight"].name].tensor.detach()
    if site.weight_layout == "kn":
        weight = weight.t()
    bias = None if bias is None else bias.float()
    activation_fmt = spec.activation
    if spec.weight_only_below_m is not None and x.numel() // x.shape[-1] < spec.weight_only_below_m:
        activation_fmt = None
    quantized = quantized_tensor(*quantized_weight(site))
    # A calibrated site multiplies x by its smoothing factors (its weight was divided by them).
    x_test = fake_quantize_activation(x, activation_fmt, site.calibration)
    return _linear_outputs(x.float(), x_test, weight, bias, quantized, spec.weight)


# Weights with more elements than this are measured in chunks of output rows: each chunk's weight is
# dequantized in fp32 (an LM head's whole 128256 x 4096 weight took four 2 GB temporaries at once,
# the compile's peak GPU memory).
MEASURE_CHUNK_ELEMENTS = 2**25


def _linear_outputs(x_ref, x_test, weight, bias, quantized, fmt) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_ref @ weight.T + bias, x_test @ dequantize(quantized).T + bias) in fp32, over chunks of
    weight rows when the weight is large and its format's scales are local to rows."""
    n, k = weight.shape
    step = row_chunk(fmt, k, MEASURE_CHUNK_ELEMENTS)
    if step >= n or rows_of(quantized, fmt, 0, 0) is None:
        return F.linear(x_ref, weight.float(), bias), F.linear(x_test, dequantize(quantized, fmt), bias)
    references, tests = [], []
    for start in range(0, n, step):
        stop = min(n, start + step)
        chunk_bias = None if bias is None else bias[start:stop]
        references.append(F.linear(x_ref, weight[start:stop].float(), chunk_bias))
        tests.append(F.linear(x_test, dequantize(rows_of(quantized, fmt, start, stop), fmt), chunk_bias))
    return torch.cat(references, dim=-1), torch.cat(tests, dim=-1)


def _concrete(value: Any) -> Any:
    """Dynamo passes symbolic sizes of a dynamic graph as SymInts; run with their example values."""
    if isinstance(value, torch.SymInt):
        return value.node.hint
    return value


def measure_site_sqnr(
    gm: torch.fx.GraphModule,
    example_inputs: list[Any],
    sites: list[Any],
    parameters: dict[str, Any],
    quantized_weight: Callable[[Any], list],
    spec_problem: Callable[[Any, Any], str | None] | None = None,
) -> None:
    """Run `gm` (the unquantized, annotated graph) once and set `site.sqnr_db` on quantized sites.

    `quantized_weight(site)` gives a linear site's quantized weight parts (the same ones that are
    folded into the graph, so weights are still quantized once per compile).

    The accuracy gate runs in the same pass: a site whose spec has a `min_sqnr` floor and measures
    below it takes the first fallback that `spec_problem(site, spec)` accepts, measured on the same
    operands (no further run of the graph); with none left it is left unquantized. The site records
    what it fell back from and why. Attention sites are gated the same way: their SQNR compares the
    output with unquantized SDPA on the same q, k, v and mask, and with no fallback left the
    model's own attention (SDPA, or its matmul-softmax-matmul) runs in the model's dtype.

    If the graph cannot be run eagerly here, SQNR stays unknown (`site.sqnr_note` says why) and
    compiling goes on."""
    by_node = {site.node: site for site in sites if site.quantized}
    if not by_node:
        return
    inputs = [_concrete(value) for value in example_inputs]

    # The interpreter frees each value after its last use in the graph; an explicit attention site
    # reads q and k, whose last use comes before the site node, so operands are held until their
    # last site has been measured (holding every value would cost a whole forward's activations).
    pending = {}
    for site in by_node.values():
        for operand in site.inputs.values():
            if isinstance(operand, torch.fx.Node):
                pending[operand] = pending.get(operand, 0) + 1
    held: dict[torch.fx.Node, Any] = {}

    class _Recorder(torch.fx.Interpreter):
        def run_node(self, node: torch.fx.Node) -> Any:
            result = super().run_node(node)
            if node in pending:
                held[node] = result
            site = by_node.get(node)
            if site is not None:
                reference, test = _site_outputs(site, held, parameters, quantized_weight)
                site.sqnr_db = sqnr(reference, test)
                _accuracy_gate(site, held, parameters, quantized_weight, spec_problem)
                for operand in site.inputs.values():
                    if isinstance(operand, torch.fx.Node):
                        pending[operand] -= 1
                        if pending[operand] == 0:
                            del held[operand]
            return result

    try:
        with torch.no_grad():
            _Recorder(gm).run(*inputs)
    except Exception as error:  # noqa: BLE001 - a failed measurement must not fail the compile
        log.warning("site SQNR not measured: %s: %s", type(error).__name__, error)
        for site in by_node.values():
            if site.sqnr_db is None:
                site.sqnr_note = f"not measured: running the graph eagerly failed ({type(error).__name__}: {error})"


def measure_sensitivity(
    gm: torch.fx.GraphModule,
    make_inputs: Callable[[], list[Any]],
    sites: list[Any],
    parameters: dict[str, Any],
    quantized_weight: Callable[[Any], list],
) -> None:
    """Per quantized site, the SQNR of the graph's output when only that site is quantized (its
    output replaced by the fake-quantized one), in `site.output_sqnr_db`. One run of the graph for
    the reference and one per site, each on fresh inputs from `make_inputs` (copies where the graph
    writes its inputs); for `explain`, not for every compile."""
    from torch.utils._pytree import tree_leaves

    quantized = [site for site in sites if site.quantized]
    if not quantized:
        return

    def run(only: Any = None) -> torch.Tensor:
        operands = {o for o in only.inputs.values() if isinstance(o, torch.fx.Node)} if only is not None else set()
        held: dict[torch.fx.Node, Any] = {}

        class _Run(torch.fx.Interpreter):
            def run_node(self, node: torch.fx.Node) -> Any:
                result = super().run_node(node)
                if node in operands:
                    held[node] = result
                if only is not None and node is only.node:
                    _, test = _site_outputs(only, held, parameters, quantized_weight)
                    result = test.to(result.dtype).reshape(result.shape)
                return result

        with torch.no_grad():
            outputs = _Run(gm).run(*[_concrete(v) for v in make_inputs()])
        leaves = [t for t in tree_leaves(outputs) if isinstance(t, torch.Tensor) and t.is_floating_point()]
        return torch.cat([t.detach().double().flatten() for t in leaves]) if leaves else torch.zeros(0)

    try:
        reference = run()
        for site in quantized:
            site.output_sqnr_db = sqnr(reference, run(site))
    except Exception as error:  # noqa: BLE001 - a diagnostic must not fail the compile
        log.warning("sensitivity not measured: %s: %s", type(error).__name__, error)


def _accuracy_gate(site, env, parameters, quantized_weight, spec_problem) -> None:
    """Walk `site.spec`'s fallback chain while the measured SQNR is below the spec's floor."""
    while site.spec.min_sqnr is not None and site.sqnr_db is not None and site.sqnr_db < site.spec.min_sqnr:
        site.fell_back_from.append(f"{site.spec.describe()}: {site.sqnr_db:.1f} dB < {site.spec.min_sqnr:g} dB")
        candidate = site.spec.fallback
        while candidate is not None and spec_problem is not None:
            problem = spec_problem(site, candidate)
            if problem is None:
                break
            site.fell_back_from.append(f"{candidate.describe()}: cannot run here ({problem})")
            candidate = candidate.fallback
        if candidate is None:
            site.skip_reason = "accuracy gate: " + "; ".join(site.fell_back_from) + "; no fallback left"
            if site.kind.value == "attention":  # the site is left as the model wrote it
                site.skip_reason += ": the model's own attention runs unquantized"
            site.sqnr_db = None
            log.info("site %s (%s) left unquantized by the accuracy gate", site.fqn, site.kind.value)
            return
        site.spec = candidate
        reference, test = _site_outputs(site, env, parameters, quantized_weight)
        site.sqnr_db = sqnr(reference, test)
        log.info("site %s (%s) fell back to %s", site.fqn, site.kind.value, candidate.describe())
