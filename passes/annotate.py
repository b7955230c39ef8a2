"""Stage 2, annotated: find every matmul site and give it a `QuantSpec` (or a reason it is skipped).

Recognised, on Dynamo's torch-level graph:
  linear     F.linear / nn.Linear (with or without bias), `x @ W.t()`, torch.matmul, mm, addmm,
             linear-shaped einsum, where one operand is a 2-D parameter (possibly transposed);
  attention  F.scaled_dot_product_attention (causal, mask, GQA), and the explicit form as model
             code writes it (Hugging Face's eager attention among others):
             matmul([q * c], k^T or a pre-transposed K) -> [scale] -> [+ mask | masked_fill]
             -> softmax(-1, [dtype]) -> [cast] -> [dropout in eval()] -> matmul(., v),
             with K and V whose heads are repeated for GQA taken unrepeated (enable_gqa);
  matmul     every other matmul/bmm of two activations, and linear/addmm forms not recognised above
             (found and reported; not quantized yet). Where a softmax between matmuls is not
             matched as attention, their report rows say which part of the pattern failed.
The graph itself is not changed here; the sites go to `state.sites`.
"""

from __future__ import annotations

import logging
import math
import operator
import re
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch.fx.experimental.symbolic_shapes import statically_known_true

from lowbit_compile.formats import Format
from lowbit_compile.policy import Kernel, OpKind, QuantSpec
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
DROPOUT_FUNCTIONS = {F.dropout, torch.dropout}
MASKED_FILL_FUNCTIONS = {torch.masked_fill}
# A masked_fill value at or below this (or -inf) is a mask: exp() of it is 0 in every float dtype, so
# the masked scores take no part, as with SDPA's -inf (a row masked entirely is the one difference).
MASK_FILL_LIMIT = -1e4
_NEAR_NODES = 4  # how far from a softmax a matmul makes a failed attention match worth reporting


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
    """The calling module's path (nn_module_stack), else the weight's owner module, else the node name.

    A raw parameter of the calling module (not a `weight` of its own submodule, as nn.Linear's) names
    the site by its path (`wq`, `attn.wk`): the module path alone would give every such site of one
    module the same name (the root module's: "")."""
    stack = node.meta.get("nn_module_stack")
    path = module_path(list(stack.values())[-1][0]) if stack else None
    if weight_path is not None:
        owner, _, name = weight_path.rpartition(".")
        if name != "weight" and owner == (path or ""):
            return weight_path
        if not path:
            return owner  # "" for the root module's own `weight` (the model is one linear)
    return path or node.name


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


def _is_number(value: Any) -> bool:
    """A Python number, or a scalar computed in the graph (a module's float attribute is a SymFloat
    `.item()` node under dynamic=True)."""
    if isinstance(value, torch.fx.Node):
        value = value_of(value)
        return isinstance(value, (torch.SymFloat, torch.SymInt)) or _is_number(value)
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _scaling(node: torch.fx.Node) -> tuple[torch.fx.Node, Any, bool] | None:
    """(tensor, factor, divide) of `tensor * factor`, `factor * tensor` or `tensor / factor`, where
    the factor is a number (`_is_number`); None for anything else (`factor / tensor` included)."""
    if not _is_call(node, set(SCALE_FUNCTIONS), {"mul", "div"}) or len(node.args) != 2 or node.kwargs:
        return None
    left, right = node.args
    divide = node.target in (operator.truediv, torch.div, "div")
    tensor = lambda a: isinstance(a, torch.fx.Node) and isinstance(value_of(a), torch.Tensor)  # noqa: E731
    if tensor(left) and _is_number(right):
        return left, right, divide
    if not divide and _is_number(left) and tensor(right):
        return right, left, False
    return None


def _scale_fields(scale: _Scale) -> tuple[dict[str, Any], dict[str, torch.fx.Node]]:
    """Site attrs and inputs for a scale: `attrs["scale"]` is the constant part (None: SDPA's
    default), and each number computed in the graph is an input `scale_factor<i>`, listed with
    whether it divides in `attrs["scale_factors"]` (the qdq stage multiplies q by them)."""
    names = [f"scale_factor{i}" for i in range(len(scale.computed))]
    attrs = {"scale": scale.constant, "scale_factors": [(n, d) for n, (_, d) in zip(names, scale.computed)]}
    return attrs, {n: node for n, (node, _) in zip(names, scale.computed)}


@dataclass
class _Scale:
    """A product of scalings: a Python constant times numbers computed in the graph (nodes), each
    multiplied or divided by."""

    constant: float = 1.0
    computed: list[tuple[torch.fx.Node, bool]] = field(default_factory=list)

    def apply(self, factor: Any, divide: bool) -> None:
        if isinstance(factor, torch.fx.Node):
            self.computed.append((factor, divide))
        elif divide and factor == 0:
            raise _NotAttention("the scores are divided by 0")
        else:
            self.constant = self.constant / factor if divide else self.constant * factor


def _same_dim(a: Any, b: Any) -> bool:
    """Equal sizes, decided without adding a guard on a symbolic size (such as M)."""
    return a is b or statically_known_true(a == b)


def _same_shape(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    return len(a) == len(b) and all(_same_dim(x, y) for x, y in zip(a, b))


def _fits_into(mask_shape: tuple[Any, ...], out_shape: tuple[Any, ...]) -> bool:
    """Whether a mask of `mask_shape` broadcasts to `out_shape` without enlarging it."""
    if len(mask_shape) > len(out_shape):
        return False
    return all(_same_dim(m, 1) or _same_dim(m, d) for m, d in zip(reversed(mask_shape), reversed(out_shape)))


def _scores_and_mask(add: torch.fx.Node) -> tuple[torch.fx.Node, torch.fx.Node]:
    """(scores, mask) of `scores + mask` or `mask + scores`, if SDPA's attn_mask means the same:
    a floating mask (a bool mask added as 0/1 is not SDPA's keep/-inf) that broadcasts to the scores
    without enlarging them. Otherwise `_NotAttention` says why not."""
    where = "between the QK^T matmul and softmax:"
    if add.kwargs or len(add.args) != 2:
        raise _NotAttention(f"{where} `{_op_name(add)}` with {add.kwargs} is not a mask")
    first, second = add.args
    if not (isinstance(first, torch.fx.Node) and isinstance(second, torch.fx.Node)):
        raise _NotAttention(f"{where} `{_op_name(add)}` adds a number, not a mask")
    out_shape = shape_of(add)
    scores, mask = (first, second) if _same_shape(shape_of(first), out_shape) else (second, first)
    mask_value = value_of(mask)
    if not _same_shape(shape_of(scores), out_shape) or not isinstance(mask_value, torch.Tensor):
        raise _NotAttention(f"{where} `{_op_name(add)}`: neither operand has the scores' shape {_shape(out_shape)}")
    if not mask_value.dtype.is_floating_point:
        raise _NotAttention(f"{where} the mask added is {mask_value.dtype} (as 0/1, not SDPA's keep / -inf mask)")
    if not _fits_into(tuple(mask_value.shape), out_shape):
        raise _NotAttention(f"{where} the mask {_shape(mask_value.shape)} would enlarge the scores {_shape(out_shape)}")
    return scores, mask


class _NotAttention(Exception):
    """Raised by the explicit-attention matcher with the part of the pattern that failed."""


@dataclass
class _AttentionMatch:
    """The explicit-attention matcher's answer for one softmax: the site fields, or why not. `matmuls`
    are the matmuls next to the softmax, which carry the failure into their own report rows."""

    fields: dict[str, Any] | None
    failure: str | None
    matmuls: tuple[torch.fx.Node, ...]


def _op_name(node: torch.fx.Node) -> str:
    if node.op == "call_method":
        return str(node.target)
    return str(getattr(node.target, "__name__", node.target))


def _shape(shape: Any) -> str:
    return "(" + ",".join(str(d) for d in shape) + ")"


def _is_matmul(node: Any) -> bool:
    return _is_call(node, MATMUL_FUNCTIONS, MATMUL_METHODS)


def _unscaled(node: Any, scale: _Scale) -> Any:
    """Strip scalings (`x * c`, `x / c`; chains too) whose only user is the next step into `scale`."""
    while isinstance(node, torch.fx.Node) and _single_user(node) is not None:
        scaling = _scaling(node)
        if scaling is None:
            break
        node, factor, divide = scaling
        scale.apply(factor, divide)
    return node


def _dropout_problem(node: torch.fx.Node) -> str | None:
    """None if this dropout is the identity (eval mode or p=0), else why it is not."""
    if node.target is torch.dropout:
        p, training, inplace = _arg(node, 1, "p"), _arg(node, 2, "train"), False
    else:
        p, training, inplace = _arg(node, 1, "p", 0.5), _arg(node, 2, "training", True), _arg(node, 3, "inplace", False)
    if inplace is not False:
        return "dropout is in place"
    if training is False or (isinstance(p, (int, float)) and p == 0):
        return None
    return f"dropout with p={p} in training mode (compile the model in eval())"


def _fill_mask(node: torch.fx.Node, scores: torch.fx.Node, scale_after: _Scale) -> tuple[torch.fx.Node, float]:
    """(bool mask, value added to the scaled scores) of `scores.masked_fill(mask, value)`, which
    SDPA computes as the additive mask where(mask, value * scale_after, 0): the same wherever the
    value is a mask value (-inf, or so negative that exp() of it is 0)."""
    mask, value = _arg(node, 1, "mask"), _arg(node, 2, "value")
    mask_value = value_of(mask)
    if not isinstance(mask_value, torch.Tensor) or mask_value.dtype != torch.bool:
        raise _NotAttention(f"`{_op_name(node)}` has no bool mask")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _NotAttention(f"`{_op_name(node)}` fills with a tensor or a computed value, not a number")
    if scale_after.computed:
        raise _NotAttention(f"`{_op_name(node)}` is followed by a scaling by a value computed in the graph")
    fill = value * scale_after.constant
    if not fill <= MASK_FILL_LIMIT:  # NaN and +inf too
        raise _NotAttention(
            f"`{_op_name(node)}` fills with {value!r} (scaled by {scale_after.constant:g} after it): not a mask "
            f"value (-inf, or at most {MASK_FILL_LIMIT:g})"
        )
    if not _fits_into(tuple(mask_value.shape), shape_of(scores)):
        raise _NotAttention(
            f"the masked_fill mask {_shape(mask_value.shape)} would enlarge the scores {_shape(shape_of(scores))}"
        )
    return mask, float(fill)


def _inplace_fill(node: torch.fx.Node, next_step: torch.fx.Node) -> torch.fx.Node | None:
    """The `node.masked_fill_(mask, value)` applied to `node` before `next_step` reads it, if `node`
    has exactly that extra user (Dynamo keeps reading `node` after an in-place op)."""
    others = [user for user in node.users if user is not next_step]
    if len(others) != 1:
        return None
    fill = others[0]
    is_fill = fill.op == "call_method" and fill.target == "masked_fill_" and fill.args[0] is node
    return fill if is_fill and not fill.users and fill < next_step else None


def _near_matmul(softmax: torch.fx.Node, backward: bool) -> torch.fx.Node | None:
    """A matmul within a few nodes of the softmax: producing scores of its input's shape (backward),
    or reading its output (forward). Only decides whether a failed match is worth reporting."""
    frontier, seen = [softmax], set()
    scores_shape = shape_of(_arg(softmax, 0, "input"))
    for _ in range(_NEAR_NODES):
        following = []
        for node in frontier:
            neighbours = [a for a in node.all_input_nodes] if backward else list(node.users)
            for neighbour in neighbours:
                if neighbour in seen:
                    continue
                seen.add(neighbour)
                if _is_matmul(neighbour) and (not backward or _same_shape(shape_of(neighbour), scores_shape)):
                    return neighbour
                following.append(neighbour)
        frontier = following
    return None


def _repeated_heads(node: Any) -> torch.fx.Node | None:
    """`kv` if `node` is kv (B, Hkv, S, D) with every head repeated n times in place, as SDPA's
    enable_gqa repeats it: Hugging Face's repeat_kv (kv[:, :, None].expand(B, Hkv, n, S, D)
    .reshape(B, Hkv * n, S, D)) or kv.repeat_interleave(n, dim=1)."""
    if not isinstance(node, torch.fx.Node) or len(shape_of(node)) != 4:
        return None
    out = shape_of(node)
    if _is_call(node, {torch.repeat_interleave}, {"repeat_interleave"}):
        source, repeats, dim = _arg(node, 0, "input"), _arg(node, 1, "repeats"), _arg(node, 2, "dim")
        if isinstance(repeats, int) and dim in (1, -3) and isinstance(source, torch.fx.Node):
            kv = shape_of(source)
            if len(kv) == 4 and _same_shape((kv[0], kv[1] * repeats, *kv[2:]), out):
                return source
        return None
    if not _is_call(node, {torch.reshape}, {"reshape", "view"}):
        return None
    expand = node.args[0]
    if not (isinstance(expand, torch.fx.Node) and _is_call(expand, set(), {"expand"})):
        return None
    unsqueezed = expand.args[0]
    if not isinstance(unsqueezed, torch.fx.Node) or not (
        _is_call(unsqueezed, {torch.unsqueeze}, {"unsqueeze"}) and _arg(unsqueezed, 1, "dim") in (2, -3)
        or _is_call(unsqueezed, {operator.getitem}) and _is_head_unsqueeze(unsqueezed.args[1])
    ):
        return None
    source = unsqueezed.args[0]
    kv, expanded = shape_of(source), shape_of(expand)
    if len(kv) != 4 or len(expanded) != 5 or not _same_shape(shape_of(unsqueezed), (kv[0], kv[1], 1, *kv[2:])):
        return None
    n = expanded[2]
    if not _same_shape(expanded, (kv[0], kv[1], n, *kv[2:])) or not _same_shape(out, (kv[0], kv[1] * n, *kv[2:])):
        return None
    return source


def _is_head_unsqueeze(index: Any) -> bool:
    """x[:, :, None] (or x[:, :, None, :, :]): a new dim before the sequence dim of (B, H, S, D)."""
    full = slice(None, None, None)
    if not isinstance(index, tuple) or len(index) > 5:
        return False
    return index[:3] == (full, full, None) and all(i == full for i in index[3:])


def _explicit_attention(softmax: torch.fx.Node) -> _AttentionMatch | None:
    """matmul(q, k^T) -> [scale] -> [+ mask | masked_fill] -> softmax(-1) -> [cast, eval dropout]
    -> matmul(., v), or why a softmax between matmuls is not that; None when no matmul is near it."""
    before, after = _near_matmul(softmax, backward=True), _near_matmul(softmax, backward=False)
    near = tuple(m for m in (before, after) if m is not None)
    if not near:
        return None
    if before is None:
        return _AttentionMatch(None, "the scores do not come from a matmul", near)
    try:
        return _AttentionMatch(_attention_fields(softmax), None, near)
    except _NotAttention as failure:
        return _AttentionMatch(None, str(failure), near)


def _attention_fields(softmax: torch.fx.Node) -> dict[str, Any]:
    """The site fields of an explicit attention ending in `softmax`; raises `_NotAttention` naming
    the part that does not fit. Refused where SDPA would compute something else: a mask added
    before the scaling (SDPA adds it after), a non-floating added mask, a mask that enlarges the
    scores, `add(..., alpha=)`, anything else between the matmuls, or the probabilities as the
    right operand."""
    dim = _arg(softmax, 1, "dim")
    rank = len(shape_of(softmax))
    if not isinstance(dim, int) or rank == 0 or dim % rank != rank - 1:
        raise _NotAttention(f"softmax is over dim {dim}, not the last dim")

    # Forward: softmax -> [casts, dropout that is the identity] -> PV matmul.
    probabilities = softmax
    while True:
        users = list(probabilities.users)
        if len(users) != 1:
            raise _NotAttention(
                f"the probabilities (`{probabilities.name}`) have {len(users)} users: they are used elsewhere "
                "too (returned as attention weights?)"
            )
        after = users[0]
        if _is_call(after, set(), CAST_METHODS) and after.args[0] is probabilities:
            probabilities = after
        elif _is_call(after, DROPOUT_FUNCTIONS):
            problem = _dropout_problem(after)
            if problem is not None:
                raise _NotAttention(f"between softmax and the PV matmul: {problem}")
            probabilities = after
        else:
            break
    if not _is_matmul(after):
        raise _NotAttention(
            f"between softmax and the PV matmul: `{_op_name(after)}` (only casts and dropout in eval() may be there)"
        )
    pv = after
    left, v = _matmul_operands(pv)
    if left is not probabilities:
        raise _NotAttention(
            "the probabilities are the right operand of the second matmul (x @ softmax(...)): not attention over values"
        )
    if not isinstance(v, torch.fx.Node):
        raise _NotAttention("the values are not a tensor")

    # Backward: softmax's input -> [casts, scalings, one mask] -> QK^T matmul. `scale` is the product
    # of the scalings passed so far, i.e. those applied after the current node.
    scale, mask, fill, scaled, erase = _Scale(), None, None, False, []
    node, next_step = _arg(softmax, 0, "input"), softmax
    while isinstance(node, torch.fx.Node):
        inplace = _inplace_fill(node, next_step)
        if inplace is not None:
            if mask is not None:
                raise _NotAttention("between the QK^T matmul and softmax: more than one mask")
            mask, fill = _fill_mask(inplace, node, scale)
            erase.append(inplace)
        elif _single_user(node) is None:
            raise _NotAttention(f"between the QK^T matmul and softmax: `{node.name}` is used elsewhere too")
        if _is_matmul(node):
            break
        scaling = _scaling(node)
        next_step = node
        if _is_call(node, set(), CAST_METHODS):
            node = node.args[0]
        elif scaling is not None:
            node, factor, divide = scaling
            scale.apply(factor, divide)
            scaled = True
        elif _is_call(node, ADD_FUNCTIONS, {"add"}):
            if mask is not None:
                raise _NotAttention("between the QK^T matmul and softmax: more than one mask")
            node, mask = _scores_and_mask(node)
            if scaled:  # walking backwards, the mask must come before any scaling: softmax(s * qk + mask)
                raise _NotAttention("the mask is added before the scaling (SDPA adds it after)")
        elif _is_call(node, MASKED_FILL_FUNCTIONS, {"masked_fill"}):
            if mask is not None:
                raise _NotAttention("between the QK^T matmul and softmax: more than one mask")
            mask, fill = _fill_mask(node, node.args[0], scale)
            node = node.args[0]
        elif _is_call(node, set(SCALE_FUNCTIONS), {"mul", "div"}):
            raise _NotAttention(
                f"between the QK^T matmul and softmax: `{_op_name(node)}` is not a scaling by a number (a tensor "
                "factor, or a number divided by the scores)"
            )
        else:
            raise _NotAttention(
                f"between the QK^T matmul and softmax: `{_op_name(node)}` (only scaling by a number, one mask "
                "(+ or masked_fill) and casts may be there)"
            )
    if not _is_matmul(node):
        raise _NotAttention("the scores do not come from a matmul")
    qk = node
    q, k_transposed = _matmul_operands(qk)
    if not (isinstance(q, torch.fx.Node) and isinstance(k_transposed, torch.fx.Node)):
        raise _NotAttention("the QK^T matmul has an operand that is not a tensor")
    if len(shape_of(q)) < 2 or len(shape_of(k_transposed)) < 2:
        raise _NotAttention("the QK^T matmul has a 1-D operand")
    # Scalings of q or k before the matmul (q * d**-0.5) join the scale, when the matmul is their
    # only user: quantizing q and k per token does not depend on them.
    q = _unscaled(q, scale)
    k_transposed = _unscaled(k_transposed, scale)
    k = _transposed_input(k_transposed)
    pre_transposed = k is None  # q @ kt with kt (..., D, S) as it is: SDPA's k is kt^T
    k = k_transposed if pre_transposed else _unscaled(k, scale)
    # K and V with their heads repeated for grouped-query attention: SDPA's enable_gqa does the same
    # on the unrepeated ones (quantized once per KV head, and a kernel need not read the copies).
    gqa = False
    k_source = None if pre_transposed else _repeated_heads(k)
    v_source = _repeated_heads(v)
    if (
        k_source is not None
        and v_source is not None
        and len(shape_of(q)) == 4
        and _same_dim(shape_of(q)[1], shape_of(k)[1])
        and _same_dim(shape_of(k)[1], shape_of(v)[1])
        and _same_shape(shape_of(k_source)[:-1], shape_of(v_source)[:-1])
    ):
        k, v, gqa = k_source, v_source, True
    # The additive mask of a masked_fill: in the query's dtype, as SDPA takes it, unless the fill
    # value does not fit there (fp32 finfo.min with bf16 q and fp32 scores); any value below the
    # dtype's range masks as well as its min does.
    mask_dtype = _dtype(q) if _dtype(q) in (torch.float16, torch.bfloat16, torch.float32) else torch.float32
    if fill is not None and math.isfinite(fill) and fill < torch.finfo(mask_dtype).min:
        mask_dtype = torch.float32
        fill = max(fill, torch.finfo(torch.float32).min)
    return {
        "q": q,
        "k": k,
        "v": v,
        "mask": mask,
        "scale": scale,
        "mask_fill": fill,
        "mask_dtype": mask_dtype,
        "k_transposed": pre_transposed,
        "enable_gqa": gqa,
        "inplace_mask": erase,
        "qk": qk,
        "pv": pv,
    }


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
    not_attention: dict[torch.fx.Node, str] = {}  # matmuls of a failed explicit-attention match: why
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
            scale = _arg(node, 6, "scale", None)
            scale_attrs, scale_inputs = {"scale": scale}, {}
            if isinstance(scale, torch.fx.Node):  # a SymFloat (a module's float under dynamic=True)
                scale_attrs, scale_inputs = _scale_fields(_Scale(1.0, [(scale, False)]))
            site = Site(
                index=len(found),
                kind=OpKind.ATTENTION,
                fqn=_site_fqn(node, None),
                source_op="sdpa",
                node=node,
                inputs={"q": q, "k": k, "v": v, "mask": _arg(node, 3, "attn_mask"), **scale_inputs},
                shapes={"q": shape_of(q), "k": shape_of(k), "v": shape_of(v), "out": shape_of(node)},
                attrs={
                    "dropout_p": _arg(node, 4, "dropout_p", 0.0),
                    "is_causal": _arg(node, 5, "is_causal", False),
                    "enable_gqa": _arg(node, 7, "enable_gqa", False),
                    **scale_attrs,
                },
                k=shape_of(q)[-1] if shape_of(q) else None,
            )
            found.append(site)
            continue
        if _is_call(node, SOFTMAX_FUNCTIONS, {"softmax"}):
            match = _explicit_attention(node)
            if match is None:
                continue
            pattern = match.fields
            # A q or k that is a parameter makes the first matmul a linear site already: keep that.
            if pattern is not None and any(s.node is pattern["qk"] for s in found):
                pattern, match.failure = None, "the QK^T matmul is a linear site (q or k is a parameter)"
            if pattern is None:
                for matmul in match.matmuls:
                    not_attention.setdefault(matmul, match.failure)
                continue
            q, k, v = pattern["q"], pattern["k"], pattern["v"]
            k_shape = shape_of(k)
            if pattern["k_transposed"]:
                k_shape = (*k_shape[:-2], k_shape[-1], k_shape[-2])
            claimed.update((pattern["qk"], pattern["pv"]))
            scale_attrs, scale_inputs = _scale_fields(pattern["scale"])
            site = Site(
                index=len(found),
                kind=OpKind.ATTENTION,
                fqn=_site_fqn(pattern["pv"], None),
                source_op="matmul-softmax-matmul",
                node=pattern["pv"],
                inputs={"q": q, "k": k, "v": v, "mask": pattern["mask"], **scale_inputs},
                shapes={"q": shape_of(q), "k": k_shape, "v": shape_of(v), "out": shape_of(pattern["pv"])},
                attrs={
                    "dropout_p": 0.0,
                    "is_causal": False,
                    **scale_attrs,
                    "enable_gqa": pattern["enable_gqa"],
                    "k_transposed": pattern["k_transposed"],
                    "mask_fill": pattern["mask_fill"],
                    "mask_dtype": pattern["mask_dtype"],
                    "inplace_mask": pattern["inplace_mask"],
                },
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
                attrs={"not_attention": not_attention[node]} if node in not_attention else {},
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
    else:
        site.skip_reason = spec_problem(site, site.spec)
    if site.attrs.get("not_attention"):
        site.skip_reason += f"; not matched as attention: {site.attrs['not_attention']}"
    if site.skip_reason is not None:
        log.debug("site %s (%s) skipped: %s", site.fqn, site.kind.value, site.skip_reason)


def spec_problem(site: Site, spec: QuantSpec) -> str | None:
    """Why `spec` cannot quantize `site` (shapes, dtypes, the site's kind), or None if it can. Used
    for the policy's choice and for the accuracy gate's fallbacks."""
    if site.kind is OpKind.MATMUL:
        return "activation x activation matmul outside attention: no quantized kernel for it yet"
    if site.kind is OpKind.LINEAR:
        if spec.activation is not None and spec.kernel(OpKind.ATTENTION) is Kernel.BLOCK_ATTENTION:
            return f"attention format {spec.activation} quantizes attention sites only, not a linear site"
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
    q_fmt, k_fmt, v_fmt = spec.attention_format.formats
    return _check_formats(site.shapes, dtypes, {"q": q_fmt, "k": k_fmt, "v": v_fmt})
