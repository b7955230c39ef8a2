"""Stage 5, fused: each q/dq + matmul group becomes one `torch.ops.lowbit` op.

Weight dequantization and the matmul merge into the fused op; activation quantization stays as the
decomposable `lowbit.quantize` op (plain pointwise/reduction math under tracing) so Inductor can
fuse it into the activation's producer.
"""

from __future__ import annotations

import logging

import torch
import torch.fx

from lowbit_compile.ops import FUSED_OPS
from lowbit_compile.policy import Kernel
from lowbit_compile.passes.annotate import value_of
from lowbit_compile.passes.state import PipelineState, Site, remove_dead_code

log = logging.getLogger(__name__)  # lowbit_compile.passes.*: under TORCH_LOGS="+lowbit_compile"


def _fused_args(site: Site) -> tuple:
    spec, qdq, inputs = site.spec, site.qdq, site.inputs
    out_dtype = value_of(qdq["op"]).dtype
    kernel = site.kernel
    if kernel is Kernel.BLOCK_ATTENTION:  # high-precision operands: the op quantizes them itself
        attrs = site.attrs
        return (
            qdq["q_input"],
            qdq["k_input"],
            qdq["v_input"],
            qdq["mask"],
            bool(attrs["is_causal"]),
            attrs["scale"],
            bool(attrs["enable_gqa"]),
            spec.activation,
            out_dtype,
        )
    if kernel is Kernel.ATTENTION:
        (q, q_s, _, _), (k, k_s, _, _), (v, v_s, _, _) = qdq["q_parts"], qdq["k_parts"], qdq["v_parts"]
        attrs = site.attrs
        return (
            q,
            q_s,
            k,
            k_s,
            v,
            v_s,
            qdq["mask"],
            bool(attrs["is_causal"]),
            attrs["scale"],
            bool(attrs["enable_gqa"]),
            spec.activation,
            out_dtype,
        )
    w_data, w_scale, w_zero_point, w_global = qdq["weight_parts"]
    if kernel is Kernel.WEIGHT_ONLY_MM:
        return (inputs["x"], w_data, w_scale, w_zero_point, w_global, inputs["bias"], spec.weight, out_dtype)
    if kernel is Kernel.AUTO_MM:
        return (
            inputs["x"],
            w_data,
            w_scale,
            w_zero_point,
            w_global,
            inputs["bias"],
            spec.weight,
            spec.activation,
            spec.weight_only_below_m,
            out_dtype,
        )
    x_data, x_scale, _, x_global = qdq["x_parts"]
    return (
        x_data,
        x_scale,
        x_global,
        w_data,
        w_scale,
        w_global,
        inputs["bias"],
        spec.activation,
        spec.weight,
        out_dtype,
    )


def fuse_quantized_ops(state: PipelineState) -> None:
    graph = state.gm.graph
    counts: dict[str, int] = {}
    for site in state.sites:
        if not site.quantized:
            continue
        old = site.qdq["op"]
        with graph.inserting_before(old):
            fused = graph.call_function(FUSED_OPS[site.kernel.value], _fused_args(site))
        fused.meta.update({k: v for k, v in old.meta.items() if k in ("nn_module_stack", "stack_trace", "val")})
        fused.meta["lowbit_site"] = site.index
        state.replace_node(old, fused)
        site.node = site.qdq["op"] = fused
        counts[site.kernel.value] = counts.get(site.kernel.value, 0) + 1
        torch._dynamo.utils.counters["lowbit"][f"fused_{site.kernel.value}"] += 1
    remove_dead_code(graph)
    log.info("fused ops: %s", counts or "none")
