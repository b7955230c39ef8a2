"""The README's first command prints no warnings (issue 9, item 7)."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_numpy_is_a_dependency() -> None:
    """torch 2.13 warns "Failed to initialize NumPy" at `import torch` when numpy is missing, and its
    wheel does not require numpy: our package does, so `pip install -e .` brings it."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert any(dep.split(">")[0].split("=")[0].strip() == "numpy" for dep in project["dependencies"])


@pytest.mark.slow
def test_quickstart_prints_no_warnings(tmp_path) -> None:
    env = dict(os.environ)  # Python's default warning filters: what a user of the README sees
    for name in ("TORCH_LOGS", "PYTHONWARNINGS"):
        env.pop(name, None)
    command = [
        sys.executable,
        str(ROOT / "examples" / "quickstart.py"),
        *("--layers", "1", "--hidden", "128", "--length", "16", "--repeats", "1", "--device", "cpu"),
    ]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Warning" not in done.stderr, done.stderr[-3000:]
    assert "lowbit report" in done.stdout
