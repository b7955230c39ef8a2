"""What travels between the stages of the pipeline: the graph, its inputs, and the matmul sites."""

from __future__ import annotations

import inspect
import logging
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
from torch.utils.weak import WeakIdKeyDictionary

from lowbit_compile.formats import Granularity, get_format
from lowbit_compile.policy import Kernel, OpKind, Policy, QuantSpec
from lowbit_compile.reference import row_chunk
from lowbit_compile.weight_search import search_quantize, searchable

log = logging.getLogger(__name__)  # lowbit_compile.passes.*: under TORCH_LOGS="+lowbit_compile"

_INPLACE_OPERATORS = {
    operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv, operator.imod,
    operator.ipow, operator.iand, operator.ior, operator.ixor, operator.ilshift, operator.irshift,
    operator.imatmul, operator.setitem,
}  # fmt: skip


_SIGNATURES: dict[Any, inspect.Signature | None] = {}  # target -> signature (None: it has none)


def _signature(target: Any) -> inspect.Signature | None:
    """inspect.signature(target), memoised per target (dead-code elimination asks for every node)."""
    try:
        return _SIGNATURES[target]
    except KeyError:
        pass
    except TypeError:  # an unhashable target
        return _signature_of(target)
    if len(_SIGNATURES) >= 4096:  # targets are kept alive here: bound what a long process holds
        _SIGNATURES.clear()
    _SIGNATURES[target] = found = _signature_of(target)
    return found


def _signature_of(target: Any) -> inspect.Signature | None:
    try:
        return inspect.signature(target)
    except (TypeError, ValueError):  # builtins without a signature
        return None


def _inplace_positionally(node: torch.fx.Node) -> bool:
    """`F.relu(x, True)`: a Python function whose `inplace` parameter is given by position."""
    signature = _signature(node.target)
    if signature is None or "inplace" not in signature.parameters:
        return False
    try:
        bound = signature.bind(*node.args, **node.kwargs)
    except TypeError:
        return False
    return bound.arguments.get("inplace") is True


def mutates(node: torch.fx.Node) -> bool:
    """Whether a node writes to one of its inputs (x.add_(1), x += 1, cache[i] = v, F.relu(x, inplace=True)).

    Dynamo's graph is torch-level, so FX's own purity check (aten schemas) does not see these."""
    if node.kwargs.get("inplace") is True or isinstance(node.kwargs.get("out"), (torch.fx.Node, tuple, list)):
        return True
    if node.op == "call_function" and _inplace_positionally(node):
        return True
    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.endswith("__")
    if node.op != "call_function":
        return False
    if node.target in _INPLACE_OPERATORS:
        return True
    if isinstance(node.target, torch._ops.OpOverload):
        return node.target._schema.is_mutable
    name = getattr(node.target, "__name__", "")
    return name.endswith("_") and not name.startswith("_")


def remove_dead_code(graph: torch.fx.Graph) -> None:
    """FX dead-code elimination that keeps in-place updates (a KV-cache write, a counter buffer)."""
    graph.eliminate_dead_code(is_impure_node=lambda node: node.is_impure() or mutates(node))


# Searched weights, per parameter (weakly keyed, dropped with it): (transposed, fmt, calibration
# key) -> (storage pointer, version, parts). The scale search costs far more than round-to-nearest, so a recompile
# (a new shape, `explain` then `torch.compile`, layers sharing code) reuses it while the parameter's
# values are unchanged. Only searched results are kept (round-to-nearest is cheap to redo).
_SEARCHED: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _weight_source(parameter: torch.Tensor, transposed: bool, calibration: Any) -> torch.Tensor:
    """The weight as (N, K) as it is quantized: divided by the calibration's smoothing factors."""
    source = parameter.detach()
    source = source.t() if transposed else source
    if calibration is not None:
        source = calibration.weight(source)
    return source.contiguous()


def _searched_weight(
    parameter: torch.Tensor, transposed: bool, fmt: str, calibration: Any = None
) -> list[torch.Tensor]:
    key = (transposed, fmt, None if calibration is None else calibration.key)
    try:
        stamp = (parameter.data_ptr(), parameter._version)
    except RuntimeError:  # an inference tensor has no version counter: nothing to key a cache on
        stamp = None
    entries = _SEARCHED.get(parameter) if stamp is not None else None
    hit = None if entries is None else entries.get(key)
    if hit is not None and hit[0] == stamp:
        return hit[1]
    importance = None if calibration is None else calibration.importance
    with torch.no_grad():
        source = _weight_source(parameter, transposed, calibration)

        def searched(rows: torch.Tensor) -> list[torch.Tensor]:
            q = search_quantize(rows, fmt, importance=importance)
            absent = torch.empty(0, dtype=torch.float32, device=rows.device)  # as lowbit.quantize gives it
            return [q.data, q.scale, absent if q.zero_point is None else q.zero_point, absent.clone()]

        parts = _by_row_chunks(searched, source, fmt)
    parts = [t.contiguous() for t in parts]
    if stamp is not None:
        if entries is None:
            entries = _SEARCHED[parameter] = {}
        entries[key] = (stamp, parts)
    return parts


def quantize_weight(
    parameter: torch.Tensor, transposed: bool, fmt: str, search: bool = True, calibration: Any = None
) -> list[torch.Tensor]:
    """(data, scale, zero_point, global_scale) of a weight as (N, K); `transposed` for one stored (K, N).

    `search` (QuantSpec.weight_search, on by default): int4 weights get each group's scale and zero
    point searched for the smallest reconstruction error (`lowbit_compile.weight_search`), in the
    same layout; other formats, and `search=False`, round to nearest (`lowbit.quantize`).
    `calibration` (a `calibration.SiteCalibration`): the weight is divided by its smoothing factors
    first, and the search weights each input channel's error by its importance."""
    if search and searchable(fmt):
        return _searched_weight(parameter, transposed, fmt, calibration)
    with torch.no_grad():
        source = _weight_source(parameter, transposed, calibration)
        parts = _by_row_chunks(lambda rows: list(torch.ops.lowbit.quantize(rows, fmt)), source, fmt)
        return [t.contiguous() for t in parts]


# Weights larger than this many elements are quantized in chunks of rows: quantizing works in fp32
# with several full-size temporaries (the int4 search more), which for an LM head (128256 x 4096)
# came to ~10 GB of GPU memory at compile time, more than the quantized model.
QUANTIZE_CHUNK_ELEMENTS = 2**25


def _by_row_chunks(quantize, source: torch.Tensor, fmt: str) -> list[torch.Tensor]:
    """`quantize(rows)` -> (data, scale, zero_point, global_scale) of a 2-D (N, K) weight, run on
    chunks of rows and concatenated where the format's scales are local to rows (per row, per group,
    per block of `block_rows` rows): the same result as one call (every number depends on its own
    rows only), with temporaries bounded by the chunk. Per-tensor and global-scale formats run whole."""
    f = get_format(fmt)
    rows_local = f.granularity in (Granularity.ROW, Granularity.GROUP, Granularity.BLOCK) and not f.global_scale
    if source.dim() != 2 or not rows_local or source.numel() <= QUANTIZE_CHUNK_ELEMENTS:
        return quantize(source)
    step = row_chunk(f, source.shape[1], QUANTIZE_CHUNK_ELEMENTS)
    chunks = [quantize(source[start : start + step]) for start in range(0, source.shape[0], step)]
    return [torch.cat(parts) if parts[0].numel() else parts[0] for parts in zip(*chunks)]


@dataclass
class Parameter:
    """A graph placeholder whose example input is a module parameter or buffer."""

    path: str  # "layers.0.attn.q_proj.weight"
    tensor: torch.Tensor


@dataclass
class Site:
    """One matmul (or attention) in the graph and what the policy decided for it.

    `inputs` names the operand nodes: linear sites have "x", "weight" (a parameter placeholder,
    stored as (N, K) when `weight_layout == "nk"` or (K, N) when "kn") and "bias"; attention sites
    have "q", "k", "v" and "mask". Later stages fill `qdq` with the nodes they created.
    """

    index: int
    kind: OpKind
    fqn: str
    source_op: str
    node: torch.fx.Node
    inputs: dict[str, torch.fx.Node | None]
    shapes: dict[str, tuple[Any, ...]]
    attrs: dict[str, Any] = field(default_factory=dict)
    weight_layout: str = "nk"
    n: int | None = None
    k: int | None = None
    spec: QuantSpec | None = None
    decided_by: str = ""
    skip_reason: str | None = None
    qdq: dict[str, Any] = field(default_factory=dict)
    weight_path: str | None = None
    weight_bytes_before: int = 0
    weight_bytes_after: int = 0
    sqnr_db: float | None = None
    sqnr_note: str | None = None  # why sqnr_db is missing (or the accuracy gate was not checked)
    fell_back_from: list[str] = field(default_factory=list)  # specs the accuracy gate rejected, and why
    output_sqnr_db: float | None = None  # sensitivity: the graph output's SQNR with only this site quantized
    calibration: Any = None  # calibration.SiteCalibration: smoothing / static activation scale (linear sites)

    @property
    def quantized(self) -> bool:
        return self.spec is not None and self.skip_reason is None

    @property
    def kernel(self) -> Kernel | None:
        return self.spec.kernel(self.kind) if self.quantized else None


@dataclass
class PipelineState:
    gm: torch.fx.GraphModule
    example_inputs: list[Any]
    policy: Policy
    parameters: dict[str, Parameter] = field(default_factory=dict)  # placeholder name -> parameter
    sites: list[Site] = field(default_factory=list)
    folded: Any = None  # fold.FoldedWeights: the quantized weights appended to every call
    calibration: Any = None  # calibration.Calibration from the `calibration` option, or None
    _quantized_weights: dict[tuple[Any, ...], list[torch.Tensor]] = field(default_factory=dict)

    def quantized_weight(self, site: Site) -> list[torch.Tensor]:
        """The (data, scale, zero_point, global_scale) of a linear site's weight as (N, K), computed
        once per compile however many sites or stages ask (tied weights, the SQNR report, folding)."""
        weight = site.inputs["weight"]
        transposed = site.weight_layout == "kn"
        calibration = site.calibration
        key = (weight.name, transposed, site.spec.weight, site.spec.weight_search, calibration and calibration.key)
        if key not in self._quantized_weights:
            parameter = self.parameters[weight.name].tensor
            self._quantized_weights[key] = quantize_weight(
                parameter, transposed, site.spec.weight, site.spec.weight_search, calibration
            )
        return self._quantized_weights[key]

    def forget_quantized_weights(self) -> None:
        """Drop the cache of `quantized_weight` (the fold stage, its last reader, is done): copies
        that folding packed into another layout are freed here, not at the end of the compile."""
        self._quantized_weights.clear()

    def attach_calibration(self) -> None:
        """Give each quantized linear site its weight's calibration (`calibration.SiteCalibration`);
        a site that gets a static activation scale takes the per-tensor activation format."""
        if self.calibration is None:
            return
        from lowbit_compile.calibration import replace_activation

        missing = []
        linear = [site for site in self.sites if site.kind is OpKind.LINEAR and site.quantized]
        for site in linear:
            x = site.inputs["x"].meta.get("val")
            parameter = self.parameters[site.inputs["weight"].name].tensor
            found = self.calibration.for_site(
                parameter, site.weight_path, site.spec, site.k, x.dtype, x.dim(), parameter.device
            )
            if found is None:
                missing.append(site.weight_path)
                continue
            self.calibration.remember(parameter, found.entry.path)
            site.calibration = found
            if found.static_format is not None:
                site.spec = replace_activation(site.spec, found.static_format)
        if missing:
            log.warning(
                "calibration (policy %s) has no entry for %d of this graph's %d quantized linear sites (%s): they are "
                "quantized without calibration",
                self.policy.name,
                len(missing),
                len(linear),
                ", ".join(map(str, missing[:3])),
            )
        else:
            log.info("calibration applied to all %d quantized linear sites", len(linear))

    def constants(self) -> list[torch.Tensor]:
        """The compile-time constants the graph takes as inputs after Dynamo's (calibration factors
        and static scales, added by the qdq stage), in placeholder order."""
        return [node.meta["lowbit_constant"] for node in self.placeholders() if "lowbit_constant" in node.meta]

    def replace_node(self, old: torch.fx.Node, new: torch.fx.Node) -> None:
        """Replace `old` by `new` in the graph and in every site that reads it (sites can feed
        each other directly: a linear on the output of a quantized linear or attention)."""
        old.replace_all_uses_with(new)
        for site in self.sites:
            for name, node in site.inputs.items():
                if node is old:
                    site.inputs[name] = new
        self.gm.graph.erase_node(old)

    def placeholders(self) -> list[torch.fx.Node]:
        return [n for n in self.gm.graph.nodes if n.op == "placeholder"]

    def fake_mode(self) -> Any:
        """The fake mode of the placeholders' `meta["val"]` (Dynamo's; not always the tracing context's)."""
        for node in self.placeholders():
            mode = getattr(node.meta.get("val"), "fake_mode", None)
            if mode is not None:
                return mode
        return None
