"""Readable stage graphs: headers, dump files, debug logs and tlparse artifacts.

Every rendered graph starts with a header naming the stage and the policy that produced it, so a
reader of a dump never has to guess where it came from.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
import torch.fx
from torch._logging import trace_structured

log = logging.getLogger("lowbit_compile.graphs")

DUMP_DIR_ENV = "LOWBIT_DUMP_DIR"


def graph_text(gm: torch.fx.GraphModule) -> str:
    return gm.print_readable(print_output=False, include_stride=False, include_device=False)


def site_lines(sites: list[Any]) -> list[str]:
    lines = []
    for site in sites:
        decision = site.spec.describe() if site.quantized else f"skip ({site.skip_reason})"
        lines.append(f"#   site {site.index} {site.kind.value} {site.fqn or '<root>'} [{site.node.name}]: {decision}")
    return lines


def render_stage(stage: str, body: str, policy: Any, graph_id: str, sites: list[Any] | None = None) -> str:
    header = [
        f"# lowbit-compile stage: {stage}",
        f"# graph: {graph_id}",
        f"# policy: {policy.name} (key {policy.cache_key()})",
    ]
    if sites is not None:
        header.append(f"# sites: {len(sites)}")
        header += site_lines(sites)
    return "\n".join(header) + "\n" + body.rstrip() + "\n"


def _fresh_directory(parent: Path, name: str) -> Path:
    """parent/name, or parent/name.1, .2, ... if taken: Dynamo's compile ids restart after a reset,
    and a later compile must not overwrite (or mix with) an earlier one's dump."""
    candidate, suffix = parent / name, 0
    while candidate.exists():
        suffix += 1
        candidate = parent / f"{name}.{suffix}"
    return candidate


class StageRecorder:
    """Collects each stage's text; writes it to the dump dir, the debug log and tlparse."""

    def __init__(self, dump_dir: str | os.PathLike | None, graph_id: str) -> None:
        dump_dir = dump_dir if dump_dir is not None else os.environ.get(DUMP_DIR_ENV) or None
        self.directory = _fresh_directory(Path(dump_dir), f"graph_{graph_id}") if dump_dir is not None else None
        self.graph_id = graph_id
        self.texts: dict[str, str] = {}

    def record(self, name: str, text: str, suffix: str = ".py") -> None:
        self.texts[name] = text
        log.debug("%s", text)
        trace_structured(
            "artifact",
            metadata_fn=lambda: {"name": f"lowbit_{name}", "encoding": "string"},
            payload_fn=lambda: text,
        )
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
            index = len(self.texts)
            (self.directory / f"{index:02d}_{name}{suffix}").write_text(text)
