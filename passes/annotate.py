"""Stage 2, annotated: find every matmul site and give it a `QuantSpec` (or a reason it is skipped).

Recognised, on Dynamo's torch-level graph:
  linear     F.linear / nn.Linear (with or without bias), `x @ W.t()`, torch.matmul, mm, addmm,
             linear-shaped einsum, where one operand is a 2-D parameter (possibly transposed);
  attention  F.scaled_dot_product_attention (causal, mask, GQA), and the explicit form
             matmul(q, k^T) -> [scale] -> [+ mask] -> softmax(-1) -> matmul(., v);
  matmul     every other matmul/bmm of two activations, and linear/addmm forms not recognised above
             (found and reported; not quantized yet).
The graph itself is not changed here; the sites go to `state.sites`.
"""

from __future__ import annotations

import logging
import operator
import re
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch.fx.experimental.symbolic_shapes import statically_known_true

from lowbit_compile.formats import Format
from lowbit_compile.policy import OpKind, QuantSpec
from lowbit_compile.reference import check_quantizable
from lowbit_compile.passes.capture import module_path
from lowbit_compile.passes.state import PipelineState, Site, mutates

log = logging.getLogger(__name__)  # lowbit_compile.passes.*: under TORCH_LOGS="+lowbit_compile"

LINEAR_FUNCTIONS = {torch._C._nn.linear, F.linear}
MATMUL_FUNCTIONS = {operator.matmul, torch.matmul, torch.mm, torch.bmm}
MATMUL_METHODS = {"matmul", "mm", "bmm", "__matmul__"}
ADDMM_FUNCTIONS = {torch.addmm}
EINSUM_FUNCTIONS = {torch.einsum, torch.functional.einsum}
SDPA_FUNCTIONS = {F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention}
SOFTMAX_FUNCTIONS = {torch.softmax, F.softmax, torch.nn.functional.softmax}
CAST_METHODS = {"to", "float", "type_as", "half", "bfloat16", "type"}
SCALE_FUNCTIONS = {operator.mul: False, torch.mul: False, operator.truediv: True, torch.div: True}
ADD_FUNCTIONS = {operator.add, torch.add}


def value_of(node: Any) -> Any:
    return node.meta.get("val", node.meta.get("example_value")) if isinstance(node, torch.fx.Node) else node


def shape_of(node: Any) -> tuple[Any, ...]:
    value = value_of(node)
    return tuple(value.shape) if isinstance(value, torch.Tensor) else ()


def _arg(node: torch.fx.Node, index: int, name: str, default: Any = None) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _matmul_operands(node: torch.fx.Node) -> tuple[Any, Any]:
    """(left, right) of matmul/mm/bmm/@ in function or method form, positional or keyword."""
    return _arg(node, 0, "input"), _arg(node, 1, "other", node.kwargs.get("mat2"))


def _is_call(node: Any, functions: set, methods: set[str] = frozenset()) -> bool:
    if not isinstance(node, torch.fx.Node):
        return False
    if node.op == "call_function":
        return node.target in functions
    return node.op == "call_method" and node.target in methods


# Ops that reverse all dims (`.T`; torch 2.14 traces it as aten.numpy_T): a last-two swap only at rank 2.
_REVERSE_ALL = {torch.ops.aten.numpy_T, torch.ops.aten.numpy_T.default}
_SWAP_LAST_TWO = {torch.t, torch.ops.aten.t, torch.ops.aten.t.default, torch.ops.aten.mT, torch.ops.aten.mT.default}


def _transposed_input(node: torch.fx.Node) -> torch.fx.Node | None:
    """If `node` swaps the last two dims of its input (t, .T, .mT, transpose(-2,-1), permute), the input."""
    source = node.args[0] if node.args else None
    rank = len(shape_of(source))
    if rank < 2:
        return None
    if node.op == "call_method" and node.target == "t" or _is_call(node, _SWAP_LAST_TWO):
        return source
    if _is_call(node, {getattr}) and (node.args[1] == "mT" or node.args[1] == "T" and rank == 2):
        return source
    if _is_call(node, _REVERSE_ALL) and rank == 2:
        return source
    is_transpose = node.op == "call_method" and node.target == "transpose" or _is_call(node, {torch.transpose})
    if is_transpose and len(node.args) == 3:
        dims = {d % rank for d in node.args[1:] if isinstance(d, int)}
        return source if dims == {rank - 2, rank - 1} else None
    if node.op == "call_method" and node.target == "permute":
        dims = node.args[1:] if len(node.args) > 2 else node.args[1]
        expected = list(range(rank - 2)) + [rank - 1, rank - 2]
        return source if [d % rank for d in dims] == expected else None
    return None


def _trace_parameter(node: Any, state: PipelineState) -> tuple[torch.fx.Node, int] | None:
    """Follow transposes from a matmul operand back to a 2-D parameter: (placeholder, #transposes)."""
    flips = 0
    while isinstance(node, torch.fx.Node):
        if node.op == "placeholder":
            param = state.parameters.get(node.name)
            return (node, flips) if param is not None and param.tensor.dim() == 2 else None
        source = _transposed_input(node)
        if source is None:
            return None
        node, flips = source, flips + 1
    return None


def _site_fqn(node: torch.fx.Node, weight_path: str | None) -> str:
    """The calling module's path (nn_module_stack), else the weight's owner module, else the node name."""
    stack = node.meta.get("nn_module_stack")
    if stack:
        path = module_path(list(stack.values())[-1][0])
        if path:
            return path
    if weight_path is not None:
        return weight_path.rpartition(".")[0]  # "" for a parameter of the root module, as named_modules()
    return node.name


def _linear_site(node: torch.fx.Node, state: PipelineState) -> dict[str, Any] | None:
    """Recognise activation x parameter matmuls; returns the site fields or None."""
    bias = None
    if _is_call(node, LINEAR_FUNCTIONS):
        x, weight_operand, bias = _arg(node, 0, "input"), _arg(node, 1, "weight"), _arg(node, 2, "bias")
        found, nk_flips = _trace_parameter(weight_operand, state), 0
        source_op = "linear"
    elif _is_call(node, MATMUL_FUNCTIONS - {torch.bmm}, MATMUL_METHODS - {"bmm"}):
        x, weight_operand = _matmul_operands(node)
        found, nk_flips = _trace_parameter(weight_operand, state), 1
        source_op = "mm" if node.target in (torch.mm, "mm") else "matmul"
    elif _is_call(node, ADDMM_FUNCTIONS, {"addmm"}):
        if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
            return None
        bias, x, weight_operand = _arg(node, 0, "input"), _arg(node, 1, "mat1"), _arg(node, 2, "mat2")
        found, nk_flips = _trace_parameter(weight_operand, state), 1
        source_op = "addmm"
    elif _is_call(node, EINSUM_FUNCTIONS) and len(node.args) == 3 and isinstance(node.args[0], str):
        equation, x, weight_operand = node.args
        layout = _einsum_weight_layout(equation)
        if layout is None:
            return None
        found, nk_flips = _trace_parameter(weight_operand, state), 0 if layout == "nk" else 1
        source_op = "einsum"
    else:
        return None
    if found is None:
        return None
    placeholder, flips = found
    layout = "nk" if (flips - nk_flips) % 2 == 0 else "kn"
    return {"x": x, "weight": placeholder, "bias": bias, "layout": layout, "source_op": source_op}


def _einsum_weight_layout(equation: str) -> str | None:
    """'bsk,nk->bsn' -> 'nk'; 'bsk,kn->bsn' -> 'kn'; anything not linear-shaped -> None."""
    match = re.fullmatch(r"\s*([a-z.]+)\s*,\s*([a-z]{2})\s*->\s*([a-z.]+)\s*", equation)
    if match is None:
        return None
    lhs, rhs, out = match.groups()
    k = lhs[-1]
    if k not in rhs or rhs.count(k) != 1 or len(set(rhs)) != 2:
        return None
    n = rhs.replace(k, "")
    # K must appear only as x's last dim: "ii,ij->ij" takes a diagonal, it is not x @ W.
    if n in lhs or k in lhs[:-1] or out != lhs[:-1] + n:
        return None
    return "nk" if rhs == n + k else "kn"


def _single_user(node: torch.fx.Node) -> torch.fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _scalar_operand(node: torch.fx.Node) -> tuple[Any, float] | None:
    """(tensor operand, python scalar) of a binary op with one number operand, either side."""
    if len(node.args) != 2 or node.kwargs:
        return None
    left, right = node.args
    if isinstance(right, (int, float)) and isinstance(left, torch.fx.Node):
        return left, right
    if isinstance(left, (int, float)) and isinstance(right, torch.fx.Node):
        return right, left
    return None


def _same_dim(a: Any, b: Any) -> bool:
    """Equal sizes, decided without adding a guard on a symbolic size (such as M)."""
    return a is b or statically_known_true(a == b)


def _same_shape(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    return len(a) == len(b) and all(_same_dim(x, y) for x, y in zip(a, b))


def _scores_and_mask(add: torch.fx.Node) -> tuple[torch.fx.Node, torch.fx.Node] | None:
    """(scores, mask) of `scores + mask` or `mask + scores`, if SDPA's attn_mask means the same:
    a floating mask (a bool mask added as 0/1 is not SDPA's keep/-inf) that broadcasts to the scores
    without enlarging them."""
    first, second = add.args
    if not (isinstance(first, torch.fx.Node) and isinstance(second, torch.fx.Node)):
        return None
    out_shape = shape_of(add)
    scores, mask = (first, second) if _same_shape(shape_of(first), out_shape) else (second, first)
    mask_value = value_of(mask)
    if not _same_shape(shape_of(scores), out_shape) or not isinstance(mask_value, torch.Tensor):
        return None
    mask_shape = tuple(mask_value.shape)
    if not mask_value.dtype.is_floating_point or len(mask_shape) > len(out_shape):
        return None
    aligned = zip(reversed(mask_shape), reversed(out_shape))
    if not all(_same_dim(m, 1) or _same_dim(m, d) for m, d in aligned):
        return None
    return scores, mask


def _explicit_attention(softmax: torch.fx.Node) -> dict[str, Any] | None:
    """matmul(q, k^T) -> [* or / scalar] -> [+ mask] -> softmax(-1) -> [cast] -> matmul(., v).

    Refused (left as plain matmuls) where SDPA would compute something else: a mask added before
    the scaling (SDPA adds it after), a non-floating mask, a mask that enlarges the scores,
    `add(..., alpha=)`, or the probabilities as the right operand."""
    dim = _arg(softmax, 1, "dim")
    rank = len(shape_of(softmax))
    if not isinstance(dim, int) or rank == 0 or dim % rank != rank - 1:
        return None
    probabilities, after = softmax, _single_user(softmax)
    while after is not None and _is_call(after, set(), CAST_METHODS):
        probabilities, after = after, _single_user(after)
    if after is None or not _is_call(after, MATMUL_FUNCTIONS, MATMUL_METHODS):
        return None
    pv = after
    left, v = _matmul_operands(pv)
    if left is not probabilities or not isinstance(v, torch.fx.Node):
        return None
    scale, mask, scaled, node = 1.0, None, False, _arg(softmax, 0, "input")
    while isinstance(node, torch.fx.Node) and not _is_call(node, MATMUL_FUNCTIONS, MATMUL_METHODS):
        if _single_user(node) is None:
            return None
        scalar = _scalar_operand(node) if _is_call(node, set(SCALE_FUNCTIONS), {"mul", "div"}) else None
        if _is_call(node, set(), CAST_METHODS):
            node = node.args[0]
        elif scalar is not None:
            divide = node.target in (operator.truediv, torch.div, "div")
            if divide and scalar[0] is not node.args[0]:
                return None  # scalar / scores is not a scaling
            scale = scale / scalar[1] if divide else scale * scalar[1]
            node, scaled = scalar[0], True
        elif (
            _is_call(node, ADD_FUNCTIONS, {"add"})
            and mask is None
            and not scaled
            and not node.kwargs
            and len(node.args) == 2
            and (split := _scores_and_mask(node)) is not None
        ):
            # Walking backwards, the mask must come before any scaling: softmax(s * qk + mask).
            node, mask = split
        else:
            return None
    if not isinstance(node, torch.fx.Node) or _single_user(node) is None:
        return None
    qk = node
    q, k_transposed = _matmul_operands(qk)
    k = _transposed_input(k_transposed) if isinstance(k_transposed, torch.fx.Node) else None
    if k is None:
        return None
    return {"q": q, "k": k, "v": v, "mask": mask, "scale": scale, "qk": qk, "pv": pv}


def _check_formats(
    shapes: dict[str, tuple], dtypes: dict[str, torch.dtype], formats: dict[str, Format | None]
) -> str | None:
    for operand, fmt in formats.items():
        if fmt is None:
            continue
        reason = check_quantizable(shapes[operand], dtypes[operand], fmt)
        if reason is not None:
            return f"{operand}: {reason}"
    return None


def _dtype(node: Any) -> torch.dtype | None:
    value = value_of(node)
    return value.dtype if isinstance(value, torch.Tensor) else None


def annotate_sites(state: PipelineState) -> None:
    """Append one `Site` per matmul to `state.sites`, each with its spec or skip reason."""
    claimed: set[torch.fx.Node] = set()
    found: list[Site] = []
    for node in state.gm.graph.nodes:
        if node.op not in ("call_function", "call_method") or node in claimed:
            continue
        linear = _linear_site(node, state)
        if linear is not None:
            weight_path = state.parameters[linear["weight"].name].path
            x_shape, w_shape = shape_of(linear["x"]), shape_of(linear["weight"])
            if linear["layout"] == "kn":
                w_shape = w_shape[::-1]
            site = Site(
                index=len(found),
                kind=OpKind.LINEAR,
                fqn=_site_fqn(node, weight_path),
                source_op=linear["source_op"],
                node=node,
                inputs={"x": linear["x"], "weight": linear["weight"], "bias": linear["bias"]},
                shapes={"x": x_shape, "weight": w_shape, "out": shape_of(node)},
                weight_layout=linear["layout"],
                n=w_shape[0],
                k=w_shape[1],
                weight_path=weight_path,
            )
            found.append(site)
            continue
        if _is_call(node, SDPA_FUNCTIONS):
            q, k, v = (_arg(node, i, name) for i, name in enumerate(("query", "key", "value")))
            site = Site(
                index=len(found),
                kind=OpKind.ATTENTION,
                fqn=_site_fqn(node, None),
                source_op="sdpa",
                node=node,
                inputs={"q": q, "k": k, "v": v, "mask": _arg(node, 3, "attn_mask")},
                shapes={"q": shape_of(q), "k": shape_of(k), "v": shape_of(v), "out": shape_of(node)},
                attrs={
                    "dropout_p": _arg(node, 4, "dropout_p", 0.0),
                    "is_causal": _arg(node, 5, "is_causal", False),
                    "scale": _arg(node, 6, "scale", None),
                    "enable_gqa": _arg(node, 7, "enable_gqa", False),
                },
                k=shape_of(q)[-1] if shape_of(q) else None,
            )
            found.append(site)
            continue
        if _is_call(node, SOFTMAX_FUNCTIONS, {"softmax"}):
            pattern = _explicit_attention(node)
            # A q or k that is a parameter makes the first matmul a linear site already: keep that.
            if pattern is not None and not any(s.node is pattern["qk"] for s in found):
                q, k, v = pattern["q"], pattern["k"], pattern["v"]
                claimed.update((pattern["qk"], pattern["pv"]))
                site = Site(
                    index=len(found),
                    kind=OpKind.ATTENTION,
                    fqn=_site_fqn(pattern["pv"], None),
                    source_op="matmul-softmax-matmul",
                    node=pattern["pv"],
                    inputs={"q": q, "k": k, "v": v, "mask": pattern["mask"]},
                    shapes={"q": shape_of(q), "k": shape_of(k), "v": shape_of(v), "out": shape_of(pattern["pv"])},
                    attrs={"dropout_p": 0.0, "is_causal": False, "scale": pattern["scale"], "enable_gqa": False},
                    k=shape_of(q)[-1] if shape_of(q) else None,
                )
                found.append(site)
            continue
    # Every other matmul (of two activations, or a linear/addmm not of the recognised shape) is
    # reported too, so that nothing left in high precision is missing from the report.
    for node in state.gm.graph.nodes:
        is_matmul = _is_call(
            node, MATMUL_FUNCTIONS | EINSUM_FUNCTIONS | LINEAR_FUNCTIONS | ADDMM_FUNCTIONS, MATMUL_METHODS | {"addmm"}
        )
        if not is_matmul or node in claimed or any(s.node is node for s in found):
            continue
        operands = [a for a in (*node.args, *node.kwargs.values()) if isinstance(a, torch.fx.Node)]
        found.append(
            Site(
                index=len(found),
                kind=OpKind.MATMUL,
                fqn=_site_fqn(node, None),
                source_op=str(getattr(node.target, "__name__", node.target)),
                node=node,
                inputs={f"operand{i}": a for i, a in enumerate(operands)},
                shapes={**{f"operand{i}": shape_of(a) for i, a in enumerate(operands)}, "out": shape_of(node)},
            )
        )
    order = {node: i for i, node in enumerate(state.gm.graph.nodes)}
    found.sort(key=lambda s: order[s.node])
    for index, site in enumerate(found):
        site.index = index
        _decide(site, state)
        site.node.meta["lowbit_site"] = site.index
    state.sites = found
    counts = {kind.value: sum(s.kind is kind for s in found) for kind in OpKind}
    log.info("found %d sites %s; %d quantized", len(found), counts, sum(s.quantized for s in found))


def _decide(site: Site, state: PipelineState) -> None:
    site.spec, site.decided_by = state.policy.decide(site.fqn, site.kind, site.n, site.k)
    if site.spec is None:
        site.skip_reason = f"policy: {state.policy.describe_decision(site.decided_by)} leaves it unquantized"
        return
    site.skip_reason = spec_problem(site, site.spec)
    if site.skip_reason is not None:
        log.debug("site %s (%s) skipped: %s", site.fqn, site.kind.value, site.skip_reason)


def spec_problem(site: Site, spec: QuantSpec) -> str | None:
    """Why `spec` cannot quantize `site` (shapes, dtypes, the site's kind), or None if it can. Used
    for the policy's choice and for the accuracy gate's fallbacks."""
    if site.kind is OpKind.MATMUL:
        return "activation x activation matmul outside attention: no quantized kernel for it yet"
    if site.kind is OpKind.LINEAR:
        dtypes = {"x": _dtype(site.inputs["x"]), "weight": _dtype(site.inputs["weight"])}
        reason = _check_formats(site.shapes, dtypes, {"weight": spec.weight_format, "x": spec.activation_format})
        if reason is None and spec.weight is None:
            reason = f"spec {spec.describe()} has no weight format for a linear site"
        if reason is None and any(mutates(user) for user in site.inputs["weight"].users):
            reason = "weight is updated in place inside the graph: a compile-time quantized copy would be stale"
        return reason
    attrs = site.attrs
    if spec.activation is None:
        return f"spec {spec.describe()} has no activation format for attention"
    if attrs["dropout_p"] not in (0, 0.0):
        return "attention with dropout_p > 0 (training) is not quantized"
    if isinstance(site.inputs["mask"], torch.fx.Node) and shape_of(site.inputs["mask"]) == ():
        return "attention mask is not a tensor"
    dtypes = {name: _dtype(site.inputs[name]) for name in ("q", "k", "v")}
    fmt = spec.activation_format
    return _check_formats(site.shapes, dtypes, {"q": fmt, "k": fmt, "v": fmt})
