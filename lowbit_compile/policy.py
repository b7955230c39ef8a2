"""Policies: which matmul site gets which format, as frozen, validated, JSON-round-trippable data.

A `Policy` is an ordered tuple of `Rule`s plus a default `QuantSpec`. The first rule whose predicates
all match a site decides its spec; `spec=None` in a rule means "leave this site in high precision".
Policies are hashable and part of the compile cache key (see `Policy.cache_key`).
"""

from __future__ import annotations

import dataclasses
import enum
import fnmatch
import hashlib
import json
import math
import re
from dataclasses import dataclass
from typing import Any

from lowbit_compile.formats import (
    BUILTIN_ATTENTION_FORMATS,
    BUILTIN_FORMATS,
    AttentionFormat,
    Format,
    format_record,
    get_attention_format,
    get_format,
    is_attention_format,
    register_attention_format,
    register_format,
)


class OpKind(str, enum.Enum):
    """What kind of matmul a site is."""

    LINEAR = "linear"  # activation x parameter (nn.Linear, F.linear, x @ W.t(), addmm, einsum, ...)
    MATMUL = "matmul"  # activation x activation (bmm, matmul of two computed tensors)
    ATTENTION = "attention"  # SDPA, or matmul -> softmax -> matmul


class Kernel(str, enum.Enum):
    """The fused op a site lowers to; chosen from the spec, never configured separately."""

    WEIGHT_ONLY_MM = "weight_only_mm"
    SCALED_MM = "scaled_mm"
    AUTO_MM = "auto_mm"
    ATTENTION = "attention"  # q, k, v quantized per token by the graph (a plain Format)
    BLOCK_ATTENTION = "block_attention"  # an AttentionFormat: the op quantizes q, k, v itself


def _format_name(fmt: Format | str | None) -> str | None:
    """Specs store formats by name; a `Format` record given directly is registered under its name
    (a ValueError if that name is taken by a different record), so the name always means it."""
    if isinstance(fmt, Format):
        return register_format(fmt).name
    return None if fmt is None else get_format(fmt).name


def _activation_format_name(fmt: AttentionFormat | Format | str | None) -> str | None:
    """As `_format_name`, and an `AttentionFormat` (record or registered name) for attention sites."""
    if isinstance(fmt, AttentionFormat):
        return register_attention_format(fmt).name
    if is_attention_format(fmt):
        return fmt
    return _format_name(fmt)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _finite_float(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number of dB, got {value!r}")
    return float(value)


def _checked_keys(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    """`data` if it names only fields of `cls`, else a ValueError listing the valid keys."""
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ValueError(f"unknown {cls.__name__} keys {unknown}; valid keys are {names}")
    return dict(data)


@dataclass(frozen=True)
class QuantSpec:
    """How one site is quantized.

    weight:      format of the parameter operand (linear sites); None keeps it in high precision.
    activation:  format of the activation operand(s) (quantized dynamically, per call); None = weight-only.
                 Attention sites also take an `AttentionFormat` (`attn_fp8_t128`, `attn_int8_t128`):
                 per-operand formats, K smoothing and 8-bit probabilities, quantized inside the op.
    weight_only_below_m: with both formats set, rows M below this run weight-only (A16) and rows at or
                 above it quantize activations too, decided at run time from one stored weight.
    weight_search: int4 weights (int4_g*, int4_g*_asym) get each group's scale and zero point searched
                 at compile time for the smallest reconstruction error (`lowbit_compile.weight_search`;
                 no calibration data, same layout). False rounds to nearest. Other formats ignore it.
    min_sqnr:    accuracy floor in dB: at compile time the site's output SQNR on the example inputs
                 (the report's SQNR column) is checked, and a site below it takes `fallback` instead.
    fallback:    the spec a site below `min_sqnr` falls back to (it may have its own floor and
                 fallback: a chain, safest last); None leaves such a site unquantized.
    Formats are stored by registry name so the spec stays plain, hashable data.
    """

    weight: str | None = None
    activation: str | None = None
    weight_only_below_m: int | None = None
    weight_search: bool = True
    min_sqnr: float | None = None
    fallback: QuantSpec | None = None

    def __init__(
        self,
        weight: Format | str | None = None,
        activation: Format | str | None = None,
        weight_only_below_m: int | None = None,
        weight_search: bool = True,
        min_sqnr: float | None = None,
        fallback: QuantSpec | dict[str, Any] | None = None,
    ) -> None:
        object.__setattr__(self, "weight", _format_name(weight))
        object.__setattr__(self, "activation", _activation_format_name(activation))
        object.__setattr__(self, "weight_only_below_m", weight_only_below_m)
        object.__setattr__(self, "weight_search", weight_search)
        object.__setattr__(self, "min_sqnr", None if min_sqnr is None else _finite_float(min_sqnr, "min_sqnr"))
        if isinstance(fallback, dict):
            fallback = QuantSpec.from_dict(fallback)
        object.__setattr__(self, "fallback", fallback)
        self.__post_init__()

    def __post_init__(self) -> None:
        if self.weight is None and self.activation is None:
            raise ValueError(
                "QuantSpec needs a weight and/or an activation format; to leave a site unquantized "
                "use Rule(spec=None, ...)"
            )
        if self.weight_only_below_m is not None:
            if self.weight is None or self.activation is None:
                raise ValueError(
                    "weight_only_below_m switches between weight-only and activation quantization: "
                    "it needs both a weight and an activation format"
                )
            if not _is_int(self.weight_only_below_m) or self.weight_only_below_m < 1:
                raise ValueError(f"weight_only_below_m must be a positive int, got {self.weight_only_below_m!r}")
        if not isinstance(self.weight_search, bool):
            raise ValueError(f"weight_search must be a bool, got {self.weight_search!r}")
        if self.fallback is not None:
            if not isinstance(self.fallback, QuantSpec):
                raise ValueError(f"fallback must be a QuantSpec or None, got {type(self.fallback).__name__}")
            if self.min_sqnr is None:
                raise ValueError("a fallback is taken only below min_sqnr: set min_sqnr too")

    def chain(self) -> list[QuantSpec]:
        """This spec and its fallbacks, in the order the accuracy gate tries them."""
        specs, spec = [], self
        while spec is not None:
            specs.append(spec)
            spec = spec.fallback
        return specs

    @property
    def weight_format(self) -> Format | None:
        return None if self.weight is None else get_format(self.weight)

    @property
    def activation_format(self) -> Format | None:
        """The activation's Format; for an attention format, the format of q (see `attention_format`)."""
        if self.activation is None:
            return None
        if is_attention_format(self.activation):
            return get_attention_format(self.activation).formats[0]
        return get_format(self.activation)

    @property
    def attention_format(self) -> AttentionFormat | None:
        """How an attention site's q, k, v are quantized (a plain format: all three, per operand)."""
        return None if self.activation is None else get_attention_format(self.activation)

    def kernel(self, kind: OpKind) -> Kernel:
        if kind is OpKind.ATTENTION:
            return Kernel.BLOCK_ATTENTION if is_attention_format(self.activation) else Kernel.ATTENTION
        if self.weight_only_below_m is not None:
            return Kernel.AUTO_MM
        if self.activation is None:
            return Kernel.WEIGHT_ONLY_MM
        return Kernel.SCALED_MM

    def describe(self) -> str:
        parts = []
        if self.activation:
            parts.append(f"A={self.activation}")
        else:
            parts.append("A=16bit")
        if self.weight:
            parts.append(f"W={self.weight}")
        if self.weight_only_below_m is not None:
            parts.append(f"weight-only below M={self.weight_only_below_m}")
        if not self.weight_search:
            parts.append("no weight search")
        if self.min_sqnr is not None:
            parts.append(f"floor {self.min_sqnr:g} dB")
        return " ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        data = {
            "weight": self.weight,
            "activation": self.activation,
            "weight_only_below_m": self.weight_only_below_m,
        }
        # Written only when off: the default keeps the JSON and cache key of policies saved before
        # the field existed (the compiled code does not depend on it; the folded weights do).
        if not self.weight_search:
            data["weight_search"] = False
        if self.min_sqnr is not None:  # likewise written only when set
            data["min_sqnr"] = self.min_sqnr
            data["fallback"] = None if self.fallback is None else self.fallback.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantSpec:
        return cls(**_checked_keys(cls, data))


@dataclass(frozen=True)
class Rule:
    """One line of a policy: predicates on a site, and the spec for sites that match them all.

    fqn:   module path pattern; a glob (`layers.*.mlp.*`) or, prefixed with `re:`, a regex
           matched with `re.fullmatch`. None matches every site.
    op:    an `OpKind` (or its string value), or None for every kind.
    min_k/max_k/min_n/max_n: inclusive bounds on the site's static reduction size K and output size
           N (shape predicates; the row count M is dynamic and is never a compile-time predicate).
    spec:  the `QuantSpec` for matching sites, or None to leave them unquantized.
    """

    spec: QuantSpec | None
    fqn: str | None = None
    op: OpKind | None = None
    min_k: int | None = None
    max_k: int | None = None
    min_n: int | None = None
    max_n: int | None = None

    def __post_init__(self) -> None:
        if self.spec is not None and not isinstance(self.spec, QuantSpec):
            raise ValueError(f"Rule.spec must be a QuantSpec or None, got {type(self.spec).__name__}")
        if self.op is not None and not isinstance(self.op, OpKind):
            try:
                object.__setattr__(self, "op", OpKind(self.op))
            except ValueError:
                valid = ", ".join(k.value for k in OpKind)
                raise ValueError(f"Rule.op {self.op!r} is not an op kind; use one of: {valid}") from None
        if self.fqn is not None:
            if not isinstance(self.fqn, str) or not self.fqn:
                raise ValueError("Rule.fqn must be a non-empty glob or 're:<regex>' string")
            if self.fqn.startswith("re:"):
                try:
                    re.compile(self.fqn[3:])
                except re.error as error:
                    raise ValueError(f"Rule.fqn regex {self.fqn[3:]!r} does not compile: {error}") from None
        for name in ("min_k", "max_k", "min_n", "max_n"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < 0):
                raise ValueError(f"Rule.{name} must be a non-negative int or None, got {value!r}")
        for low, high in (("min_k", "max_k"), ("min_n", "max_n")):
            lower, upper = getattr(self, low), getattr(self, high)
            if lower is not None and upper is not None and lower > upper:
                raise ValueError(f"Rule.{low}={lower} > {high}={upper}: no site could match")

    def describe(self) -> str:
        """The predicates, e.g. `fqn='layers.*' op='linear' min_k=128`; `*` when it matches everything."""
        preds = [
            f"{f.name}={getattr(self, f.name).value if f.name == 'op' else getattr(self, f.name)!r}"
            for f in dataclasses.fields(self)
            if f.name != "spec" and getattr(self, f.name) is not None
        ]
        return " ".join(preds) or "*"

    def matches(self, fqn: str, kind: OpKind, n: int | None, k: int | None) -> bool:
        if self.op is not None and self.op is not kind:
            return False
        if self.fqn is not None:
            if self.fqn.startswith("re:"):
                if re.fullmatch(self.fqn[3:], fqn) is None:
                    return False
            elif not fnmatch.fnmatchcase(fqn, self.fqn):
                return False
        bounds = ((self.min_k, k, 1), (self.max_k, k, -1), (self.min_n, n, 1), (self.max_n, n, -1))
        for bound, value, sign in bounds:
            if bound is None:
                continue
            if value is None or sign * (value - bound) < 0:
                return False
        return True

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data["spec"] = None if self.spec is None else self.spec.to_dict()
        data["op"] = None if self.op is None else self.op.value
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Rule:
        data = _checked_keys(cls, data)
        if "spec" not in data:
            raise ValueError("a Rule needs a 'spec' key (null leaves matching sites unquantized)")
        spec = data.pop("spec")
        return cls(spec=None if spec is None else QuantSpec.from_dict(spec), **data)


@dataclass(frozen=True)
class Policy:
    """Ordered rules plus a default; the first matching rule wins."""

    rules: tuple[Rule, ...] = ()
    default: QuantSpec | None = None
    name: str = "custom"

    def __post_init__(self) -> None:
        if isinstance(self.rules, Rule) or not hasattr(self.rules, "__iter__"):
            raise ValueError(f"Policy.rules must be a sequence of Rule objects, got {type(self.rules).__name__}")
        if not isinstance(self.rules, tuple):  # a list or generator would make the policy unhashable or empty
            object.__setattr__(self, "rules", tuple(self.rules))
        for rule in self.rules:
            if not isinstance(rule, Rule):
                raise ValueError(f"Policy.rules must hold Rule objects, got {type(rule).__name__}")
        if self.default is not None and not isinstance(self.default, QuantSpec):
            raise ValueError("Policy.default must be a QuantSpec or None")
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"Policy.name must be a non-empty string, got {self.name!r}")

    def decide(self, fqn: str, kind: OpKind, n: int | None, k: int | None) -> tuple[QuantSpec | None, str]:
        """The spec for a site and why: which rule matched, or the default."""
        for index, rule in enumerate(self.rules):
            if rule.matches(fqn, kind, n, k):
                return rule.spec, f"rule {index}"
        return self.default, "default"

    def describe_decision(self, decided_by: str) -> str:
        """`decide`'s second result with the matching rule's predicates: "rule 1 (op='attention')"."""
        if decided_by.startswith("rule "):
            return f"{decided_by} ({self.rules[int(decided_by[5:])].describe()})"
        return decided_by

    def format_names(self) -> list[str]:
        """Every format the policy names, sorted (an attention format and the formats it names)."""
        specs = [s for top in (self.default, *(r.spec for r in self.rules)) if top is not None for s in top.chain()]
        names = {n for spec in specs for n in (spec.weight, spec.activation) if n}
        for name in [n for n in names if is_attention_format(n)]:
            attention_format = get_attention_format(name)
            names |= {attention_format.q, attention_format.k, attention_format.v}
        return sorted(names)

    def to_dict(self) -> dict[str, Any]:
        """Plain data; formats outside the built-in registry travel along as records, so the policy
        loads in a fresh process."""
        builtin = set(BUILTIN_FORMATS) | set(BUILTIN_ATTENTION_FORMATS)
        custom = [name for name in self.format_names() if name not in builtin]
        return {
            "name": self.name,
            "rules": [rule.to_dict() for rule in self.rules],
            "default": None if self.default is None else self.default.to_dict(),
            "formats": {name: format_record(name) for name in custom},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Policy:
        data = dict(data)
        records = data.pop("formats", {}).values()
        # ValueError if a name means another record here; attention formats name formats: last.
        for record in sorted(records, key=lambda record: "q" in record):
            if "q" in record:
                register_attention_format(AttentionFormat.from_dict(record))
            else:
                register_format(Format.from_dict(record))
        data = _checked_keys(cls, data)
        default = data.get("default")
        return cls(
            rules=tuple(Rule.from_dict(r) for r in data.get("rules", ())),
            default=None if default is None else QuantSpec.from_dict(default),
            name=data.get("name", "custom"),
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Policy:
        return cls.from_dict(json.loads(text))

    def cache_key(self) -> str:
        """A stable digest of the policy and every format it names (formats can be user-registered)."""
        formats = {name: format_record(name) for name in self.format_names()}
        text = json.dumps({"policy": self.to_dict(), "formats": formats}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def __str__(self) -> str:
        lines = [f"Policy {self.name!r} (key {self.cache_key()})"]
        for index, rule in enumerate(self.rules):
            target = "skip" if rule.spec is None else rule.spec.describe()
            lines.append(f"  rule {index}: {rule.describe()} -> {target}")
        lines.append(f"  default: {'skip' if self.default is None else self.default.describe()}")
        return "\n".join(lines)


# Recipes ---------------------------------------------------------------------------------------

_SKIP_MATMUL_AND_ATTENTION = (Rule(spec=None, op=OpKind.MATMUL), Rule(spec=None, op=OpKind.ATTENTION))


def _linear_recipe(name: str, weight: str, activation: str | None) -> Policy:
    return Policy(rules=_SKIP_MATMUL_AND_ATTENTION, default=QuantSpec(weight, activation), name=name)


_RECIPE_BUILDERS = {
    "w8a16": lambda: _linear_recipe("w8a16", "int8_row", None),
    "w4a16": lambda: _linear_recipe("w4a16", "int4_g128_asym", None),
    "w8a8": lambda: _linear_recipe("w8a8", "int8_row", "int8_row"),
    "fp8": lambda: _linear_recipe("fp8", "fp8_e4m3_row", "fp8_e4m3_row"),
    "fp8-block": lambda: _linear_recipe("fp8-block", "fp8_e4m3_128x128", "fp8_e4m3_1x128"),
    "mxfp8": lambda: _linear_recipe("mxfp8", "mxfp8", "mxfp8"),
    "mxfp4": lambda: _linear_recipe("mxfp4", "mxfp4", "mxfp4"),
    "nvfp4": lambda: _linear_recipe("nvfp4", "nvfp4", "nvfp4"),
    # Attention quantized per 128-token block inside the attention kernel (formats.AttentionFormat),
    # with the linear layers of the same element type.
    "fp8-attention": lambda: Policy(
        rules=(
            Rule(spec=None, op=OpKind.MATMUL),
            Rule(spec=QuantSpec(activation="attn_fp8_t128"), op=OpKind.ATTENTION),
        ),
        default=QuantSpec("fp8_e4m3_row", "fp8_e4m3_row"),
        name="fp8-attention",
    ),
    "int8-attention": lambda: Policy(
        rules=(
            Rule(spec=None, op=OpKind.MATMUL),
            Rule(spec=QuantSpec(activation="attn_int8_t128"), op=OpKind.ATTENTION),
        ),
        default=QuantSpec("int8_row", "int8_row"),
        name="int8-attention",
    ),
    # One int8 per-channel weight serves both regimes: decode-sized M is memory bound (weight-only
    # wins), prefill-sized M is compute bound (int8 x int8 wins). The switch is decided per call.
    "auto": lambda: Policy(
        rules=_SKIP_MATMUL_AND_ATTENTION,
        default=QuantSpec("int8_row", "int8_row", weight_only_below_m=AUTO_SWITCH_M),
        name="auto",
    ),
    # 4-bit storage, both regimes: one symmetric int4 g128 weight; below the switch the weight-only
    # kernel (A16W4), at or above it per-token fp8 activations x the int4 codes converted to fp8 in
    # the kernel (`kernels/int4_scaled_mm.py`). Symmetric because the codes must be integers to be
    # exact in fp8 (searched zero points are floats): DESIGN-NOTES "w4-auto".
    "w4-auto": lambda: Policy(
        rules=_SKIP_MATMUL_AND_ATTENTION,
        default=QuantSpec("int4_g128", "fp8_e4m3_row", weight_only_below_m=W4_AUTO_SWITCH_M),
        name="w4-auto",
    ),
}

AUTO_SWITCH_M = 128
# Where the fp8 path overtakes the weight-only one for int4 weights: the smallest M of the crossover
# sweep (benchmarks/sweep_w4_auto.py) from which int4->fp8 (row quantization included) beats w4a16
# on every Llama-3-8B shape at every larger swept M. Measured on the H100 (benchmarks/RESULTS.md,
# "2026-11-24 (fourth session), H100 — w4-auto first run"): per shape 2048 (4096x4096), 256
# (14336x4096), 512 (4096x14336). Both paths are slower than bf16 there (ops.SLOWER_THAN_BF16).
W4_AUTO_SWITCH_M = 2048
RECIPES: tuple[str, ...] = tuple(_RECIPE_BUILDERS)
DEFAULT_RECIPE = "w8a16"


def recipe(name: str) -> Policy:
    """The named recipe as a `Policy`; `RECIPES` lists the names."""
    try:
        return _RECIPE_BUILDERS[name]()
    except KeyError:
        raise ValueError(f"unknown recipe {name!r}; valid recipes: {', '.join(RECIPES)}") from None


def default_policy() -> Policy:
    """Safe for accuracy: 8-bit per-channel weights, 16-bit activations."""
    return recipe(DEFAULT_RECIPE)


def as_policy(policy: Policy | str | None) -> Policy:
    if policy is None:
        return default_policy()
    if isinstance(policy, Policy):
        return policy
    if isinstance(policy, str):
        return recipe(policy)
    raise ValueError(f"policy must be a Policy or a recipe name ({', '.join(RECIPES)}), got {type(policy).__name__}")
