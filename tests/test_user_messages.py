"""What a user sees when something is off (issue 9, items 3-5): bad options, training, nothing quantized."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn as nn

import lowbit_compile
from lowbit_compile import OptionError, check_options

# -- item 4: option errors ------------------------------------------------------------------------


def test_bad_option_at_first_call_is_backend_compiler_failed_wrapping_option_error() -> None:
    torch._dynamo.reset()
    compiled = torch.compile(nn.Linear(128, 64), backend="lowbit", options={"polcy": "w8a8"})
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed) as caught:
        compiled(torch.randn(2, 128))
    inner = caught.value.inner_exception
    assert isinstance(inner, OptionError) and isinstance(inner, ValueError)
    text = str(caught.value)
    assert "unknown lowbit option(s) ['polcy'] (did you mean 'polcy' -> 'policy'?)" in text
    for key in lowbit_compile.VALID_OPTIONS:
        assert f"\n  {key}: " in text
    assert "lowbit_compile.check_options(options)" in text
    torch._dynamo.reset()


@pytest.mark.parametrize(
    ("options", "problem"),
    [
        ({"polcy": "w8a8"}, r"unknown lowbit option\(s\) \['polcy'\]"),
        ({"policy": "w3a3"}, r"option policy: unknown recipe 'w3a3'; valid recipes: w8a16"),
        ({"policy": 3}, r"option policy: policy must be a Policy or a recipe name"),
        ({"inductor_config": 1}, r"option inductor_config must be a dict"),
        ("w8a8", r"options must be a dict, got str"),
    ],
)
def test_check_options_raises_at_once(options, problem) -> None:
    with pytest.raises(OptionError, match=problem) as caught:
        check_options(options)
    assert "Valid options:\n  policy: " in str(caught.value)


def test_check_options_accepts_valid_ones() -> None:
    parsed = check_options({"policy": "w4a16", "compute_sqnr": False})
    assert parsed.policy.name == "w4a16" and not parsed.compute_sqnr
    assert check_options(None).policy.name == lowbit_compile.default_policy().name


# -- item 1: torch.compile's modes ---------------------------------------------------------------


def _patches_seen(monkeypatch) -> list[dict]:
    """Record the Inductor config patches each lowering receives."""
    import lowbit_compile.passes.lower as lower

    seen: list[dict] = []
    original = lower.lower_with_inductor

    def spy(state, *args, config_patches=None, **kwargs):
        seen.append(dict(config_patches or {}))
        return original(state, *args, config_patches=config_patches, **kwargs)

    monkeypatch.setattr(lower, "lower_with_inductor", spy)
    return seen


@pytest.mark.parametrize("mode", ["max-autotune-no-cudagraphs", "reduce-overhead", "max-autotune", "default"])
def test_torch_compile_mode_is_accepted_with_inductors_meaning(mode, monkeypatch) -> None:
    """`torch.compile(m, backend="lowbit", mode=...)` used to fail with "unexpected keyword argument
    'mode'"; each mode now means what it means for Inductor (CUDA graphs are a no-op on CPU)."""
    from torch._inductor import list_mode_options

    seen = _patches_seen(monkeypatch)
    torch._dynamo.reset()
    model = _mlp().eval()
    x = torch.randn(4, 128)
    compiled = torch.compile(model, backend="lowbit", mode=mode)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), atol=0.05, rtol=0.05)
    assert seen and all(list_mode_options(mode).items() <= patches.items() for patches in seen)
    torch._dynamo.reset()


def test_mode_inside_options_with_a_policy(monkeypatch) -> None:
    """torch.compile refuses mode= together with options=: the mode goes inside options; explicit
    inductor_config settings win over the mode's."""
    seen = _patches_seen(monkeypatch)
    torch._dynamo.reset()
    options = {"policy": "w8a16", "mode": "max-autotune", "inductor_config": {"coordinate_descent_tuning": False}}
    compiled = torch.compile(_mlp().eval(), backend="lowbit", options=options)
    with torch.no_grad():
        compiled(torch.randn(4, 128))
    assert seen[0]["max_autotune"] is True and seen[0]["triton.cudagraphs"] is True
    assert seen[0]["coordinate_descent_tuning"] is False
    with pytest.raises(RuntimeError, match="Either mode or options"):
        torch.compile(_mlp(), backend="lowbit", mode="max-autotune", options={"policy": "w8a16"})
    torch._dynamo.reset()


def test_unknown_mode_names_the_valid_ones() -> None:
    with pytest.raises(OptionError, match=r"unknown mode 'max_autotune' \(did you mean 'max-autotune'\?\)"):
        check_options({"mode": "max_autotune"})
    with pytest.raises(OptionError, match="disagree"):
        lowbit_compile.lowbit_backend(None, [], options={"mode": "default"}, mode="max-autotune")


# -- item 3: gradients ----------------------------------------------------------------------------


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 8))


def test_training_compile_warns_and_backward_names_the_cause() -> None:
    torch._dynamo.reset()
    model = _mlp().train()
    compiled = torch.compile(model, backend="lowbit", options={"compute_sqnr": False})
    with pytest.warns(lowbit_compile.InferenceOnlyWarning, match=r"grad enabled and 4 inputs or parameters"):
        out = compiled(torch.randn(4, 128))
    assert out.requires_grad and out.grad_fn is not None
    cause = r"lowbit_compile is inference-only: .*torch\.no_grad\(\) / torch\.inference_mode\(\)"
    with pytest.raises(RuntimeError, match=cause + r".*compile without backend='lowbit' for training"):
        out.sum().backward()
    torch._dynamo.reset()


def test_no_grad_and_inference_mode_compile_unwrapped_and_silent(recwarn) -> None:
    from lowbit_compile.backend import compile_graph

    torch._dynamo.reset()
    model = _mlp()
    compiled = torch.compile(model, backend="lowbit", options={"compute_sqnr": False})
    x = torch.randn(4, 128)
    with torch.no_grad():
        out = compiled(x)
    with torch.inference_mode():
        out_inference = compiled(x)
    assert out.grad_fn is None and out_inference.grad_fn is None
    assert not [w for w in recwarn if issubclass(w.category, lowbit_compile.InferenceOnlyWarning)]
    torch.testing.assert_close(out, out_inference)

    # No per-call wrapper at all when compiled without grad: the backend returns the compiled callable.
    seen = []

    def backend(gm, example_inputs):
        compiled_fn = compile_graph(gm, example_inputs, check_options({"inductor": False, "compute_sqnr": False}))
        seen.append(compiled_fn)
        return compiled_fn

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=backend)(x)
    assert seen and seen[0].__name__ == "compiled"
    torch._dynamo.reset()


def test_grad_enabled_without_requires_grad_does_not_warn(recwarn) -> None:
    torch._dynamo.reset()
    model = _mlp().requires_grad_(False)
    out = torch.compile(model, backend="lowbit", options={"compute_sqnr": False})(torch.randn(4, 128))
    assert out.grad_fn is None
    assert not [w for w in recwarn if issubclass(w.category, lowbit_compile.InferenceOnlyWarning)]
    torch._dynamo.reset()


# -- item 5: policies that quantize less than asked --------------------------------------------------


def _compile_and_log(caplog, model, x, policy) -> list[str]:
    torch._dynamo.reset()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lowbit_compile"), torch.no_grad():
        torch.compile(model, backend="lowbit", options={"policy": policy, "inductor": False})(x)
    torch._dynamo.reset()
    ours = [r for r in caplog.records if r.name.startswith("lowbit_compile") and r.levelno == logging.WARNING]
    return [r.getMessage() for r in ours]


def test_w4a16_on_k_not_multiple_of_128_warns(caplog) -> None:
    model = nn.Sequential(nn.Linear(100, 64), nn.ReLU(), nn.Linear(64, 256), nn.Linear(256, 32))
    messages = _compile_and_log(caplog, model, torch.randn(3, 100), "w4a16")
    assert len(messages) == 1, messages
    assert "3 matmul sites found, 1 of 3 candidate sites quantized" in messages[0]
    assert "top skip reasons: 1x weight: K=100 not divisible by group size 128" in messages[0]
    assert "1x weight: K=64 not divisible by group size 128" in messages[0]


def test_conv_only_model_warns_no_matmul_sites(caplog) -> None:
    messages = _compile_and_log(caplog, nn.Conv2d(3, 4, 3), torch.randn(1, 3, 8, 8), "w8a16")
    assert messages and "no matmul sites found" in messages[0]


def test_intentional_skips_do_not_warn(caplog) -> None:
    from lowbit_compile.models import LlamaConfig, TinyLlama

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=128, intermediate_size=256, num_layers=1, num_heads=4, num_kv_heads=1)
    model = TinyLlama(config).eval()
    tokens = torch.randint(0, config.vocab_size, (2, 8))
    report = lowbit_compile.explain(model, tokens, policy="w8a8")
    assert report.skipped and all(s.skip_reason.startswith("policy: rule") for s in report.skipped)
    assert _compile_and_log(caplog, model, tokens, "w8a8") == []
    # A rule that leaves a linear site unquantized on purpose is not warned about either.
    policy = lowbit_compile.Policy(
        rules=(lowbit_compile.Rule(fqn="0", spec=None),), default=lowbit_compile.QuantSpec("int8_row")
    )
    two_linears = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 8))
    assert [s.format is None for s in lowbit_compile.explain(two_linears, torch.randn(2, 64), policy=policy).sites] == [
        True,
        False,
    ]
    assert _compile_and_log(caplog, two_linears, torch.randn(2, 64), policy) == []
