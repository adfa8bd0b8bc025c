"""Graph passes: named functions `ModelProto -> ModelProto`, run from one ordered list.

Each run is recorded (name, status, node counts before/after, seconds) and the record
goes into the manifest. An optional pass that fails leaves the graph as it was and says
so in its record; a required pass that fails stops the build.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import onnx

from clipexport.errors import ClipExportError, PassError, UsageError
from clipexport.passes.fuse_attention import fuse_attention
from clipexport.passes.merge_projections import merge_projections
from clipexport.passes.precision import PrecisionPolicy, apply_precision
from clipexport.passes.quantize import QuantPolicy, quantize
from clipexport.passes.simplify import simplify
from clipexport.passes.trim_text import trim_text


@dataclass
class PassConfig:
    """What the passes need to know about one tower's build.

    calibration: sample inputs of the tower (numpy arrays fed to its one input), for the
    fp16 range guard and the int8/fp8 activation scales. notes: passes append one-line
    findings here; the build copies them into the manifest.
    """

    tower: str  # "image" or "text"
    precision: str
    attention_blocks: int | None = None  # fused attention nodes the graph must have
    trim_text: bool = False  # the text graph has a dynamic 'sequence' axis
    precision_policy: PrecisionPolicy = field(default_factory=PrecisionPolicy)
    quant_policy: QuantPolicy = field(default_factory=QuantPolicy)
    calibration: Sequence[Any] = ()
    # The weights live in an external data file and are not loaded (towers over 2 GB): only
    # passes that read the graph's structure run; see WEIGHT_PASSES.
    external_weights: bool = False
    notes: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)  # per-pass structured results


@dataclass(frozen=True)
class GraphPass:
    name: str
    run: Callable[[onnx.ModelProto, PassConfig], onnx.ModelProto]
    required: bool  # a failure of a required pass fails the build
    summary: str


@dataclass
class PassRecord:
    name: str
    status: str  # "applied", "failed" (graph left as it was), "disabled" or "skipped" (not for this build)
    nodes_before: int
    nodes_after: int
    seconds: float
    detail: str = ""

    def to_json(self) -> dict[str, object]:
        return asdict(self)


PIPELINE: tuple[GraphPass, ...] = (
    GraphPass("simplify", simplify, required=False, summary="constant folding and dead-node removal (onnxslim)"),
    GraphPass("fuse_attention", fuse_attention, required=True,
              summary="one ONNX Attention node per attention block, counted against the model"),
    GraphPass("trim_text", trim_text, required=True,
              summary="text token ids with a dynamic 'sequence' axis (exact EOT trimming)"),
    GraphPass("merge_projections", merge_projections, required=False,
              summary="sibling projections of one activation (q/k/v) as one MatMul + Split"),
    GraphPass("precision", apply_precision, required=True,
              summary="fp16/bf16 written into the graph, safe ops and overflow-prone nodes kept fp32"),
    GraphPass("quantize", quantize, required=True,
              summary="int8/fp8 Q/DQ: per-channel weights, calibrated activations"),
)
# Passes that rewrite weights: they need every tensor in memory, so a graph whose weights stay
# in external data skips them here, and the build runs its own external-data version of those
# it has (simplify with onnxscript's optimizer, precision weight by weight); quantize has none.
WEIGHT_PASSES = ("simplify", "merge_projections", "precision", "quantize")
EXTERNAL_SKIP = {
    "merge_projections": "weights in external data (a tower over protobuf's 2 GB): concatenating them needs "
                         "them in memory",
    "simplify": "weights in external data (a tower over protobuf's 2 GB): onnxslim needs the whole graph "
                "in memory; the build simplifies with onnxscript over the memory-mapped data instead",
    "precision": "weights in external data (a tower over protobuf's 2 GB): the build converts them weight "
                 "by weight over the data file after the graph passes",
}
EXTERNAL_UNSUPPORTED = ("int8 and fp8 builds of a tower whose weights go to external data (over the large-tower "
                        "size) are not supported: quantization needs every weight in memory; build it in fp32, "
                        "fp16 or bf16")
# Passes that only make sense for some builds say so in their record instead of "applied".
_ACTIVE: dict[str, Callable[[PassConfig], bool]] = {
    "trim_text": lambda cfg: cfg.tower == "text" and cfg.trim_text,
    "precision": lambda cfg: cfg.precision in ("fp16", "bf16"),
    "quantize": lambda cfg: cfg.precision in ("int8", "fp8"),
}


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
    for name in ("precision", "quantize"):
        if name in disabled and _ACTIVE[name](cfg):
            # A disabled precision pass would ship an fp32 graph labelled fp16/int8.
            raise UsageError(f"pass {name!r} cannot be disabled in a {cfg.precision} build; build fp32 instead")
    records: list[PassRecord] = []
    for graph_pass in PIPELINE:
        before = count_nodes(model)
        if graph_pass.name in disabled:
            records.append(PassRecord(graph_pass.name, "disabled", before, before, 0.0))
            continue
        active = _ACTIVE.get(graph_pass.name, lambda _cfg: True)(cfg)
        if cfg.external_weights and graph_pass.name in WEIGHT_PASSES and active:
            if graph_pass.name not in EXTERNAL_SKIP:
                raise UsageError(f"{EXTERNAL_UNSUPPORTED} (the {graph_pass.name} pass needs every weight in memory)")
            records.append(PassRecord(graph_pass.name, "skipped", before, before, 0.0, EXTERNAL_SKIP[graph_pass.name]))
            continue
        if not active:
            records.append(PassRecord(graph_pass.name, "skipped", before, before, 0.0,
                                      f"not used for a {cfg.precision} {cfg.tower} tower"))
            continue
        start = time.perf_counter()
        notes_before = len(cfg.notes)
        try:
            candidate = graph_pass.run(model, cfg)
            if not cfg.external_weights:  # an external-data graph is checked from its file once written
                onnx.checker.check_model(candidate)
        except ClipExportError:
            raise
        except Exception as exc:
            if graph_pass.required:
                raise PassError(f"pass {graph_pass.name} failed on the {cfg.tower} tower: {exc}") from exc
            detail = f"kept the graph unchanged: {type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
            records.append(PassRecord(graph_pass.name, "failed", before, before, time.perf_counter() - start, detail))
            log(f"pass {graph_pass.name} failed on the {cfg.tower} tower; {detail}")
            continue
        model = candidate
        after = count_nodes(model)
        detail = "; ".join(cfg.notes[notes_before:])
        seconds = time.perf_counter() - start
        records.append(PassRecord(graph_pass.name, "applied", before, after, seconds, detail))
        log(f"{graph_pass.name}: {before} -> {after} nodes in {seconds:.1f}s" + (f" ({detail})" if detail else ""))
    return model, records
