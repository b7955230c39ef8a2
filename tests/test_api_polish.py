"""Issue 8 item 6: what a new user meets first. Sites on raw parameters are named by the parameter's
path (not all `<root>`), and `lowbit_compile.testing` is reachable after `import lowbit_compile`."""

from __future__ import annotations

import subprocess
import sys

import torch
import torch.nn.functional as F

import lowbit_compile


class Attention(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.wq = torch.nn.Parameter(torch.randn(16, 16))
        self.wk = torch.nn.Parameter(torch.randn(16, 16))
        self.out = torch.nn.Linear(16, 16)

    def forward(self, x):
        return self.out(F.linear(x, self.wq) * F.linear(x, self.wk))


class Model(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.wq = torch.nn.Parameter(torch.randn(16, 16))
        self.wk = torch.nn.Parameter(torch.randn(16, 16))
        self.attn = Attention()

    def forward(self, x):
        return self.attn(F.linear(x, self.wq) + F.linear(x, self.wk))


def test_sites_on_raw_parameters_are_named_by_the_parameter_path() -> None:
    report = lowbit_compile.explain(Model(), torch.randn(3, 16), policy="w8a16")
    names = [site.fqn for site in report.sites]
    assert names == ["wq", "wk", "attn.wq", "attn.wk", "attn.out"], names
    assert "<root>" not in str(report)


def test_a_rule_can_name_one_raw_parameter() -> None:
    policy = lowbit_compile.Policy(
        rules=(lowbit_compile.Rule(fqn="attn.wk", spec=None),), default=lowbit_compile.recipe("w8a16").default
    )
    report = lowbit_compile.explain(Model(), torch.randn(3, 16), policy=policy)
    skipped = [site.fqn for site in report.sites if site.format is None]
    assert skipped == ["attn.wk"], skipped


def test_testing_is_reachable_like_torch_testing() -> None:
    code = "import lowbit_compile; print(lowbit_compile.testing.run_and_get_graphs.__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "run_and_get_graphs"
