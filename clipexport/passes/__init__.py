"""Graph passes: named functions `ModelProto -> ModelProto`, run from one ordered list.

Each run is recorded (name, status, node counts before/after, seconds) and the record
goes into the manifest. An optional pass that fails leaves the graph as it was and says
so in its record; a required pass that fails stops the build.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Callable, Iterable

import onnx

from clipexport.errors import ClipExportError, UsageError
from clipexport.passes.simplify import simplify


@dataclass(frozen=True)
class PassConfig:
    tower: str  # "image" or "text"
    precision: str


@dataclass(frozen=True)
class GraphPass:
    name: str
    run: Callable[[onnx.ModelProto, PassConfig], onnx.ModelProto]
    required: bool  # a failure of a required pass fails the build
    summary: str


@dataclass
class PassRecord:
    name: str
    status: str  # "applied", "failed" (graph left as it was) or "disabled"
    nodes_before: int
    nodes_after: int
    seconds: float
    detail: str = ""

    def to_json(self) -> dict[str, object]:
        return asdict(self)


PIPELINE: tuple[GraphPass, ...] = (
    GraphPass("simplify", simplify, required=False, summary="constant folding and dead-node removal (onnxslim)"),
)


def pass_names() -> list[str]:
    return [p.name for p in PIPELINE]


def count_nodes(model: onnx.ModelProto) -> int:
    """Nodes of the main graph and of every subgraph (If/Loop bodies)."""

    def walk(graph: onnx.GraphProto) -> int:
        total = 0
        for node in graph.node:
            total += 1
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    total += walk(attr.g)
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    total += sum(walk(g) for g in attr.graphs)
        return total

    return walk(model.graph)


def run_passes(
    model: onnx.ModelProto,
    cfg: PassConfig,
    disabled: Iterable[str] = (),
    log: Callable[[str], None] = lambda _msg: None,
) -> tuple[onnx.ModelProto, list[PassRecord]]:
    """Run the pipeline in order; return the final graph and one record per pass."""
    disabled = set(disabled)
    unknown = disabled - set(pass_names())
    if unknown:
        raise UsageError(f"unknown pass {sorted(unknown)[0]!r}; passes are: {', '.join(pass_names())}")
    records: list[PassRecord] = []
    for graph_pass in PIPELINE:
        before = count_nodes(model)
        if graph_pass.name in disabled:
            records.append(PassRecord(graph_pass.name, "disabled", before, before, 0.0))
            continue
        start = time.perf_counter()
        try:
            candidate = graph_pass.run(model, cfg)
            onnx.checker.check_model(candidate)
        except ClipExportError:
            raise
        except Exception as exc:  # noqa: BLE001 - third-party passes fail in many ways
            if graph_pass.required:
                raise ClipExportError(f"pass {graph_pass.name} failed on the {cfg.tower} tower: {exc}") from exc
            detail = f"kept the graph unchanged: {type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
            records.append(PassRecord(graph_pass.name, "failed", before, before, time.perf_counter() - start, detail))
            log(f"pass {graph_pass.name} failed on the {cfg.tower} tower; {detail}")
            continue
        model = candidate
        after = count_nodes(model)
        records.append(PassRecord(graph_pass.name, "applied", before, after, time.perf_counter() - start))
        log(f"{graph_pass.name}: {before} -> {after} nodes")
    return model, records
