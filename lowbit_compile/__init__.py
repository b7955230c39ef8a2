"""lowbit-compile: a torch.compile backend for low-bit quantized inference.

torch.compile(model, backend="lowbit", options={"policy": "w8a8"})
"""

from lowbit_compile import ops  # noqa: F401  (registers torch.ops.lowbit)
from lowbit_compile.backend import VALID_OPTIONS, InferenceOnlyWarning, OptionError, check_options, lowbit_backend
from lowbit_compile.explain import explain
from lowbit_compile.formats import FORMATS, Format, get_format, register_format
from lowbit_compile.policy import RECIPES, OpKind, Policy, QuantSpec, Rule, default_policy, recipe
from lowbit_compile.report import Report, SiteReport

__all__ = [
    "FORMATS",
    "Format",
    "get_format",
    "register_format",
    "RECIPES",
    "OpKind",
    "Policy",
    "QuantSpec",
    "Rule",
    "default_policy",
    "recipe",
    "VALID_OPTIONS",
    "OptionError",
    "InferenceOnlyWarning",
    "check_options",
    "lowbit_backend",
    "explain",
    "Report",
    "SiteReport",
]
__version__ = "0.1.0"
