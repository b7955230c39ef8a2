"""Policies as data: frozen, validated, printable, JSON round-trippable, hashable; rule matching; recipes."""

from __future__ import annotations

import dataclasses
import json

import pytest

from lowbit_compile import FORMATS, RECIPES, Format, OpKind, Policy, QuantSpec, Rule, default_policy, recipe
from lowbit_compile.formats import ATTENTION_FORMATS, AttentionFormat
from lowbit_compile.policy import AUTO_SWITCH_M, W4_AUTO_SWITCH_M, Kernel, as_policy

REQUIRED_RECIPES = [
    "w8a16", "w4a16", "w8a8", "fp8", "fp8-block", "mxfp8", "mxfp4", "nvfp4", "fp8-attention", "int8-attention", "auto",
    "w4-auto",
]  # fmt: skip

INT8 = QuantSpec("int8_row", "int8_row")
W4 = QuantSpec(weight="int4_g128_asym")


def custom_policy() -> Policy:
    """Every kind of predicate and spec a policy can hold."""
    return Policy(
        rules=(
            Rule(spec=None, fqn="layers.*.mlp.*"),
            Rule(spec=W4, fqn=r"re:layers\.\d+\.attn\.(q|k)_proj", min_k=128, max_n=4096),
            Rule(spec=QuantSpec(activation="fp8_e4m3_row"), op="attention"),
            Rule(spec=QuantSpec("int8_row", "int8_row", weight_only_below_m=64), min_n=8, max_k=8192),
        ),
        default=INT8,
        name="custom-test",
    )


def formats_of(policy: Policy) -> set[str]:
    specs = [policy.default, *(rule.spec for rule in policy.rules)]
    return {name for spec in specs if spec is not None for name in (spec.weight, spec.activation) if name}


# -- frozen ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "obj, field, value",
    [
        (INT8, "weight", "int4_g32"),
        (INT8, "weight_only_below_m", 3),
        (Rule(spec=INT8, fqn="a.*"), "fqn", "b.*"),
        (Rule(spec=INT8), "spec", None),
        (custom_policy(), "default", None),
        (custom_policy(), "rules", ()),
        (custom_policy(), "name", "other"),
    ],
)
def test_assignment_raises(obj, field, value):
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(obj, field, value)


# -- validated on construction -------------------------------------------------------------------


def test_unknown_format_name_lists_valid_names():
    with pytest.raises(ValueError, match="unknown format 'int3_row'") as error:
        QuantSpec(weight="int3_row")
    for name in ("int8_row", "int4_g128_asym", "fp8_e4m3_row", "mxfp4", "nvfp4"):
        assert name in str(error.value)
    with pytest.raises(ValueError, match="valid names"):
        QuantSpec(activation="fp9")


def test_custom_format_with_bad_group_size_raises():
    with pytest.raises(ValueError, match="group_size must be a power of two"):
        Format(name="int4_g100", element="int4", granularity="group", group_size=100)


def test_spec_accepts_a_format_record_and_registers_it():
    fmt = Format(name="test_policy_int4_g64_sym", element="int4", granularity="group", group_size=64)
    spec = QuantSpec(weight=fmt)
    assert spec.weight == fmt.name and spec.weight_format == fmt
    assert FORMATS[fmt.name] is fmt
    policy = Policy(default=spec)
    assert fmt.name in str(policy) and policy.cache_key()  # usable after construction
    assert Policy.from_json(policy.to_json()) == policy


def test_spec_rejects_a_format_record_that_reuses_a_registered_name():
    # Used to be accepted, silently meaning the registered int8_row instead of this int4 record.
    impostor = Format(name="int8_row", element="int4", granularity="group", group_size=32)
    with pytest.raises(ValueError, match="already registered"):
        QuantSpec(weight=impostor)


def test_spec_needs_a_format():
    with pytest.raises(ValueError, match=r"weight and/or an activation.*Rule\(spec=None"):
        QuantSpec()


@pytest.mark.parametrize("spec_kwargs", [{"weight": "int8_row"}, {"activation": "int8_row"}])
def test_weight_only_below_m_needs_both_formats(spec_kwargs):
    with pytest.raises(ValueError, match="needs both a weight and an activation format"):
        QuantSpec(**spec_kwargs, weight_only_below_m=16)


@pytest.mark.parametrize("m", [0, -4, 2.5, True, "16"])
def test_weight_only_below_m_must_be_a_positive_int(m):
    with pytest.raises(ValueError, match="weight_only_below_m must be a positive int"):
        QuantSpec("int8_row", "int8_row", weight_only_below_m=m)


def test_rule_with_unknown_op_kind_lists_kinds():
    with pytest.raises(ValueError, match="'conv' is not an op kind; use one of: linear, matmul, attention"):
        Rule(spec=INT8, op="conv")


def test_rule_op_given_as_string_becomes_the_enum():
    assert Rule(spec=INT8, op="attention").op is OpKind.ATTENTION


def test_rule_with_bad_regex():
    with pytest.raises(ValueError, match=r"Rule.fqn regex .* does not compile: missing \)"):
        Rule(spec=INT8, fqn=r"re:layers\.(")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"spec": "int8_row"}, "must be a QuantSpec or None"),
        ({"spec": INT8, "fqn": ""}, "non-empty glob"),
        ({"spec": INT8, "min_k": -1}, "min_k must be a non-negative int"),
        ({"spec": INT8, "max_n": 1.5}, "max_n must be a non-negative int"),
        ({"spec": INT8, "min_n": True}, "min_n must be a non-negative int"),
        ({"spec": INT8, "min_k": 256, "max_k": 128}, "min_k=256 > max_k=128"),
        ({"spec": INT8, "min_n": 9, "max_n": 8}, "min_n=9 > max_n=8"),
    ],
)
def test_rule_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Rule(**kwargs)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"rules": (INT8,)}, "must hold Rule objects, got QuantSpec"),
        ({"rules": Rule(spec=None)}, "must be a sequence of Rule"),
        ({"default": "int8_row"}, "default must be a QuantSpec or None"),
        ({"name": ""}, "name must be a non-empty string"),
        ({"name": 3}, "name must be a non-empty string"),
    ],
)
def test_policy_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Policy(**kwargs)


def test_policy_rules_from_any_iterable_become_a_tuple():
    rules = [Rule(spec=None, op="matmul"), Rule(spec=W4)]
    from_list, from_generator = Policy(rules=rules), Policy(rules=(rule for rule in rules))
    assert from_list.rules == from_generator.rules == tuple(rules)
    assert from_list == from_generator and hash(from_list) == hash(from_generator)


# -- printable -----------------------------------------------------------------------------------


def test_str_shows_rules_and_default():
    text = str(custom_policy())
    lines = text.splitlines()
    assert lines[0] == f"Policy 'custom-test' (key {custom_policy().cache_key()})"
    assert lines[1] == "  rule 0: fqn='layers.*.mlp.*' -> skip"
    assert lines[2].startswith("  rule 1: fqn='re:layers")
    assert "min_k=128 max_n=4096 -> A=16bit W=int4_g128_asym" in lines[2]
    assert lines[3] == "  rule 2: op='attention' -> A=fp8_e4m3_row"
    assert lines[4] == "  rule 3: max_k=8192 min_n=8 -> A=int8_row W=int8_row weight-only below M=64"
    assert lines[5] == "  default: A=int8_row W=int8_row"
    assert len(lines) == 6


def test_str_of_policy_without_default_says_skip():
    assert str(Policy(name="nothing")).splitlines()[-1] == "  default: skip"
    assert str(Policy(rules=(Rule(spec=INT8),))).splitlines()[1] == "  rule 0: * -> A=int8_row W=int8_row"


# -- JSON round trip -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", [*RECIPES, "custom"])
def test_json_round_trip(name):
    policy = custom_policy() if name == "custom" else recipe(name)
    text = policy.to_json()
    json.loads(text)  # plain JSON
    again = Policy.from_json(text)
    assert again == policy
    assert hash(again) == hash(policy)
    assert again.cache_key() == policy.cache_key()
    assert again.to_json() == text


@pytest.mark.parametrize(
    "data, message",
    [
        ({"rules": [], "defualt": None}, r"unknown Policy keys \['defualt'\]; valid keys are"),
        ({"rules": [{"spec": None, "fqnn": "x"}]}, r"unknown Rule keys \['fqnn'\]"),
        ({"rules": [{"fqn": "x"}]}, "needs a 'spec' key"),
        ({"default": {"weight": "int8_row", "act": "int8_row"}}, r"unknown QuantSpec keys \['act'\]"),
        ({"default": {"weight": "int3"}}, "unknown format 'int3'"),
        ({"rules": [{"spec": None, "op": "conv"}]}, "is not an op kind"),
    ],
)
def test_from_json_rejects_bad_data_with_value_error(data, message):
    with pytest.raises(ValueError, match=message):
        Policy.from_json(json.dumps(data))


# -- hashable and part of the cache key ----------------------------------------------------------


def test_policies_are_dict_keys():
    table = {recipe(name): name for name in RECIPES}
    table[custom_policy()] = "custom"
    for name in RECIPES:  # fresh, equal objects find the same entry
        assert table[recipe(name)] == name
    assert table[custom_policy()] == "custom"
    assert len(table) == len(RECIPES) + 1


def test_equal_policies_hash_equal():
    a, b = custom_policy(), custom_policy()
    assert a is not b and a == b and hash(a) == hash(b) and a.cache_key() == b.cache_key()
    assert Rule(spec=INT8, op="linear") == Rule(spec=INT8, op=OpKind.LINEAR)
    assert hash(QuantSpec("int8_row")) == hash(QuantSpec(FORMATS["int8_row"]))


def _variants() -> dict[str, Policy]:
    base = custom_policy()
    rules = list(base.rules)

    def with_rule(index: int, **changes) -> Policy:
        changed = list(rules)
        changed[index] = dataclasses.replace(rules[index], **changes)
        return dataclasses.replace(base, rules=tuple(changed))

    return {
        "base": base,
        "name": dataclasses.replace(base, name="other"),
        "default": dataclasses.replace(base, default=QuantSpec("int8_row")),
        "default format": dataclasses.replace(base, default=QuantSpec("int8_row", "fp8_e4m3_row")),
        "no default": dataclasses.replace(base, default=None),
        "rule order": dataclasses.replace(base, rules=(rules[1], rules[0], *rules[2:])),
        "rule dropped": dataclasses.replace(base, rules=tuple(rules[1:])),
        "rule fqn": with_rule(0, fqn="layers.*.mlp.up"),
        "rule op": with_rule(0, op="linear"),
        "rule spec": with_rule(0, spec=W4),
        "rule min_k": with_rule(1, min_k=256),
        "rule max_n": with_rule(1, max_n=4095),
        "rule weight format": with_rule(1, spec=QuantSpec(weight="int4_g64_asym")),
        "rule activation format": with_rule(2, spec=QuantSpec(activation="fp8_e5m2_row")),
        "rule switch m": with_rule(3, spec=QuantSpec("int8_row", "int8_row", weight_only_below_m=65)),
        "rule max_k": with_rule(3, max_k=None),
    }


def test_cache_key_differs_when_anything_differs():
    keys = {name: policy.cache_key() for name, policy in _variants().items()}
    assert len(set(keys.values())) == len(keys), keys
    assert len({hash(policy) for policy in _variants().values()}) == len(keys)
    assert all(len(key) == 16 for key in keys.values())


def test_every_recipe_has_its_own_cache_key():
    assert len({recipe(name).cache_key() for name in RECIPES}) == len(RECIPES)


# -- rule matching -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fqn, expected",
    [
        ("layers.0.mlp.up_proj", True),
        ("layers.17.mlp.down_proj", True),
        ("layers.0.attn.q_proj", False),
        ("mlp.up_proj", False),
        ("layers.0.mlp", False),
    ],
)
def test_glob_fqn(fqn, expected):
    assert Rule(spec=None, fqn="layers.*.mlp.*").matches(fqn, OpKind.LINEAR, n=64, k=64) is expected


@pytest.mark.parametrize(
    "fqn, expected",
    [
        ("layers.0.attn.q_proj", True),
        ("layers.12.attn.k_proj", True),
        ("layers.0.attn.v_proj", False),
        ("layers.x.attn.q_proj", False),
        ("layers.0.attn.q_proj_extra", False),  # fullmatch, not search
        ("model.layers.0.attn.q_proj", False),
    ],
)
def test_regex_fqn(fqn, expected):
    rule = Rule(spec=None, fqn=r"re:layers\.\d+\.attn\.(q|k)_proj")
    assert rule.matches(fqn, OpKind.LINEAR, n=64, k=64) is expected


@pytest.mark.parametrize("kind", list(OpKind))
def test_op_kind(kind):
    rule = Rule(spec=None, op="attention")
    assert rule.matches("attn", kind, n=None, k=64) is (kind is OpKind.ATTENTION)
    assert Rule(spec=None).matches("attn", kind, n=None, k=None)  # no predicates: matches everything


@pytest.mark.parametrize(
    "bounds, n, k, expected",
    [
        ({"min_k": 128}, 64, 128, True),  # inclusive
        ({"min_k": 128}, 64, 127, False),
        ({"max_k": 128}, 64, 128, True),
        ({"max_k": 128}, 64, 129, False),
        ({"min_n": 72}, 72, 16, True),
        ({"min_n": 72}, 71, 16, False),
        ({"max_n": 72}, 72, 16, True),
        ({"max_n": 72}, 73, 16, False),
        ({"min_k": 64, "max_k": 64, "min_n": 8, "max_n": 8}, 8, 64, True),
        ({"min_k": 64, "max_k": 64, "min_n": 8, "max_n": 8}, 9, 64, False),
        ({"min_n": 1}, None, 64, False),  # attention sites have no N: a bound on N never matches them
        ({"max_k": 4096}, 64, None, False),
        ({}, None, None, True),
    ],
)
def test_shape_bounds(bounds, n, k, expected):
    assert Rule(spec=None, **bounds).matches("proj", OpKind.LINEAR, n=n, k=k) is expected


def test_first_match_wins_skip_and_default():
    policy = Policy(
        rules=(
            Rule(spec=W4, fqn="layers.*.mlp.*", min_k=256),
            Rule(spec=None, fqn="layers.*.mlp.*"),
            Rule(spec=INT8, fqn="layers.*"),  # also matches mlp sites, but comes after
        ),
        default=QuantSpec(weight="int8_row"),
    )
    assert policy.decide("layers.0.mlp.up", OpKind.LINEAR, n=64, k=256) == (W4, "rule 0")
    assert policy.decide("layers.0.mlp.up", OpKind.LINEAR, n=64, k=128) == (None, "rule 1")
    assert policy.decide("layers.0.attn.q", OpKind.LINEAR, n=64, k=128) == (INT8, "rule 2")
    assert policy.decide("lm_head", OpKind.LINEAR, n=64, k=128) == (QuantSpec(weight="int8_row"), "default")
    assert Policy().decide("lm_head", OpKind.LINEAR, n=64, k=128) == (None, "default")


def test_kernel_follows_from_spec():
    assert QuantSpec(weight="int8_row").kernel(OpKind.LINEAR) is Kernel.WEIGHT_ONLY_MM
    assert INT8.kernel(OpKind.LINEAR) is Kernel.SCALED_MM
    assert QuantSpec("int8_row", "int8_row", weight_only_below_m=8).kernel(OpKind.LINEAR) is Kernel.AUTO_MM
    assert QuantSpec(activation="fp8_e4m3_row").kernel(OpKind.ATTENTION) is Kernel.ATTENTION


# -- recipes -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", REQUIRED_RECIPES)
def test_required_recipe_exists_and_builds(name):
    assert name in RECIPES
    policy = recipe(name)
    assert isinstance(policy, Policy) and policy.name == name
    assert policy.default is not None
    assert formats_of(policy) <= set(FORMATS) | set(ATTENTION_FORMATS)
    assert recipe(name) == policy and as_policy(name) == policy


def test_recipe_formats():
    assert recipe("w8a16").default == QuantSpec(weight="int8_row")
    assert recipe("w4a16").default.activation is None and recipe("w4a16").default.weight_format.bits == 4
    assert recipe("w8a8").default == INT8
    assert recipe("fp8").default == QuantSpec("fp8_e4m3_row", "fp8_e4m3_row")
    assert recipe("fp8-block").default == QuantSpec("fp8_e4m3_128x128", "fp8_e4m3_1x128")
    for name in ("mxfp8", "mxfp4", "nvfp4"):
        assert recipe(name).default == QuantSpec(name, name)
    auto = recipe("auto").default
    assert auto.weight and auto.activation and auto.weight_only_below_m == AUTO_SWITCH_M


def test_w4_auto_recipe():
    """One symmetric int4 g128 weight (integer codes: exact in fp8), per-token fp8 activations from the
    measured switch M on; printable and JSON round-trippable like every recipe."""
    policy = recipe("w4-auto")
    spec = policy.default
    assert spec == QuantSpec("int4_g128", "fp8_e4m3_row", weight_only_below_m=W4_AUTO_SWITCH_M)
    assert spec.kernel(OpKind.LINEAR) is Kernel.AUTO_MM and spec.weight_format.symmetric
    assert f"A=fp8_e4m3_row W=int4_g128 weight-only below M={W4_AUTO_SWITCH_M}" in str(policy)
    assert Policy.from_json(policy.to_json()) == policy
    assert policy.cache_key() != recipe("auto").cache_key() != recipe("w4a16").cache_key()


def test_linear_recipes_leave_matmul_and_attention_unquantized():
    for name in RECIPES:
        policy = recipe(name)
        assert policy.decide("bmm", OpKind.MATMUL, n=None, k=64)[0] is None, name
        spec, _ = policy.decide("attn", OpKind.ATTENTION, n=None, k=64)
        assert (spec is not None) is name.endswith("-attention"), name
    for name, attention in (("fp8-attention", "attn_fp8_t128"), ("int8-attention", "attn_int8_t128")):
        spec = recipe(name).decide("attn", OpKind.ATTENTION, None, 64)[0]
        assert spec == QuantSpec(activation=attention) and spec.kernel(OpKind.ATTENTION) is Kernel.BLOCK_ATTENTION


def test_attention_formats_in_policies_round_trip_through_json():
    custom = AttentionFormat("attn_test_int8_q_fp8_kv", "int8_t64", "fp8_e4m3_t64", "fp8_e4m3_t64", smooth_k=True)
    policy = Policy(rules=(Rule(spec=QuantSpec(activation=custom), op="attention"),), default=None, name="custom-attn")
    data = json.loads(policy.to_json())
    assert data["formats"]["attn_test_int8_q_fp8_kv"]["smooth_k"] is True
    assert Policy.from_json(policy.to_json()) == policy
    assert Policy.from_json(recipe("int8-attention").to_json()) == recipe("int8-attention")
    other = dataclasses.replace(policy, rules=(Rule(spec=QuantSpec(activation="attn_fp8_t64"), op="attention"),))
    assert policy.cache_key() != other.cache_key()
    assert "attn_test_int8_q_fp8_kv" in policy.format_names() and "int8_t64" in policy.format_names()


def test_unknown_recipe_lists_valid_recipes():
    with pytest.raises(ValueError, match="unknown recipe 'nope'; valid recipes: ") as error:
        recipe("nope")
    for name in REQUIRED_RECIPES:
        assert name in str(error.value)


def test_as_policy():
    policy = custom_policy()
    assert as_policy(policy) is policy
    assert as_policy(None) == default_policy()
    with pytest.raises(ValueError, match="policy must be a Policy or a recipe name"):
        as_policy(42)


def test_default_policy_is_8_bit():
    policy = default_policy()
    names = formats_of(policy)
    assert names
    assert all(FORMATS[name].bits == 8 for name in names), names
