"""Readable stage graphs: headers, dump files, debug logs and tlparse artifacts.

Every rendered graph starts with a header naming the stage and the policy that produced it, so a
reader of a dump never has to guess where it came from.
"""

from __future__ import annotations

import datetime
import logging
import os
from pathlib import Path
from typing import Any

import torch
import torch.fx
from torch._logging import trace_structured

# Whole stage graphs are logged at DEBUG on this module's logger only when that logger itself is
# set up: `TORCH_LOGS="+lowbit_compile.dump"` (torch attaches its handler to each logger TORCH_LOGS
# names), or a handler the user added to `lowbit_compile.dump`. `TORCH_LOGS="+lowbit_compile"` also
# makes this child logger DEBUG, so the level cannot tell the two apart; the handler can. That keeps
# the decisions log readable (issue 9 item 8: 6,569 of the quickstart's 6,640 lines were graphs). A
# torch logging artifact cannot be used: TORCH_LOGS is parsed at `import torch`, before we could
# register one, and an unknown name there fails the import.
log = logging.getLogger(__name__)


def _graphs_wanted() -> bool:
    return bool(log.handlers) and log.isEnabledFor(logging.DEBUG)

DUMP_DIR_ENV = "LOWBIT_DUMP_DIR"

# Files of a dump directory, numbered in pipeline order whatever order they are written in (an
# Inductor cache hit records `lowered` after `output_code`).
FILE_ORDER = (
    "about", "captured", "annotated", "qdq", "folded", "fused", "lowered", "output_code", "report", "report_json",
)  # fmt: skip


def graph_text(gm: torch.fx.GraphModule) -> str:
    return gm.print_readable(print_output=False, include_stride=False, include_device=False)


def fx_graph_text(graph: torch.fx.Graph) -> str:
    """A bare FX graph (Inductor's post-grad graph) in the same readable Python style as `graph_text`."""
    try:
        return graph.python_code(root_module="self", verbose=False).src
    except Exception:  # noqa: BLE001 - a graph that does not codegen is still worth showing
        return str(graph)


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
    """Collects each stage's text; writes it to the dump dir, the graphs log artifact and tlparse.

    A dump directory explains itself: `00_about.txt` says which call made it (torch.compile or
    explain), when, with which policy and versions, and lists the files, which are numbered in
    pipeline order (FILE_ORDER)."""

    def __init__(
        self, dump_dir: str | os.PathLike | None, graph_id: str, caller: str = "torch.compile", policy: Any = None
    ) -> None:
        dump_dir = dump_dir if dump_dir is not None else os.environ.get(DUMP_DIR_ENV) or None
        self.directory = _fresh_directory(Path(dump_dir), f"graph_{graph_id}") if dump_dir is not None else None
        self.graph_id = graph_id
        self.caller = caller
        self.policy = policy
        self.texts: dict[str, str] = {}

    def _about(self) -> str:
        policy = f"{self.policy.name} (key {self.policy.cache_key()})" if self.policy is not None else "?"
        lines = [
            f"lowbit-compile dump of Dynamo graph {self.graph_id}",
            f"made by: {self.caller}",
            f"at: {datetime.datetime.now().isoformat(timespec='seconds')}",
            f"policy: {policy}",
            f"torch {torch.__version__}",
            "files, in pipeline order: captured -> annotated -> qdq -> folded -> fused -> lowered (Inductor's",
            "post-grad graph) -> output_code (Inductor's generated code) -> report (.txt table, .json).",
            "A directory name ending in .N is a later compile of a graph with the same Dynamo compile id",
            "(ids restart after torch._dynamo.reset()); read `made by` and `at` above to tell them apart.",
        ]
        return "\n".join(lines) + "\n"

    def record(self, name: str, text: str, suffix: str = ".py") -> None:
        if text.startswith("# lowbit-compile stage: "):  # say which call made it, under the stage line
            first, _, rest = text.partition("\n")
            text = f"{first}\n# made by: {self.caller}\n{rest}"
        self.texts[name] = text
        if _graphs_wanted():
            log.debug("%s", text)
        trace_structured(
            "artifact",
            metadata_fn=lambda: {"name": f"lowbit_{name}", "encoding": "string"},
            payload_fn=lambda: text,
        )
        if self.directory is not None:
            if not self.directory.exists():
                self.directory.mkdir(parents=True, exist_ok=True)
                (self.directory / "00_about.txt").write_text(self._about())
            index = FILE_ORDER.index(name) if name in FILE_ORDER else len(FILE_ORDER) + len(self.texts)
            (self.directory / f"{index:02d}_{name}{suffix}").write_text(text)
