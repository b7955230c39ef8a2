"""What a user sees when something is off (issue 9, items 3-5): bad options, training, nothing quantized."""

from __future__ import annotations

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
