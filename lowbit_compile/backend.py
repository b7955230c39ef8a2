"""The `lowbit` torch.compile backend: options, the pass pipeline, and Inductor.

    torch.compile(model, backend="lowbit", options={"policy": "w8a8", "dump_dir": "/tmp/dump"})

The entry point in pyproject.toml registers it under `torch_dynamo_backends`, so no import is needed.
"""

from __future__ import annotations

import difflib
import itertools
import logging
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx

from lowbit_compile import ops  # noqa: F401  (registers torch.ops.lowbit)
from lowbit_compile.dump import StageRecorder, fx_graph_text, graph_text, render_stage
from lowbit_compile.policy import Policy, as_policy
from lowbit_compile.report import Report, build_report, coverage_problem, measure_sensitivity, measure_site_sqnr

log = logging.getLogger(__name__)

OPTION_DOCS = {
    "policy": "a lowbit_compile.Policy or a recipe name (lowbit_compile.RECIPES); default: the 8-bit default policy",
    "dump_dir": "directory for stage graphs, the report and Inductor's output code (or env LOWBIT_DUMP_DIR)",
    "compute_sqnr": (
        "measure each site's SQNR on the compile-time inputs (default True; specs with a min_sqnr floor are "
        "measured regardless)"
    ),
    "inductor": "False to stop after the fused stage and run it without Inductor (debugging); default True",
    "inductor_config": "dict of torch._inductor.config patches for this compile (applied over the mode's)",
    "mode": (
        "torch.compile's mode, with Inductor's meaning ('reduce-overhead': CUDA graphs, the folded weights static; "
        "'max-autotune'; 'max-autotune-no-cudagraphs'; 'default'); torch.compile's own mode= works too, but "
        "torch.compile refuses mode= together with options=, so name it here when you also pass options"
    ),
    "release_weights": (
        "True frees the original weights of the quantized (folded) sites once quantized, so the model holds only "
        "their packed copies; using them afterwards (the eager module, another format) raises an error; default False"
    ),
    "calibration": (
        "what lowbit_compile.calibrate(model, batches, policy=...) returned: per-channel smoothing, "
        "activation-weighted int4 weight search and static activation scales from real inputs; the policy "
        "defaults to the calibration's"
    ),
}
VALID_OPTIONS = tuple(OPTION_DOCS)
_graph_counter = itertools.count()


@dataclass(frozen=True)
class BackendOptions:
    policy: Policy
    dump_dir: str | None = None
    compute_sqnr: bool = True
    inductor: bool = True
    inductor_config: dict[str, Any] = field(default_factory=dict)
    release_weights: bool = False
    mode: str | None = None
    calibration: Any = None  # lowbit_compile.Calibration
    sensitivity: bool = False  # explain(): per-site output SQNR (one extra graph run per site); not an option
    caller: str = "torch.compile(backend='lowbit')"  # who compiles, for dump headers; not an option

    @classmethod
    def parse(cls, options: dict[str, Any] | None) -> BackendOptions:
        if options is not None and not isinstance(options, dict):
            raise OptionError(f"options must be a dict, got {type(options).__name__}")
        options = dict(options or {})
        unknown = sorted(set(options) - set(VALID_OPTIONS))
        if unknown:
            hints = [
                f"{key!r} -> {close[0]!r}"
                for key in unknown
                if (close := difflib.get_close_matches(key, VALID_OPTIONS, n=1))
            ]
            hint = f" (did you mean {', '.join(hints)}?)" if hints else ""
            raise OptionError(f"unknown lowbit option(s) {unknown}{hint}")
        inductor_config = options.get("inductor_config") or {}
        if not isinstance(inductor_config, dict):
            raise OptionError("option inductor_config must be a dict of torch._inductor.config settings")
        mode = options.get("mode")
        if mode is not None:
            modes = _inductor_modes()
            if mode not in modes:
                hint = difflib.get_close_matches(str(mode), modes, n=1)
                hint = f" (did you mean {hint[0]!r}?)" if hint else ""
                raise OptionError(f"unknown mode {mode!r}{hint}; torch.compile's modes are {sorted(modes)}")
            inductor_config = {**modes[mode], **inductor_config}  # explicit settings win over the mode's
        try:
            policy = as_policy(options.get("policy"))
        except ValueError as error:
            raise OptionError(f"option policy: {error}") from None
        calibration = options.get("calibration")
        if calibration is not None:
            from lowbit_compile.calibration import Calibration

            if not isinstance(calibration, Calibration):
                raise OptionError(
                    "option calibration must be what lowbit_compile.calibrate(model, batches, policy=...) returns, "
                    f"got {type(calibration).__name__}"
                )
            if options.get("policy") is None:
                policy = calibration.policy
            elif policy.cache_key() != calibration.policy.cache_key():
                raise OptionError(
                    f"option calibration was made for policy {calibration.policy.name!r} (key "
                    f"{calibration.policy.cache_key()}), not for option policy {policy.name!r} (key "
                    f"{policy.cache_key()}); leave policy out to use the calibration's, or calibrate with this policy"
                )
        return cls(
            policy=policy,
            dump_dir=options.get("dump_dir"),
            compute_sqnr=bool(options.get("compute_sqnr", True)),
            inductor=bool(options.get("inductor", True)),
            inductor_config=dict(inductor_config),
            release_weights=bool(options.get("release_weights", False)),
            mode=mode,
            calibration=calibration,
        )


def _inductor_modes() -> dict[str, dict[str, Any]]:
    """torch.compile's modes and the Inductor settings each stands for (this torch version's list)."""
    from torch._inductor import list_mode_options

    return list_mode_options()


class OptionError(ValueError):
    """A bad `options=` for backend="lowbit".

    torch.compile hands options to a registered backend only when it compiles, at the first call of
    the compiled model (checked on torch 2.13: `_TorchCompileWrapper` stores them, and nothing in
    torch.compile or Dynamo's `optimize` calls the backend or a hook of it before), so Dynamo raises
    this as `torch._dynamo.exc.BackendCompilerFailed` (the ValueError is its `inner_exception`).
    `lowbit_compile.check_options(options)` raises it directly, at once."""

    def __init__(self, problem: str) -> None:
        valid = "\n".join(f"  {key}: {doc}" for key, doc in OPTION_DOCS.items())
        super().__init__(
            f"invalid options for torch.compile(..., backend='lowbit', options=...): {problem}.\n"
            f"Valid options:\n{valid}\n"
            "(torch.compile passes options to a backend only at the first call, so this error arrives there, "
            "wrapped in torch._dynamo.exc.BackendCompilerFailed; call lowbit_compile.check_options(options) "
            "before torch.compile to check them at once.)"
        )
        self.problem = problem


def check_options(options: dict[str, Any] | None) -> BackendOptions:
    """Validate `options` for backend="lowbit" now (torch.compile itself only passes them on at the
    first call); raises `OptionError` (a ValueError) naming the problem and the valid options."""
    return BackendOptions.parse(options)


def _graph_id() -> str:
    compile_id = torch._guards.CompileContext.current_compile_id()
    return str(compile_id).replace("/", "_") if compile_id is not None else str(next(_graph_counter))


PROTECT_LIMIT_BYTES = 1 << 30


def _measurement_inputs(graph: torch.fx.Graph, example_inputs: list[Any]) -> list[Any] | str:
    """The inputs to run the graph on once at compile time (SQNR and the accuracy gate), or why it
    cannot run. A graph that updates inputs in place (a KV cache, a counter buffer) runs on copies
    of every input an in-place op may write: the written tensor's chain of first arguments is
    followed back to a placeholder (conservative: any op may return a view of its first argument)."""
    from lowbit_compile.passes.state import mutates

    placeholders = {node: i for i, node in enumerate(n for n in graph.nodes if n.op == "placeholder")}
    protect: set[int] = set()
    for node in graph.nodes:
        if not mutates(node):
            continue
        written = node.kwargs.get("out", node.args[0] if node.args else None)
        seen = set()
        while isinstance(written, torch.fx.Node) and written.op != "placeholder" and written not in seen:
            seen.add(written)
            written = written.args[0] if written.args else None
        if isinstance(written, torch.fx.Node) and written.op == "placeholder":
            protect.add(placeholders[written])
    inputs = list(example_inputs)
    size = sum(inputs[i].nbytes for i in protect if isinstance(inputs[i], torch.Tensor))
    if size > PROTECT_LIMIT_BYTES:
        return (
            f"not measured: the graph updates {size / 2**30:.1f} GiB of inputs in place, more than the "
            f"{PROTECT_LIMIT_BYTES / 2**30:.0f} GiB it would copy to run once at compile time"
        )
    for i in protect:
        if isinstance(inputs[i], torch.Tensor):
            inputs[i] = inputs[i].clone()
    if protect:
        log.info("graph updates %d inputs in place: site SQNR measured on copies of them", len(protect))
    return inputs


def compile_graph(
    gm: torch.fx.GraphModule,
    example_inputs: list[Any],
    options: BackendOptions,
    on_report: Callable[[Report], None] | None = None,
    on_stages: Callable[[dict[str, str]], None] | None = None,
    on_stage_state: Callable[[str, Any], None] | None = None,
) -> Callable[..., Any]:
    """Run the pipeline on one Dynamo graph and return what Dynamo should call instead.
    `on_stage_state(stage, state)` sees the pipeline state after each stage (tests run the `qdq`
    stage's graph there as the numerical reference)."""
    from lowbit_compile.passes.fold import released_inputs
    from lowbit_compile.passes.lower import lower_with_inductor
    from lowbit_compile.passes.pipeline import run_pipeline

    policy = options.policy
    # Released weights (release_weights=True in an earlier compile) cannot run the SQNR measurement;
    # folding uses their kept quantized copies, or says which one is missing.
    released = released_inputs(example_inputs)
    graph_id = _graph_id()
    recorder = StageRecorder(options.dump_dir, graph_id, caller=options.caller, policy=policy)

    lap = _Laps()

    def observe(stage: str, state: Any) -> None:
        lap(stage)
        if stage == "annotated":
            _measure(state, options.compute_sqnr, released)
            if options.sensitivity and not released:
                _sensitivity(state)
            lap("measure")
        sites = state.sites if stage != "captured" else None
        recorder.record(stage, render_stage(stage, graph_text(state.gm), policy, graph_id, sites))
        if on_stage_state is not None:
            on_stage_state(stage, state)
        lap("dump")

    state = run_pipeline(gm, example_inputs, policy, observe, calibration=options.calibration)
    report = build_report(state.sites, policy, graph_id)
    log.info("%s", report.table())
    problem = coverage_problem(state.sites)
    if problem is not None:
        log.warning("lowbit graph %s, policy %s: %s", graph_id, policy.name, problem)
    recorder.record("report", report.table() + "\n", suffix=".txt")
    recorder.record("report_json", report.to_json(), suffix=".json")
    if on_report is not None:
        on_report(report)

    for tensor in state.folded.tensors:
        if tensor.is_cuda:  # CUDA graphs must not copy the folded weights on every replay
            torch._dynamo.mark_static_address(tensor)
    lap("report")
    if options.inductor:
        compiled = lower_with_inductor(
            state,
            on_lowered_graph=lambda graph: recorder.record(
                "lowered", render_stage("lowered", fx_graph_text(graph), policy, graph_id)
            ),
            on_output_code=lambda code: recorder.record("output_code", code),
            config_patches=options.inductor_config,
        )
        if "lowered" not in recorder.texts:  # Inductor's cache served it: its passes did not run
            note = "# Inductor's FX graph cache served this graph; set TORCHINDUCTOR_FORCE_DISABLE_CACHES=1 to see it\n"
            recorder.record("lowered", render_stage("lowered", note, policy, graph_id))
        if "output_code" not in recorder.texts:  # AOTAutograd's cache served it: Inductor did not run
            recorder.record(
                "output_code",
                "# AOTAutograd's cache served this graph, so Inductor did not run and no output code was"
                " generated; set TORCHINDUCTOR_FORCE_DISABLE_CACHES=1 to see it\n",
            )
    else:
        fused, folded = state.gm, state.folded

        def compiled(*args: Any) -> Any:
            with torch.no_grad():
                return fused(*args, *folded.for_call(args))

    lap("lower")
    if options.release_weights:
        state.folded.release_weights(state)
    if on_stages is not None:
        on_stages(recorder.texts)
    return _inference_only(compiled, example_inputs, graph_id)


class _Laps:
    """Compile time per step of `compile_graph`, summed over graphs in
    `counters["lowbit"]["compile_ms_<step>"]`: each stage's passes (named by the stage),
    `measure` (site SQNR and the accuracy gate), `dump` (rendering the stages), `report`, and
    `lower` (Inductor, with our kernels' tuning)."""

    def __init__(self) -> None:
        self.last = time.perf_counter()

    def __call__(self, step: str) -> None:
        from torch._dynamo.utils import counters

        now = time.perf_counter()
        counters["lowbit"][f"compile_ms_{step}"] += int((now - self.last) * 1000)
        self.last = now


def _measure(state: Any, compute_sqnr: bool, released: list[str]) -> None:
    """Site SQNR and the accuracy gate, in one run of the annotated graph at compile time. Floors
    (`QuantSpec.min_sqnr`) make it run even with compute_sqnr=False; a site whose floor cannot be
    checked stays quantized, and the report and a WARNING say why."""
    from lowbit_compile.passes.annotate import spec_problem

    quantized = [site for site in state.sites if site.quantized]
    gated = [site for site in quantized if site.spec.min_sqnr is not None]
    if not quantized or not (compute_sqnr or gated):
        return
    if released:
        inputs: list[Any] | str = f"not measured: {len(released)} weights were released ({', '.join(released[:3])})"
    else:
        inputs = _measurement_inputs(state.gm.graph, state.example_inputs)
    if isinstance(inputs, str):  # why the graph cannot run
        for site in quantized:
            site.sqnr_note = inputs if site not in gated else f"accuracy gate not checked: {inputs}"
        if gated:
            log.warning("lowbit accuracy gate not checked on %d sites: %s", len(gated), inputs)
        else:
            log.info("site SQNR %s", inputs)
        return
    measure_site_sqnr(
        state.gm, inputs, state.sites, state.parameters, state.quantized_weight, spec_problem=spec_problem
    )


def _sensitivity(state: Any) -> None:
    def fresh_inputs() -> list[Any]:
        inputs = _measurement_inputs(state.gm.graph, state.example_inputs)
        if isinstance(inputs, str):
            raise RuntimeError(inputs)
        return inputs

    measure_sensitivity(state.gm, fresh_inputs, state.sites, state.parameters, state.quantized_weight)


INFERENCE_ONLY = (
    "lowbit_compile is inference-only: the quantized graph has no backward (the fused low-bit ops have no "
    "autograd formula). Wrap the call in torch.no_grad() / torch.inference_mode() for inference, or compile "
    "without backend='lowbit' for training"
)


class InferenceOnlyWarning(UserWarning):
    """Compiling with grad enabled and inputs or parameters that require grad."""


class _NoBackward(torch.autograd.Function):
    """Gives the outputs of a graph compiled with grad enabled a grad_fn whose backward raises
    (instead of outputs that silently do not require grad)."""

    @staticmethod
    def forward(ctx: Any, anchor: torch.Tensor, *outputs: Any) -> Any:
        ctx.mark_non_differentiable(*(o for o in outputs if isinstance(o, torch.Tensor) and not o.is_floating_point()))
        return outputs

    @staticmethod
    def backward(ctx: Any, *grads: Any) -> Any:
        raise RuntimeError(INFERENCE_ONLY)


def _inference_only(compiled: Callable[..., Any], example_inputs: list[Any], graph_id: str) -> Callable[..., Any]:
    """`compiled` itself when the graph was compiled without grad (Dynamo guards on grad mode and on
    each input's requires_grad, so such a graph only runs without grad: no per-call cost); otherwise a
    warning now and a wrapper whose outputs fail `backward()` with the cause."""
    needs_grad = [i for i, x in enumerate(example_inputs) if isinstance(x, torch.Tensor) and x.requires_grad]
    if not (torch.is_grad_enabled() and needs_grad):
        return compiled
    warnings.warn(
        f"lowbit graph {graph_id} is compiled with grad enabled and {len(needs_grad)} inputs or parameters that "
        f"require grad; its outputs cannot be differentiated (backward() raises). {INFERENCE_ONLY}.",
        InferenceOnlyWarning,
    )
    anchor_index = needs_grad[0]

    def run(*args: Any) -> Any:
        outputs = compiled(*args)
        if not torch.is_grad_enabled():
            return outputs
        single = not isinstance(outputs, (tuple, list))
        if not any(isinstance(o, torch.Tensor) for o in ((outputs,) if single else outputs)):
            return outputs
        wrapped = _NoBackward.apply(args[anchor_index], *((outputs,) if single else outputs))
        if single:
            return wrapped[0]
        return type(outputs)(wrapped) if isinstance(outputs, tuple) else list(wrapped)

    return run


def lowbit_backend(
    gm: torch.fx.GraphModule,
    example_inputs: list[Any],
    options: dict[str, Any] | None = None,
    mode: str | None = None,
) -> Callable[..., Any]:
    """The function registered as `backend="lowbit"`. torch.compile passes `mode=` here when it is
    given (it refuses mode= together with options=; `options={"mode": ...}` covers that case)."""
    if mode is not None:
        if isinstance(options, dict) and options.get("mode") not in (None, mode):
            raise OptionError(f"mode={mode!r} and options['mode']={options['mode']!r} disagree")
        options = {**(options if isinstance(options, dict) else {}), "mode": mode}
    return compile_graph(gm, example_inputs, BackendOptions.parse(options))
