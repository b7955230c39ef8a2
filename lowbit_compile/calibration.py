"""`calibrate(model, batches, policy=...)`: activation-aware quantization from a few batches of real inputs.

    calibration = lowbit_compile.calibrate(model, batches, policy="w4a16")
    print(calibration)                                   # per weight: method, SQNR before -> after
    compiled = torch.compile(model, backend="lowbit", options={"calibration": calibration})

The model runs once per batch under Dynamo, through the pipeline's own capture and annotate stages,
so calibration sees exactly the linear sites the policy quantizes, by the same module paths. For each
quantized linear site's weight (keyed by the parameter's path) it records the activation operand:
per input channel mean |x|, max |x| and mean x^2 over every row, and a uniform sample of up to
`max_rows` rows. From those it derives, per weight:

* smoothing (AWQ / SmoothQuant): a per-input-channel factor `smooth` (K,). The compiled graph
  multiplies the activation by it (`x * smooth`, a pointwise op that Inductor fuses into the
  activation's producer) and the weight is divided by it before quantization, at fold time
  (`(x * smooth) @ (W / smooth)^T == x @ W^T`). Candidates are s = mean|x|^a (AWQ) and
  s = max|x|^a / max|W|^(1-a) (SmoothQuant) for a in `ALPHAS`, smooth = 1/s; the one with the
  smallest site output error on the sample rows wins, a = 0 (no smoothing) included.
* importance (K,): the mean square of the smoothed activation per input channel; the int4 weight
  search (`weight_search.search_quantize`) minimises the error weighted by it instead of the plain
  reconstruction error.
* the activation's range max |x * smooth|, for static activation scales: with
  `static_activations=True`, sites whose spec quantizes activations to an 8-bit format with fp32
  scales (int8_row, fp8_e4m3_row, fp8_e4m3_1x128) use that element's per-tensor format
  (int8_tensor, fp8_e4m3_tensor) with the scale fixed at compile time (range / largest code) instead
  of one computed per call: no reduction over the activation at run time; values beyond the
  calibrated range saturate.

Candidates are scored with round-to-nearest weights (as AWQ does); the winner is checked with the
weight quantization the compiled site really uses: a weight keeps smoothing and importance only if
its site's output SQNR on the sample rows is better with them than without. With static scales the
scores are cross-validated (each half of the sample rows is scored with factors and a scale fitted
to the other half): a scale fitted to the rows it is scored on never saturates them, and favours
factors that only fit the calibration set. `WeightCalibration` records the site's SQNR on the
calibration rows as the spec quantizes it without calibration, and with it.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from lowbit_compile import reference
from lowbit_compile.formats import FORMATS, Granularity, ScaleType, get_format
from lowbit_compile.policy import Kernel, OpKind, Policy, QuantSpec, as_policy
from lowbit_compile.weight_search import search_quantize, searchable

__all__ = [
    "ALPHAS",
    "Calibration",
    "CalibrationError",
    "SiteCalibration",
    "WeightCalibration",
    "calibrate",
    "static_format_for",
]

log = logging.getLogger(__name__)

ALPHAS: tuple[float, ...] = tuple(round(0.1 * i, 1) for i in range(11))  # migration strengths tried
DEFAULT_MAX_ROWS = 2048  # activation rows kept per weight for the smoothing search
# A channel's statistic is floored at this fraction of the channel average: a channel that was
# (nearly) silent in calibration must not get an unbounded smoothing factor that later inputs pay for.
STAT_FLOOR = 1e-2
IMPORTANCE_FLOOR = 1e-2  # no input channel weighs less than 1% of the average in the weight search


class CalibrationError(ValueError):
    """Calibration data that does not fit the model or graph it is applied to."""


def static_format_for(fmt: str | None) -> str | None:
    """The per-tensor format for a static activation scale of `fmt`: same 8-bit element, one fp32
    scale; None when `fmt` is not an 8-bit symmetric format with fp32 scales (MX, NVFP4, 4-bit)."""
    if fmt is None:
        return None
    source = get_format(fmt)
    if source.bits != 8 or not source.symmetric or source.scale_type is not ScaleType.FP32 or source.global_scale:
        return None
    for candidate in FORMATS.values():
        if (
            candidate.element is source.element
            and candidate.granularity is Granularity.TENSOR
            and candidate.symmetric
            and candidate.scale_type is ScaleType.FP32
            and not candidate.global_scale
        ):
            return candidate.name
    return None


@dataclass(frozen=True, eq=False)
class WeightCalibration:
    """What calibration found for one weight (by parameter path), as (K,) float32 vectors.

    smooth:      the activation is multiplied by it and the weight divided by it; None = no smoothing.
    importance:  per-input-channel weights of the int4 weight search's error; None = unweighted.
    activation_amax: max |x * smooth| over every calibration row (static activation scales).
    method:      how smooth was chosen, e.g. "awq a=0.4", "smoothquant a=0.6", "none".
    sqnr_before_db / sqnr_after_db: the site's output SQNR on the sample rows, quantized as the
                 spec says without calibration, and with it.
    rows:        how many activation rows calibration saw for this weight.
    """

    path: str
    k: int
    smooth: Tensor | None
    importance: Tensor | None
    activation_amax: float
    method: str
    sqnr_before_db: float
    sqnr_after_db: float
    rows: int

    def describe(self) -> str:
        parts = [f"smoothed ({self.method})" if self.smooth is not None else None]
        parts.append("activation-weighted weight search" if self.importance is not None else None)
        return ", ".join(p for p in parts if p) or "no change"


@dataclass(eq=False)
class SiteCalibration:
    """A weight's calibration as one compiled site applies it (made by `Calibration.for_site`).

    smooth:       (K,) in the activation's dtype, on the weight's device: the graph's `x * smooth`
                  and the folded weight `W / smooth` use this very tensor, so they agree exactly.
    importance:   (K,) float32 for the int4 weight search, or None.
    static_format / static_scale: the per-tensor activation format and its fixed fp32 scale
                  (shape (1,) * rank of x), when the calibration has static activation scales and
                  the spec's activation format has a static counterpart; else None.
    key:          identifies what changes the folded weight (caches of quantized weights).
    """

    entry: WeightCalibration
    calibration: Calibration
    spec: QuantSpec
    smooth: Tensor | None
    importance: Tensor | None
    static_format: str | None
    static_scale: Tensor | None
    key: str
    activation_dtype: torch.dtype
    rank: int
    device: torch.device

    def describe(self) -> str:
        text = self.entry.describe()
        if self.static_scale is not None:
            text += f", static activation scale {float(self.static_scale.flatten()[0]):.4g}"
        return text

    def for_parameter(self, parameter: Tensor) -> SiteCalibration:
        """The calibration of the same site for another parameter (a graph that layers compiled one by
        one share is called with the next layer's weights): that weight's own entry, or an error."""
        path = self.calibration.path_of(parameter)
        if path == self.entry.path:
            return self
        if path is None or path not in self.calibration.weights:
            raise CalibrationError(
                f"a graph compiled with calibration (for {self.entry.path}) is called with a parameter that "
                "lowbit_compile.calibrate did not see; calibrate the model that owns it, or compile without "
                "the calibration option"
            )
        site = self.calibration.for_site(
            parameter, path, self.spec, self.entry.k, self.activation_dtype, self.rank, self.device
        )
        if site is None or site.static_format != self.static_format:
            raise CalibrationError(
                f"{path} has no calibration matching the compiled graph's (made for {self.entry.path})"
            )
        return site

    def activation(self, x: Tensor) -> Tensor:
        """`x * smooth`, as the graph computes it."""
        return x if self.smooth is None else torch.mul(x, self.smooth)

    def weight(self, weight_nk: Tensor) -> Tensor:
        """`W / smooth` (W as (N, K)), as the graph and the fold compute it."""
        return weight_nk if self.smooth is None else torch.div(weight_nk, self.smooth)


def fake_quantize_activation(x: Tensor, fmt: str | None, site: SiteCalibration | None) -> Tensor:
    """The activation operand the site's op sees, fake-quantized, in float32: `x * smooth`, then the
    static scale when `fmt` is the site's static format, else dynamic quantization (None: unquantized)."""
    if site is not None:
        x = site.activation(x)
    if fmt is None:
        return x.float()
    if site is not None and site.static_scale is not None and fmt == site.static_format:
        quantized = reference.quantize_with_scale(x, site.static_scale, fmt)
        return reference.dequantize(quantized, fmt, torch.float32)
    return reference.fake_quantize(x.float(), fmt).float()


class Calibration:
    """What `calibrate` returns: the policy it was made for and one `WeightCalibration` per
    quantized linear weight. Pass it as `options={"calibration": calibration}` (the policy defaults
    to `calibration.policy`; another policy is refused) or `explain(..., calibration=calibration)`."""

    def __init__(
        self,
        policy: Policy,
        weights: Mapping[str, WeightCalibration],
        static_activations: bool,
        batches: int,
        parameters: Iterable[tuple[Tensor, str]] = (),
    ) -> None:
        self.policy = policy
        self.weights = dict(weights)
        self.static_activations = static_activations
        self.batches = batches
        # The parameters calibrated, by identity (weakly): how a graph shared by layers compiled
        # one by one finds the next layer's calibration.
        self._paths: WeakIdKeyDictionary = WeakIdKeyDictionary()
        for tensor, path in parameters:
            self._paths[tensor] = path

    def path_of(self, parameter: Tensor) -> str | None:
        return self._paths.get(parameter)

    def remember(self, parameter: Tensor, path: str) -> None:
        """Identify `parameter` as the weight calibrated under `path` (its calibration was applied)."""
        if path in self.weights and parameter not in self._paths:
            self._paths[parameter] = path

    @functools.cached_property
    def digest(self) -> str:
        """A digest of every number in the calibration and of the policy."""
        h = hashlib.sha256(f"{self.policy.cache_key()}:{self.static_activations}".encode())
        for path in sorted(self.weights):
            entry = self.weights[path]
            h.update(f"{path}:{entry.k}:{entry.activation_amax!r}:{entry.method}".encode())
            for vector in (entry.smooth, entry.importance):
                h.update(b"-" if vector is None else vector.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    def for_site(
        self,
        parameter: Tensor,
        path: str | None,
        spec: QuantSpec,
        k: int | None,
        activation_dtype: torch.dtype,
        rank: int,
        device: torch.device,
    ) -> SiteCalibration | None:
        """The calibration of a compiled linear site whose weight is `parameter` (module path `path`
        in this compile) and spec `spec`, or None if there is none. The weight is found by identity
        first (the path in the model `calibrate` ran, whatever module is compiled now), then by
        path. A static activation scale is given when the calibration has them and the spec
        quantizes activations per call (`scaled_mm`) to a format with a static counterpart."""
        path = self.path_of(parameter) or path
        entry = self.weights.get(path) if path is not None else None
        if entry is None:
            return None
        if k != entry.k:
            raise CalibrationError(
                f"calibration of {path} is for K={entry.k} input channels, the compiled site has K={k}: "
                "calibrate this model again"
            )
        smooth = None if entry.smooth is None else entry.smooth.to(device=device, dtype=activation_dtype)
        importance = None if entry.importance is None else entry.importance.to(device)
        static_format = None
        if self.static_activations and spec.kernel(OpKind.LINEAR) is Kernel.SCALED_MM:
            static_format = static_format_for(spec.activation)
        static_scale = None
        if static_format is not None:
            scale = entry.activation_amax / float(get_format(static_format).qmax)
            static_scale = torch.full((1,) * rank, scale, dtype=torch.float32, device=device)
        key = f"{self.digest}:{path}:{activation_dtype}"
        return SiteCalibration(
            entry, self, spec, smooth, importance, static_format, static_scale, key, activation_dtype, rank, device
        )

    def summary(self) -> str:
        lines = [
            f"calibration for policy {self.policy.name!r} from {self.batches} batches"
            f"{', static activation scales' if self.static_activations else ''} (digest {self.digest})"
        ]
        for path, entry in self.weights.items():
            lines.append(
                f"  {path}: {entry.describe()}; site SQNR on {entry.rows} calibration rows "
                f"{entry.sqnr_before_db:.1f} -> {entry.sqnr_after_db:.1f} dB"
            )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()

    def __repr__(self) -> str:
        return f"<Calibration policy={self.policy.name!r} weights={len(self.weights)} digest={self.digest}>"


# -- collecting activations ----------------------------------------------------------------------


@dataclass
class _WeightStats:
    """Running statistics of one weight's activation operand, over every calibration row."""

    path: str
    parameter: Tensor
    transposed: bool
    spec: QuantSpec
    k: int
    max_rows: int
    generator: torch.Generator
    rows: int = 0
    abs_sum: Tensor | None = None
    square_sum: Tensor | None = None
    max_abs: Tensor | None = None
    sample: Tensor | None = None  # up to max_rows rows, a uniform sample (reservoir)
    sites: list[str] = field(default_factory=list)

    def add(self, x: Tensor) -> None:
        rows = x.detach().reshape(-1, self.k).float()
        if not bool(torch.isfinite(rows).all()):
            raise CalibrationError(f"a calibration batch gives non-finite activations at {self.path}'s input")
        if self.abs_sum is None:
            self.abs_sum = rows.new_zeros(self.k)
            self.square_sum = rows.new_zeros(self.k)
            self.max_abs = rows.new_zeros(self.k)
            self.sample = rows.new_zeros((0, self.k))
        self.abs_sum += rows.abs().sum(0)
        self.square_sum += rows.square().sum(0)
        self.max_abs = torch.maximum(self.max_abs, rows.abs().amax(0)) if rows.numel() else self.max_abs
        free = self.max_rows - self.sample.shape[0]
        if free > 0:
            self.sample = torch.cat((self.sample, rows[:free]))
        rest = rows[max(free, 0) :]
        if rest.shape[0]:  # reservoir sampling: row t (0-based, overall) replaces a kept row, p = max_rows / (t + 1)
            seen = self.rows + max(free, 0)
            index = torch.arange(seen, seen + rest.shape[0], dtype=torch.float64) + 1
            slot = (torch.rand(rest.shape[0], generator=self.generator, dtype=torch.float64) * index).long()
            keep = slot < self.max_rows
            self.sample[slot[keep].to(rows.device)] = rest[keep.to(rows.device)]
        self.rows += rows.shape[0]


class _Collector:
    """A Dynamo backend that captures and annotates each graph as the lowbit backend would, and
    returns a callable that runs the graph while recording each quantized linear site's activation."""

    def __init__(self, policy: Policy, max_rows: int, seed: int) -> None:
        self.policy = policy
        self.max_rows = max_rows
        self.generator = torch.Generator().manual_seed(seed)
        self.stats: dict[str, _WeightStats] = {}
        self.calls = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
        from lowbit_compile.passes.annotate import annotate_sites
        from lowbit_compile.passes.capture import capture_graph
        from lowbit_compile.passes.state import PipelineState

        state = PipelineState(gm=gm, example_inputs=list(example_inputs), policy=self.policy)
        capture_graph(state)
        annotate_sites(state)
        watched: dict[torch.fx.Node, list[_WeightStats]] = {}
        for site in state.sites:
            if site.kind is not OpKind.LINEAR or not site.quantized:
                continue
            parameter = state.parameters[site.inputs["weight"].name]
            stats = self.stats.get(parameter.path)
            if stats is None:
                stats = self.stats[parameter.path] = _WeightStats(
                    parameter.path,
                    parameter.tensor,
                    site.weight_layout == "kn",
                    site.spec,
                    site.k,
                    self.max_rows,
                    self.generator,
                )
            elif stats.k != site.k:
                raise CalibrationError(f"{parameter.path} is used with K={stats.k} and K={site.k}: cannot calibrate it")
            stats.sites.append(site.fqn)
            watched.setdefault(site.inputs["x"], []).append(stats)
        graph_module = state.gm
        collector = self

        class _Recorder(torch.fx.Interpreter):
            def run_node(self, node: torch.fx.Node) -> Any:
                result = super().run_node(node)
                for stats in watched.get(node, ()):
                    stats.add(result)
                return result

        def run(*args: Any) -> Any:
            collector.calls += 1
            with torch.no_grad():
                return _Recorder(graph_module).run(*args)

        return run


def _as_call(batch: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """A batch as call arguments: a tuple/list of positional args, a dict of keyword args, or one input."""
    if isinstance(batch, Mapping):
        return (), dict(batch)
    if isinstance(batch, (tuple, list)):
        return tuple(batch), {}
    return (batch,), {}


# -- choosing the smoothing per weight -------------------------------------------------------------


@dataclass
class _Fit:
    """Per-input-channel statistics that smoothing factors, importance and static scales are fitted
    to, and the activation rows the fit is scored on."""

    mean_abs: Tensor
    max_abs: Tensor
    mean_square: Tensor
    rows: Tensor  # (R, K)
    output: Tensor  # rows @ W^T unquantized (R, N): what every candidate is scored against

    @classmethod
    def of_rows(cls, fit: Tensor, rows: Tensor, weight_nk: Tensor) -> _Fit:
        return cls(fit.abs().mean(0), fit.abs().amax(0), fit.square().mean(0), rows, rows @ weight_nk.T)


def _fits(stats: _WeightStats, static: bool, weight_nk: Tensor) -> list[_Fit]:
    """What each candidate is scored on. Smoothing alone: the statistics of every calibration row,
    scored on the sample rows. With static activation scales, cross-validated: each half of the
    sample rows is scored with factors and a scale fitted to the other half. A static scale fitted
    to the very rows it is scored on never saturates them, and favours factors that only fit the
    calibration set (SmoothQuant's a = 1 makes every channel's calibration maximum the same, so
    any later excursion saturates)."""
    sample = stats.sample
    half = sample.shape[0] // 2
    if static and half:
        first, second = sample[:half], sample[half:]
        return [_Fit.of_rows(second, first, weight_nk), _Fit.of_rows(first, second, weight_nk)]
    mean_abs, mean_square = stats.abs_sum / stats.rows, stats.square_sum / stats.rows
    return [_Fit(mean_abs, stats.max_abs, mean_square, sample, sample @ weight_nk.T)]


def _floored(values: Tensor) -> Tensor:
    return values.clamp(min=STAT_FLOOR * float(values.mean()) + 1e-30)


def _smooth(fit: _Fit, weight_nk: Tensor, method: str, alpha: float) -> Tensor | None:
    """The activation's factors (1 / s) for AWQ's s = mean|x|^a or SmoothQuant's
    s = max|x|^a / max|W|^(1-a), s centred in log scale as AWQ does; None for no smoothing."""
    if method == "none" or alpha <= 0:
        return None
    if method == "awq":
        s = _floored(fit.mean_abs).pow(alpha)
    else:
        s = _floored(fit.max_abs).pow(alpha) / _floored(weight_nk.abs().amax(0)).pow(1 - alpha)
    s = s / (s.amax() * s.amin()).sqrt()
    if not (bool(torch.isfinite(s).all()) and bool((s > 0).all())):
        return None
    return 1.0 / s


def _importance(mean_square: Tensor, smooth: Tensor | None) -> Tensor:
    """Each input channel's weight in the int4 search: the smoothed activation's mean square,
    relative to the average, floored."""
    if smooth is not None:
        mean_square = mean_square * smooth.square()
    mean = float(mean_square.mean())
    if not mean > 0:
        return torch.ones_like(mean_square)
    return (mean_square / mean).clamp(min=IMPORTANCE_FLOOR)


def _fake_weight(weight_nk: Tensor, spec: QuantSpec, importance: Tensor | None, final: bool) -> Tensor:
    """The dequantized weight as the site will use it: the spec's search (final) or round-to-nearest."""
    if final and spec.weight_search and searchable(spec.weight):
        quantized = search_quantize(weight_nk, spec.weight, importance=importance)
    else:
        quantized = reference.quantize(weight_nk, spec.weight)
    return reference.dequantize(quantized, spec.weight, torch.float32)


def _score(
    fits: list[_Fit],
    weight_nk: Tensor,
    spec: QuantSpec,
    method: str,
    alpha: float,
    static_format: str | None,
    weighted: bool = False,
    final: bool = False,
) -> float:
    """The site's output SQNR (dB) over the fits' rows with this smoothing: the activation quantized
    as the spec says (per call, or with the static scale), the weight round-to-nearest (`final`: as
    compiled, with the search, weighted by importance if `weighted`)."""
    noise = signal = 0.0
    for fit in fits:
        smooth = _smooth(fit, weight_nk, method, alpha)
        x = fit.rows if smooth is None else fit.rows * smooth
        if spec.activation is None:  # auto_mm specs are scored in their activation-quantized regime
            xq = x
        elif static_format is not None:
            amax = (fit.max_abs if smooth is None else fit.max_abs * smooth).amax()
            scale = (amax / float(get_format(static_format).qmax)).reshape(1, 1)
            xq = reference.dequantize(reference.quantize_with_scale(x, scale, static_format), static_format)
        else:
            xq = reference.fake_quantize(x, spec.activation)
        importance = _importance(fit.mean_square, smooth) if weighted else None
        w = weight_nk if smooth is None else weight_nk / smooth
        noise += float((xq @ _fake_weight(w, spec, importance, final).T - fit.output).square().sum())
        signal += float(fit.output.square().sum())
    if not (math.isfinite(noise) and math.isfinite(signal)):
        return -math.inf
    if noise == 0:
        return math.inf
    return 10 * math.log10(signal / noise) if signal > 0 else -math.inf


def _calibrate_weight(
    stats: _WeightStats, smoothing: bool, static_activations: bool, alphas: Iterable[float]
) -> WeightCalibration:
    spec = stats.spec
    weight_nk = stats.parameter.detach()
    weight_nk = (weight_nk.t() if stats.transposed else weight_nk).float().to(stats.sample.device)
    kernel = spec.kernel(OpKind.LINEAR)
    static_format = static_format_for(spec.activation) if static_activations and kernel is Kernel.SCALED_MM else None
    fits = _fits(stats, static_format is not None, weight_nk)
    # The grid, with round-to-nearest weights (as AWQ searches): no smoothing, then both families.
    candidates = [("none", 0.0)]
    if smoothing:
        candidates += [(method, float(a)) for a in alphas if a > 0 for method in ("awq", "smoothquant")]
    scores = [_score(fits, weight_nk, spec, method, alpha, static_format) for method, alpha in candidates]
    method, alpha = candidates[max(range(len(candidates)), key=lambda i: (scores[i], -i))]
    # The final choice, with the weight quantization the compiled site really uses: smoothing and the
    # activation-weighted search are kept only where they beat their absence on these rows.
    weighted = spec.weight_search and searchable(spec.weight)
    options = [("none", 0.0, False)]
    if weighted:
        options.append(("none", 0.0, True))
    if method != "none":
        options.append((method, alpha, weighted))
    final = [_score(fits, weight_nk, spec, m, a, static_format, w, final=True) for m, a, w in options]
    best = max(range(len(options)), key=lambda i: (final[i], -i))
    method, alpha, weighted = options[best]
    # Reported: the site as the spec says without calibration (per-call activation scales) -> with it.
    full = _fits(stats, False, weight_nk)
    before = _score(full, weight_nk, spec, "none", 0.0, None, False, final=True)
    if static_format is not None:
        after = final[best]
    else:
        after = _score(full, weight_nk, spec, method, alpha, None, weighted, final=True)
    fit = full[0]
    smooth = _smooth(fit, weight_nk, method, alpha)
    importance = _importance(fit.mean_square, smooth) if weighted else None
    amax = float((fit.max_abs if smooth is None else fit.max_abs * smooth).amax())
    label = "none" if smooth is None else f"{method} a={alpha:g}"
    log.info("calibrated %s: %s, site SQNR %.1f -> %.1f dB", stats.path, label, before, after)
    return WeightCalibration(
        path=stats.path,
        k=stats.k,
        smooth=None if smooth is None else smooth.detach().float().cpu(),
        importance=None if importance is None else importance.detach().float().cpu(),
        activation_amax=amax,
        method=label,
        sqnr_before_db=before,
        sqnr_after_db=after,
        rows=stats.rows,
    )


def calibrate(
    model: Any,
    batches: Iterable[Any],
    policy: Policy | str | None = None,
    *,
    smoothing: bool = True,
    static_activations: bool = False,
    max_rows: int = DEFAULT_MAX_ROWS,
    alphas: Iterable[float] = ALPHAS,
    seed: int = 0,
) -> Calibration:
    """Calibrate `policy` (a `Policy` or recipe name; default the default policy) for `model` on
    `batches`, an iterable of inputs: each a tuple of positional arguments, a dict of keyword
    arguments, or a single tensor. Runs the model once per batch (no grad) and returns a
    `Calibration` for `torch.compile(model, backend="lowbit", options={"calibration": ...})`.

    smoothing: search per-input-channel smoothing factors (AWQ / SmoothQuant); False keeps only
               the activation-weighted weight search (and static scales).
    static_activations: sites whose activations are quantized to an 8-bit format with fp32 scales
               use a per-tensor scale fixed from the calibration range instead of one per call.
    max_rows:  activation rows kept per weight for the smoothing search (statistics use every row).
    alphas:    migration strengths tried (0 = no smoothing is always tried).

    Only linear sites are calibrated (attention and activation x activation matmuls are not). Like
    `explain`, this resets Dynamo's caches before and after (functions compiled earlier recompile)."""
    policy = as_policy(policy)
    if not isinstance(max_rows, int) or isinstance(max_rows, bool) or max_rows < 1:
        raise ValueError(f"max_rows must be a positive int, got {max_rows!r}")
    alphas = tuple(alphas)
    if any(not (isinstance(a, (int, float)) and 0 <= a <= 1) for a in alphas):
        raise ValueError(f"alphas must be numbers in [0, 1], got {alphas}")
    if isinstance(batches, (Tensor, Mapping)):
        raise ValueError(
            "batches must be an iterable of batches (e.g. a list of input tuples), not one batch: wrap it in a list"
        )
    collector = _Collector(policy, max_rows, seed)
    count = 0
    torch._dynamo.reset()
    try:
        compiled = torch.compile(model, backend=collector)
        with torch.no_grad():
            for count, batch in enumerate(batches, start=1):
                before = collector.calls
                args, kwargs = _as_call(batch)
                compiled(*args, **kwargs)
                if collector.calls == before:
                    raise CalibrationError(
                        f"batch {count - 1} ran without the calibration capture (Dynamo ran it eagerly, e.g. after "
                        "its recompile limit): use fewer distinct input shapes"
                    )
    finally:
        torch._dynamo.reset()
    if count == 0:
        raise ValueError("calibrate needs at least one batch of inputs")
    if not collector.stats:
        raise CalibrationError(f"policy {policy.name!r} quantizes no linear site of this model: nothing to calibrate")
    weights = {
        path: _calibrate_weight(stats, smoothing, static_activations, alphas)
        for path, stats in collector.stats.items()
    }
    parameters = [(stats.parameter, path) for path, stats in collector.stats.items()]
    return Calibration(policy, weights, static_activations, count, parameters)


def replace_activation(spec: QuantSpec, activation: str) -> QuantSpec:
    """`spec` with another activation format (the static one), floors and fallbacks kept."""
    return dataclasses.replace(spec, activation=activation)
