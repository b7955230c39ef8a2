"""The stages' fake values (`pipeline._fill_meta`): a lowbit op's value is reused for nodes with the
same static argument shapes (a model repeats each weight's quantize / dequantize per layer); every
reused value must be what running the op on fake inputs gives."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from lowbit_compile.passes import pipeline
from torch._dispatch.python import enable_python_dispatcher

from lowbit_compile.backend import BackendOptions, compile_graph
from lowbit_compile.models import LlamaConfig, TinyLlama

pytestmark = pytest.mark.usefixtures("fresh_dynamo")

LLAMA = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_layers=3, num_heads=4, num_kv_heads=2)


def _flat(value: Any) -> list:
    return list(value) if isinstance(value, (tuple, list)) else [value]


@pytest.mark.parametrize("policy", ["w4a16", "w8a8"])
def test_reused_fake_values_equal_the_ops_own(policy: str) -> None:
    torch.manual_seed(0)
    model = TinyLlama(LLAMA).eval()
    tokens = torch.randint(0, LLAMA.vocab_size, (2, 16))
    checked: dict[str, int] = {}

    def check(stage: str, state: Any) -> None:
        if stage not in ("qdq", "folded", "fused"):
            return
        keys: list = []
        with state.fake_mode(), enable_python_dispatcher():
            for node in state.gm.graph.nodes:
                target = node.target
                if not (isinstance(target, torch._ops.OpOverload) and target.namespace == "lowbit"):
                    continue
                args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), lambda n: n.meta["val"])
                key = pipeline._static_key(target, args, kwargs)
                keys.append(key)
                expected = _flat(target(*args, **kwargs))
                got = _flat(node.meta["val"])
                assert len(got) == len(expected), node
                for g, e in zip(got, expected):
                    assert (g.shape, g.stride(), g.dtype, g.device) == (e.shape, e.stride(), e.dtype, e.device), node
        values = [
            id(v)
            for node in state.gm.graph.nodes
            if isinstance(node.target, torch._ops.OpOverload) and node.target.namespace == "lowbit"
            for v in _flat(node.meta["val"])
        ]
        assert len(values) == len(set(values)), "a reused value is a fresh tensor per node"
        checked[stage] = len([k for k in keys if k is not None]) - len({k for k in keys if k is not None})

    options = BackendOptions.parse({"policy": policy, "inductor": False})
    def backend(gm: torch.fx.GraphModule, inputs: list) -> Any:
        return compile_graph(gm, inputs, options, on_stage_state=check)

    with torch.no_grad():
        torch.compile(model, backend=backend)(tokens)
    assert checked["qdq"] > 0, checked  # the layers' repeated shapes were served from the memo


def test_symbolic_sizes_and_other_targets_get_no_key() -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

    op = torch.ops.lowbit.quantize.default
    with FakeTensorMode(shape_env=ShapeEnv()) as mode:
        static = torch.empty(8, 16)
    context = StatelessSymbolicContext(dynamic_sizes=[DimDynamic.DYNAMIC, DimDynamic.STATIC])
    dynamic = mode.from_tensor(torch.empty(8, 16), symbolic_context=context)
    assert not isinstance(dynamic.shape[0], int)
    assert pipeline._static_key(op, (dynamic, "int8_row"), {}) is None
    key = pipeline._static_key(op, (static, "int8_row"), {})
    assert key is not None and key == pipeline._static_key(op, (static, "int8_row"), {})
    assert key != pipeline._static_key(op, (static, "int4_g128_asym"), {})
    assert pipeline._static_key(torch.ops.aten.relu.default, (static,), {}) is None
    assert pipeline._static_key(op, (static, object()), {}) is None
    assert pipeline._static_key(op, (static, -0.0), {}) != pipeline._static_key(op, (static, 0.0), {})
