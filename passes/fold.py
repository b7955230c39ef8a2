"""Stage 4, folded: quantize and pack every weight once, at compile time.

Each weight `quantize` node (whose input is a parameter, possibly transposed) is evaluated here on
the real parameter, and its outputs become new graph inputs that the backend appends to every
call. A weight shared by several sites (tied embeddings, repeated calls) is quantized once.
Calibration constants (smoothing factors, static activation scales: `PipelineState.constants`) are
appended after the quantized weights.
"""

from __future__ import annotations

import functools
import logging
import operator
import re
import sys
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
from torch.utils.weak import WeakIdKeyDictionary

from lowbit_compile import ops
from lowbit_compile.passes.qdq import QUANTIZED_PARTS
from lowbit_compile.passes.state import PipelineState, Site, quantize_weight, remove_dead_code

log = logging.getLogger(__name__)  # lowbit_compile.passes.*: under TORCH_LOGS="+lowbit_compile"

RELEASE_OPTION = "release_weights"

# How a weight is quantized and packed (`FoldedSource.key`): transposed, format, search, calibration
# key, packing. A released parameter's quantized copies are kept under it.
CopyKey = tuple[bool, str, bool, "str | None", "str | None"]


@dataclass(frozen=True)
class FoldedSource:
    """One folded weight: which graph input it comes from, and how it was quantized."""

    input_index: int
    transposed: bool
    fmt: str
    path: str = ""  # the parameter's module path, for messages
    search: bool = True  # QuantSpec.weight_search: int4 scales searched (see passes.state.quantize_weight)
    calibration: Any = None  # calibration.SiteCalibration of the site(s) reading it, or None
    packing: str | None = None  # the kernel's layout (`ops.weight_packing`), or None: the reference layout

    @property
    def key(self) -> CopyKey:
        """How this weight is quantized and packed: its released copies are kept under this key."""
        calibration_key = None if self.calibration is None else self.calibration.key
        return (self.transposed, self.fmt, self.search, calibration_key, self.packing)


# ---------------------------------------------------------------------------------------------
# Released weights (the backend option release_weights=True).
#
# A released parameter keeps its Python object, shape, stride, dtype and device (Dynamo guards on
# all of them, so the compiled graph keeps running without a recompile) but its storage is resized
# to 0 bytes: the memory is freed. Its quantized copies are kept here, per parameter, for as long as
# the parameter lives, so another compiled graph (a recompile for a new shape, layers compiled one
# by one) can use them. Whatever would need the original values raises `released_error`.


@dataclass
class _Released:
    path: str
    nbytes: int  # the storage size before release (restored for load_state_dict)
    copies: dict[CopyKey, list[torch.Tensor]] = field(default_factory=dict)  # by FoldedSource.key


_RELEASED: WeakIdKeyDictionary = WeakIdKeyDictionary()  # parameter -> _Released
_PROTECTED: WeakIdKeyDictionary = WeakIdKeyDictionary()  # module -> its hook handles


def released_error(path: str, need: str) -> RuntimeError:
    return RuntimeError(
        f"{path} was released after quantization by the lowbit option {RELEASE_OPTION}=True; {need}. "
        f"Compile without {RELEASE_OPTION}=True to keep the original weights, or give the parameter new values "
        "first (load_state_dict, or `parameter.data = tensor`)."
    )


def released_record(value: Any) -> _Released | None:
    """The release record of a parameter whose storage is still released (not refilled since)."""
    if not isinstance(value, torch.Tensor):
        return None
    record = _RELEASED.get(value)
    if record is None or value.untyped_storage().nbytes() != 0:
        return None
    return record


def released_inputs(values: Sequence[Any]) -> list[str]:
    """The module paths of the released parameters among a graph's inputs."""
    return [record.path for record in map(released_record, values) if record is not None]


def _kept_copy(
    parameter: torch.Tensor,
    transposed: bool,
    fmt: str,
    search: bool = True,
    calibration_key: str | None = None,
    packing: str | None = None,
) -> list[torch.Tensor] | None:
    """The quantized copy kept for a released parameter (None if it is not released); raises if the
    copy needed was not kept."""
    record = released_record(parameter)
    if record is None:
        return None
    copy = record.copies.get((transposed, fmt, search, calibration_key, packing))
    if copy is None:
        kept = ", ".join(
            f"{f}{' transposed' if t else ''}{' calibrated' if c else ''}{f' packed {p}' if p else ''}"
            for t, f, _, c, p in record.copies
        )
        kept = kept or "none"
        layout = (" transposed" if transposed else "") + (f" packed {packing}" if packing else "")
        raise released_error(record.path, f"this compile needs it quantized as {fmt}{layout}, and only {kept} was kept")
    return copy


def _release_parameter(
    parameter: torch.Tensor, path: str, key: CopyKey, parts: list[torch.Tensor]
) -> bool:
    """Free a parameter's storage, keeping `parts` (its quantized copy) for other graphs."""
    storage = parameter.untyped_storage()
    record = _RELEASED.get(parameter)
    if storage.nbytes() == 0:  # released already (a weight folded in two formats), or empty
        if record is not None:
            record.copies[key] = parts
        return record is not None
    # One reference is the parameter's, one is `storage` here: any other tensor sharing the storage
    # would keep the memory alive (and lose its data), so nothing is gained by releasing.
    if torch._C._storage_Use_Count(storage._cdata) > 2:
        log.warning("%s not released: other tensors share its storage", path)
        return False
    _RELEASED[parameter] = _Released(path, storage.nbytes(), {key: parts})
    storage.resize_(0)
    return True


def _released_parameter_path(module: torch.nn.Module) -> str | None:
    for parameter in module._parameters.values():
        record = released_record(parameter)
        if record is not None:
            return record.path
    return None


def _refuse_eager_call(module: torch.nn.Module, args: Any) -> None:
    if torch.compiler.is_compiling():  # Dynamo tracing the module again: the backend checks instead
        return
    path = _released_parameter_path(module)
    if path is not None:
        raise released_error(path, f"running the {type(module).__name__} module eagerly needs it")


def _refuse_state_dict(module: torch.nn.Module, state_dict: Any, prefix: str, local_metadata: Any) -> None:
    path = _released_parameter_path(module)
    if path is not None:
        raise released_error(path, "state_dict() would return it without its values")


def _refill_for_load(module: torch.nn.Module, state_dict: Any, prefix: str, local_metadata: Any, *_: Any) -> None:
    """load_state_dict copies into the parameters: give a released one its storage back first (the
    per-call check then sees new values and quantizes them). Parameters the state dict does not
    replace stay released; assign=True replaces the parameter objects themselves."""
    if local_metadata.get("assign_to_params_buffers", False):
        return
    for name, parameter in module._parameters.items():
        record = released_record(parameter)
        new = state_dict.get(prefix + name)
        if record is not None and isinstance(new, torch.Tensor) and new.shape == parameter.shape:
            parameter.untyped_storage().resize_(record.nbytes)


def _protect_owners(parameters: list[torch.Tensor]) -> None:
    """Best effort: make the modules holding released parameters refuse eager use, saving and
    loading with a clear error (a plain read of a 0-byte storage would crash instead).

    The modules are looked for among the nn.Modules in the local variables of the frames on the
    stack (the compiled function's own frame and its callers) and, while compiling, of the frame
    Dynamo is compiling. Modules not found there get no hooks. Hooks added after compiling do not
    recompile the graph (Dynamo does not guard on nn.Module hooks)."""
    wanted = {id(p) for p in parameters}
    roots: list[Any] = []
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        tx = InstructionTranslator.current_tx()
        if tx is not None:
            roots.extend(tx.f_locals.values())
    except Exception:  # noqa: BLE001  (not compiling, or another torch version's internals)
        pass
    frame = sys._getframe(1)
    while frame is not None:
        roots.extend(frame.f_locals.values())
        frame = frame.f_back
    seen: set[int] = set()
    for root in roots:
        if not isinstance(root, torch.nn.Module) or id(root) in seen:
            continue
        for module in root.modules():
            if id(module) in seen:
                continue
            seen.add(id(module))
            if module in _PROTECTED or not any(id(p) in wanted for p in module._parameters.values()):
                continue
            # register_state_dict_post_hook is the public name of the older _register_state_dict_hook
            state_dict_hook = getattr(module, "register_state_dict_post_hook", None) or module._register_state_dict_hook
            _PROTECTED[module] = (
                module.register_forward_pre_hook(_refuse_eager_call),
                state_dict_hook(_refuse_state_dict),
                module.register_load_state_dict_pre_hook(_refill_for_load),
            )


# ---------------------------------------------------------------------------------------------
# The per-call check.

_version = operator.attrgetter("_version")
_data_ptr = torch.Tensor.data_ptr
_PARTS = len(QUANTIZED_PARTS)


def _gather(indices: list[int]) -> Callable[[Sequence[Any]], tuple[Any, ...]]:
    """A C-level getter of some items of a sequence, always returning a tuple."""
    if len(indices) == 1:
        index = indices[0]
        return lambda args: (args[index],)
    return operator.itemgetter(*indices)


def _none(_: Any) -> tuple[()]:
    return ()


def _forget(folded_ref: weakref.ref, key: tuple[int, ...], entry_ref: weakref.ref, _dead: Any) -> None:
    """A parameter of a set died: drop the set (its ids may be reused by new objects from now on)."""
    folded, entry = folded_ref(), entry_ref()
    if folded is None or entry is None:
        return
    if folded._sets.get(key) is entry:
        del folded._sets[key]
    if folded._last is entry:
        folded._last = None
    if folded.tensors is entry.tensors:
        folded.tensors = []


class _QuantizedSet:
    """One set of parameters the compiled graph was called with, what it looked like when it was
    quantized, and its quantized weights."""

    __slots__ = ("ids", "references", "tensors", "pointers", "versioned", "versions", "__weakref__")

    def __init__(self, folded: FoldedWeights, parameters: Sequence[torch.Tensor], tensors: list[torch.Tensor]):
        self.ids = tuple(map(id, parameters))
        self.tensors = tensors
        # The callbacks keep the ids honest: the set is dropped the moment one of its parameters
        # dies, before another object can take its id. (No reference cycle: they hold weak refs.)
        forget = functools.partial(_forget, weakref.ref(folded), self.ids, weakref.ref(self))
        self.references = [weakref.ref(p, forget) for p in parameters]
        self.snapshot(parameters)

    def snapshot(self, parameters: Sequence[torch.Tensor]) -> None:
        """Record what changes when a parameter's values are replaced: its storage (`p.data = t`)
        and its version counter (in-place updates such as `load_state_dict`). Inference-mode
        tensors have no version counter."""
        self.pointers = list(map(_data_ptr, parameters))
        indices = [i for i, p in enumerate(parameters) if not p.is_inference()]
        # None: every parameter has a version counter (the common case, read without a gather).
        self.versioned = None if len(indices) == len(parameters) else _gather(indices) if indices else _none
        self.versions = list(map(_version, parameters if self.versioned is None else self.versioned(parameters)))

    def unchanged(self, parameters: Sequence[torch.Tensor]) -> bool:
        """Whether `parameters` (the same objects, checked by the caller) are as when quantized."""
        if list(map(_data_ptr, parameters)) != self.pointers:
            return False
        versioned = self.versioned
        return list(map(_version, parameters if versioned is None else versioned(parameters))) == self.versions


class FoldedWeights:
    """The compile-time quantized weights that the compiled graph takes as its last inputs.

    Dynamo passes parameters as ordinary inputs and does not guard on which tensor they are, so one
    compiled graph can be called with other modules' parameters (layers compiled one by one share
    their code) or with parameters updated since (`load_state_dict`, `p.data = t`). `for_call`
    checks the parameters of each call and quantizes a set it has not seen, or that changed, once.
    One quantized copy is kept per live set of parameters; a set whose parameters were freed is
    dropped. Writes that bypass the version counter (`p.data.copy_(t)`, in-place updates of
    inference-mode tensors) cannot be seen: update weights with `load_state_dict` or under
    `torch.no_grad()` on the parameter itself.

    Cost per call, for the set seen last (the common case): three C-level passes over the folded
    parameters (identity, storage pointer, version counter), about 0.15 us per parameter on a
    2-core EPYC VM (benchmarks/bench_host_overhead.py).
    """

    def __init__(
        self,
        sources: list[FoldedSource],
        parameters: Sequence[torch.Tensor],
        tensors: list[torch.Tensor],
        constants: Sequence[tuple[int, str]] = (),
    ):
        self.sources = sources
        # Calibration constants after the weights: (source index, "smooth" or "static_scale") each,
        # read from that source's SiteCalibration (another parameter set brings its own).
        self.constants = list(constants)
        tensors = tensors + self._constants([source.calibration for source in sources])
        # The quantized weights of the latest call's set (first: the compile-time set), flat: 4 per
        # source, then the constants; empty once that set's parameters are freed. The graph's
        # inputs are for_call's.
        self.tensors = tensors
        self._gather = _gather([source.input_index for source in sources]) if sources else None
        self._sets: dict[tuple[int, ...], _QuantizedSet] = {}  # id(parameters) -> their quantized set
        self._last: _QuantizedSet | None = None  # the set of the latest call: checked first
        self._releasable: list[bool] | None = None  # per source, once release_weights is on
        if sources:
            self._remember(tuple(parameters), tensors)

    def for_call(self, args: Sequence[Any]) -> list[torch.Tensor]:
        last = self._last
        if last is None:
            if not self.sources:
                return self.tensors
            return self._lookup(self._gather(args))
        parameters = self._gather(args)
        # While `last` exists its parameters are alive, so equal ids mean the same objects.
        try:
            if tuple(map(id, parameters)) == last.ids and last.unchanged(parameters):
                return last.tensors
        except RuntimeError:  # a parameter without a version counter now (an inference tensor)
            pass
        return self._lookup(parameters)

    def _lookup(self, parameters: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
        entry = self._sets.get(tuple(map(id, parameters)))
        if entry is not None and all(reference() is p for reference, p in zip(entry.references, parameters)):
            try:
                unchanged = entry.unchanged(parameters)
            except RuntimeError:
                unchanged = False
            if unchanged:
                self._last = entry
                self.tensors = entry.tensors
                return entry.tensors
        log.info("parameters differ from the compiled ones: quantizing %d weights for them", len(parameters))
        tensors: list[torch.Tensor] = []
        calibrations = [
            None if source.calibration is None else source.calibration.for_parameter(parameter)
            for source, parameter in zip(self.sources, parameters)
        ]
        for source, parameter, calibration in zip(self.sources, parameters, calibrations):
            kept = _kept_copy(
                parameter, source.transposed, source.fmt, source.search, calibration and calibration.key, source.packing
            )
            if kept is None:
                extra = {} if calibration is None else {"calibration": calibration}
                kept = quantize_weight(parameter, source.transposed, source.fmt, source.search, **extra)
                kept = ops.pack_weight(source.packing, kept)
            tensors.extend(kept)
        tensors.extend(self._constants(calibrations))
        for tensor in tensors:
            if tensor.is_cuda:
                torch._dynamo.mark_static_address(tensor)
        entry = self._remember(parameters, tensors)
        self.tensors = tensors
        if self._releasable is not None:
            self._release(entry, parameters)
        return tensors

    def _constants(self, calibrations: Sequence[Any]) -> list[torch.Tensor]:
        return [getattr(calibrations[index], kind) for index, kind in self.constants]

    def _remember(self, parameters: Sequence[torch.Tensor], tensors: list[torch.Tensor]) -> _QuantizedSet:
        entry = _QuantizedSet(self, parameters, tensors)
        self._sets[entry.ids] = entry
        self._last = entry
        return entry

    def release_weights(self, state: PipelineState) -> None:
        """release_weights=True: free the original parameters of the folded weights, now and for
        every new set of parameters this graph quantizes. Only parameters that the compiled graph
        no longer reads (all their uses were folded) and that share their storage with no other
        tensor are released."""
        placeholders = state.placeholders()
        self._releasable = [not placeholders[source.input_index].users for source in self.sources]
        for source, releasable in zip(self.sources, self._releasable):
            if not releasable:
                log.info("%s not released: the compiled graph still reads it unquantized", source.path)
        if self._last is not None:
            self._release(self._last, tuple(reference() for reference in self._last.references))

    def _release(self, entry: _QuantizedSet, parameters: Sequence[torch.Tensor]) -> None:
        released = []
        for i, (source, parameter, releasable) in enumerate(zip(self.sources, parameters, self._releasable or ())):
            parts = entry.tensors[i * _PARTS : (i + 1) * _PARTS]
            if releasable and _release_parameter(parameter, source.path, source.key, parts):
                released.append(parameter)
        if released:
            entry.snapshot(parameters)  # their storage changed: this is how the set looks from now on
            log.info("released %d original weights after quantization (%s=True)", len(released), RELEASE_OPTION)
            _protect_owners(released)


def _compile_time_copy(
    state: PipelineState, site: Site, parameter: torch.Tensor, packing: str | None
) -> list[torch.Tensor]:
    calibration_key = None if site.calibration is None else site.calibration.key
    transposed = site.weight_layout == "kn"
    kept = _kept_copy(parameter, transposed, site.spec.weight, site.spec.weight_search, calibration_key, packing)
    return kept if kept is not None else ops.pack_weight(packing, state.quantized_weight(site))


def _packing(site: Site, parameter: torch.Tensor) -> str | None:
    """The layout the op layer wants for this site's folded weight (`ops.weight_packing`)."""
    x = site.inputs.get("x")
    x_val = x.meta.get("val") if x is not None else None
    if not isinstance(x_val, torch.Tensor):
        return None
    return ops.weight_packing(site.kernel.value, x_val.dtype, parameter.device, site.spec.weight)


def _bytes(tensors: list[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def fold_weight_quantization(state: PipelineState) -> None:
    graph = state.gm.graph
    fake_mode = state.fake_mode()
    last_placeholder = state.placeholders()[-1]
    # Calibration constants (qdq stage) stay the last inputs: the weights go before them.
    constant_nodes = [node for node in state.placeholders() if "lowbit_constant" in node.meta]
    folded: dict[tuple[str, bool, str, bool, str | None, str | None], list[torch.fx.Node]] = {}
    source_index: dict[tuple[str, bool, str, bool, str | None, str | None], int] = {}
    # Each calibration constant is read from the SiteCalibration of the weight its site folds, so
    # that another parameter set (for_call) brings its own factors and scales.
    constant_source: dict[torch.fx.Node, tuple[int, str]] = {}
    input_index = {node: i for i, node in enumerate(state.placeholders())}
    sources: list[FoldedSource] = []
    source_parameters: list[torch.Tensor] = []
    tensors_in_order: list[torch.Tensor] = []
    # placeholder targets are the graph function's argument names: two weights whose paths read
    # the same (e.g. roots Dynamo names alike) must still get two names
    taken = {node.target for node in state.placeholders()}
    total_before = total_after = 0
    for site in state.sites:
        quantize = site.qdq.get("weight_quantize")
        if quantize is None:
            continue
        weight = site.inputs["weight"]
        fmt = site.spec.weight
        transposed = site.weight_layout == "kn"
        search = site.spec.weight_search
        parameter = state.parameters[weight.name].tensor
        packing = _packing(site, parameter)
        calibration_key = None if site.calibration is None else site.calibration.key
        key = (weight.name, transposed, fmt, search, calibration_key, packing)
        if key not in folded:
            tensors = _compile_time_copy(state, site, parameter, packing)
            nodes = []
            layout = ("_t" if transposed else "") + ("_" + packing if packing else "")
            prefix = base = re.sub(r"\W", "_", f"folded_{site.weight_path}{layout}_{fmt}")
            suffix = 1
            while any(f"{prefix}_{part}" in taken for part in QUANTIZED_PARTS):
                suffix += 1
                prefix = f"{base}_{suffix}"
            taken.update(f"{prefix}_{part}" for part in QUANTIZED_PARTS)
            for part, tensor in zip(QUANTIZED_PARTS, tensors):
                if constant_nodes:
                    place = graph.inserting_before(constant_nodes[0])
                else:
                    place = graph.inserting_after(last_placeholder)
                with place:
                    node = graph.placeholder(f"{prefix}_{part}")
                node.meta["val"] = fake_mode.from_tensor(tensor, static_shapes=True) if fake_mode else tensor
                node.meta["lowbit_folded"] = f"{site.weight_path} as {fmt} {part}"
                last_placeholder = node
                nodes.append(node)
                tensors_in_order.append(tensor)
            folded[key] = nodes
            source_index[key] = len(sources)
            sources.append(
                FoldedSource(
                    input_index[weight],
                    transposed,
                    fmt,
                    site.weight_path or weight.name,
                    search,
                    site.calibration,
                    packing,
                )
            )
            source_parameters.append(parameter)
            total_before += parameter.numel() * parameter.element_size()
            total_after += _bytes(tensors)
            site.weight_bytes_before = parameter.numel() * parameter.element_size()
            site.weight_bytes_after = _bytes(tensors)
        # else: the weight is shared with an earlier site (tied), which already counts its bytes
        for part_node, new_input in zip(site.qdq["weight_parts"], folded[key]):
            part_node.replace_all_uses_with(new_input)
        site.qdq["weight_parts"] = folded[key]
        del site.qdq["weight_quantize"]
        for name, attribute in (("smooth", "smooth"), ("activation_scale", "static_scale")):
            if name in site.qdq:
                constant_source[site.qdq[name]] = (source_index[key], attribute)
    remove_dead_code(graph)
    for node in state.placeholders():  # a released weight this graph would read unquantized
        record = released_record(state.parameters[node.name].tensor) if node.name in state.parameters else None
        if record is not None and node.users:
            raise released_error(
                record.path, f"this compiled graph reads it unquantized ({next(iter(node.users)).name})"
            )
    state.folded = FoldedWeights(
        sources, source_parameters, tensors_in_order, [constant_source[node] for node in constant_nodes]
    )
    state.forget_quantized_weights()
    if folded:
        log.info(
            "quantized %d weights once at compile time: %.2f MiB -> %.2f MiB",
            len(folded),
            total_before / 2**20,
            total_after / 2**20,
        )
