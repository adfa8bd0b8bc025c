"""Reading an engine's layer information (IEngineInspector, JSON format) and checking that
every attention block became one fused attention kernel.

With ProfilingVerbosity.DETAILED, TensorRT describes the engine as

    {"Layers": [{"Name": ..., "LayerType": ..., "Inputs": [...], "Outputs": [...],
                 "TacticName": ..., "Metadata": "[ONNX Layer: <node>]\x1f[ONNX Layer: <node>]", ...}, ...],
     "Bindings": ["pixel_values", "image_embeds"]}

and with LAYER_NAMES_ONLY, "Layers" is a list of plain names. "Metadata" names the ONNX
nodes each engine layer was built from; that is how an attention block (one ONNX
`Attention` node, one plugin node, or a MatMul-Softmax-MatMul chain) is traced to the
kernels that run it. A block is fused when one engine layer covers it and that layer is
an attention kernel (fMHA / flash / TensorRT's attention layer / our plugin); a block
split over separate GEMM and softmax layers is not, and it is what makes engines slow.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from clipexport.errors import EngineError

_ONNX_LAYER = re.compile(r"\[ONNX Layer: ([^\]\x1f]+)\]")
# How TensorRT labels fused attention: fmha_v2_* / *_mha_* / flash* kernels (tactic or layer
# names) and its attention layer type. "attention" alone is only trusted in LayerType and
# TacticName: a layer *name* comes from the ONNX node, which says Attention even when TensorRT
# decomposed it.
_KERNEL_MARKERS = re.compile(r"fmha|flash|(^|[^a-z])mha([^a-z]|$)", re.IGNORECASE)
_TYPE_MARKERS = re.compile(r"fmha|flash|mha|attention", re.IGNORECASE)
_UNFUSED_TYPES = re.compile(r"softmax|gemm|matrixmultiply|matmul|reduce|elementwise|pointwise", re.IGNORECASE)


@dataclass(frozen=True)
class EngineLayer:
    name: str
    layer_type: str = ""  # empty in a LAYER_NAMES_ONLY description
    tactic: str = ""
    onnx_nodes: tuple[str, ...] = ()

    def looks_fused_attention(self, plugin_names: Sequence[str] = ()) -> bool:
        if any(p and (p in self.name or p in self.tactic) for p in plugin_names):
            return True  # our plugin is one fused kernel by construction
        if self.layer_type and _UNFUSED_TYPES.search(self.layer_type) and not _TYPE_MARKERS.search(self.layer_type):
            return False  # a GEMM or softmax layer runs one piece of the block, whatever its name says
        return bool(
            _TYPE_MARKERS.search(self.layer_type)
            or _TYPE_MARKERS.search(self.tactic)
            or _KERNEL_MARKERS.search(self.name)
        )


@dataclass(frozen=True)
class LayerInformation:
    layers: tuple[EngineLayer, ...]
    bindings: tuple[str, ...]
    detailed: bool  # False: built without ProfilingVerbosity.DETAILED, little can be checked

    def layers_of(self, onnx_node: str) -> list[EngineLayer]:
        return [layer for layer in self.layers if onnx_node in layer.onnx_nodes]


def parse_layer_information(text: str) -> LayerInformation:
    """Parse IEngineInspector.get_engine_information(LayerInformationFormat.JSON)."""
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise EngineError(f"engine layer information is not JSON: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("Layers"), list):
        raise EngineError("engine layer information has no 'Layers' list")
    layers: list[EngineLayer] = []
    detailed = False
    for index, item in enumerate(data["Layers"]):
        if isinstance(item, str):
            layers.append(EngineLayer(name=item))
        elif isinstance(item, dict):
            detailed = True
            layers.append(_layer(item))
        else:
            raise EngineError(f"engine layer {index} is neither a name nor an object: {item!r}")
    bindings = tuple(str(b) for b in data.get("Bindings", []) if isinstance(b, str))
    return LayerInformation(tuple(layers), bindings, detailed)


def _layer(item: dict[str, Any]) -> EngineLayer:
    metadata = str(item.get("Metadata", "") or "")
    return EngineLayer(
        name=str(item.get("Name", "")),
        layer_type=str(item.get("LayerType", "") or ""),
        tactic=str(item.get("TacticName", "") or ""),
        onnx_nodes=tuple(m.strip() for m in _ONNX_LAYER.findall(metadata)),
    )


@dataclass
class AttentionReport:
    """Per attention block (named by its ONNX node): fused, not fused, or not traceable."""

    expected: int
    fused: list[str] = field(default_factory=list)
    unfused: list[str] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)
    fused_layers: int = 0  # engine layers that look like attention kernels

    @property
    def ok(self) -> bool:
        return len(self.fused) == self.expected and not self.unfused and not self.unknown

    def summary(self) -> str:
        text = f"attention: {len(self.fused)}/{self.expected} blocks fused"
        if self.unfused:
            text += f"; NOT fused: {', '.join(self.unfused[:4])}{' ...' if len(self.unfused) > 4 else ''}"
        if self.unknown:
            text += f"; not traceable in the engine: {len(self.unknown)}"
        return text

    def to_json(self) -> dict[str, Any]:
        return {"expected": self.expected, "fused": len(self.fused), "unfused": self.unfused,
                "unknown": self.unknown, "ok": self.ok}


def check_attention_fusion(
    info: LayerInformation,
    attention_nodes: Sequence[str],
    plugin_names: Sequence[str] = (),
) -> AttentionReport:
    """Did each attention block (its ONNX node names) become a fused attention kernel?"""
    report = AttentionReport(expected=len(attention_nodes))
    report.fused_layers = sum(1 for layer in info.layers if layer.looks_fused_attention(plugin_names))
    if not info.detailed:
        # Names only: no metadata to trace blocks; fall back to counting attention-like layers.
        report.unknown = list(attention_nodes)
        return report
    for node in attention_nodes:
        covering = info.layers_of(node)
        if not covering:
            report.unknown.append(node)
        elif any(layer.looks_fused_attention(plugin_names) for layer in covering):
            report.fused.append(node)
        else:
            report.unfused.append(node)
    return report


def warn_unfused(report: AttentionReport, tower: str, warn: Callable[[str], None]) -> None:
    """Say loudly when attention did not fuse: such engines can be slower than PyTorch."""
    if report.ok:
        return
    bar = "!" * 78
    lines = [bar, f"WARNING: {tower} tower: {report.summary()}."]
    if report.unfused:
        lines.append("  These blocks run as separate GEMM + softmax kernels: expect a slow engine.")
        lines.append("  Use TensorRT 10.14+ (native attention) or build with the clipexport attention plugin.")
    if report.unknown:
        lines.append("  The engine's layer information does not name these blocks (was it built with "
                     "ProfilingVerbosity.DETAILED?); fusion could not be verified.")
    lines.append(bar)
    for line in lines:
        warn(line)


def attention_nodes_of(model: Any, plugin_op: str = "") -> list[str]:
    """Names of the ONNX nodes that stand for one attention block each: `Attention` nodes,
    our plugin nodes, or (decomposed graphs) each Softmax that feeds a MatMul.

    Nodes without a name get none here: TensorRT names such layers after their outputs.
    """
    names: list[str] = []
    consumers: dict[str, list[Any]] = {}
    nodes: Iterable[Any] = model.graph.node
    for node in nodes:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    for node in model.graph.node:
        if node.op_type == "Attention" or (plugin_op and node.op_type == plugin_op) or node.op_type == "Softmax" and any(c.op_type == "MatMul" for c in consumers.get(node.output[0], [])):
            names.append(node.name)
    return names
