"""A normal (non-editable) install works beside a user's own top-level `passes` package (issue 9, item 6).

The repository keeps `passes/` at its top, but it installs as `lowbit_compile.passes`; the kernels
subpackage must be in the wheel too.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

CHECK = """
import sys
import passes  # the user's own package
assert passes.MINE, passes.__file__
import lowbit_compile, lowbit_compile.passes, lowbit_compile.kernels.weight_only
site = sys.argv[1]
for module in (lowbit_compile, lowbit_compile.passes, lowbit_compile.kernels.weight_only):
    assert module.__file__.startswith(site), (module.__name__, module.__file__)
print("installed from", site)
"""


def test_pyproject_installs_passes_under_the_project_namespace() -> None:
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "passes" not in setuptools["packages"]
    assert setuptools["package-dir"]["lowbit_compile.passes"] == "passes"
    packages = {p.relative_to(ROOT).as_posix().replace("/", ".") for p in (ROOT / "lowbit_compile").rglob("*/")}
    packages = {p for p in packages if (ROOT / p.replace(".", "/") / "__init__.py").exists()}
    assert packages <= set(setuptools["packages"]), "every subpackage of lowbit_compile must be installed"


@pytest.mark.slow
def test_non_editable_install_beside_a_user_passes_package(tmp_path) -> None:
    site = tmp_path / "site"
    # Build from a clean copy: a stale build/ in a developer's checkout would leak into the wheel.
    source = tmp_path / "source"
    shutil.copytree(
        ROOT, source, ignore=shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "__pycache__", ".*cache*")
    )
    build = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(site), str(source)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    assert not (site / "passes").exists(), "nothing may install as the top-level name `passes`"
    project = tmp_path / "user_project"
    (project / "passes").mkdir(parents=True)
    (project / "passes" / "__init__.py").write_text("MINE = True\n")
    env = dict(os.environ, PYTHONPATH=str(site))
    env.pop("TORCH_LOGS", None)
    done = subprocess.run(
        [sys.executable, "-c", CHECK, str(site)], cwd=project, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    quickstart = [
        sys.executable,
        str(ROOT / "examples" / "quickstart.py"),
        *("--layers", "1", "--hidden", "128", "--length", "16", "--repeats", "1", "--device", "cpu"),
    ]
    done = subprocess.run(quickstart, cwd=project, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "lowbit report" in done.stdout
