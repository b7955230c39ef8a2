"""lowbit-compile: a torch.compile backend for low-bit quantized inference.

torch.compile(model, backend="lowbit", options={"policy": "w8a8"})
"""


def _find_source_passes() -> None:
    """`lowbit_compile.passes` is the repository's top-level `passes/` folder. Installed (editable or
    not), the package-dir mapping provides it; run from a source checkout on PYTHONPATH, bind it here."""
    import importlib.util
    import sys
    from pathlib import Path

    name = __name__ + ".passes"
    if name in sys.modules or importlib.util.find_spec(name) is not None:
        return
    source = Path(__file__).resolve().parent.parent / "passes" / "__init__.py"
    if not source.is_file():
        raise ImportError(f"{name} is missing: reinstall lowbit-compile (no {source})")
    spec = importlib.util.spec_from_file_location(name, source, submodule_search_locations=[str(source.parent)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)


_find_source_passes()

from lowbit_compile import ops  # noqa: E402, F401  (registers torch.ops.lowbit)
from lowbit_compile.backend import (  # noqa: E402
    VALID_OPTIONS,
    InferenceOnlyWarning,
    OptionError,
    check_options,
    lowbit_backend,
)
from lowbit_compile.calibration import Calibration, calibrate  # noqa: E402
from lowbit_compile.explain import explain  # noqa: E402
from lowbit_compile.formats import FORMATS, Format, get_format, register_format  # noqa: E402
from lowbit_compile.policy_search import search  # noqa: E402
from lowbit_compile.policy import RECIPES, OpKind, Policy, QuantSpec, Rule, default_policy, recipe  # noqa: E402
from lowbit_compile.report import Report, SiteReport  # noqa: E402
from lowbit_compile import testing  # noqa: E402, F401  (lowbit_compile.testing, like torch.testing)

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
    "calibrate",
    "Calibration",
    "search",
    "Report",
    "SiteReport",
]
__version__ = "0.1.0"
