"""Attention fusion: every attention block of a tower is one ONNX `Attention` node (opset 23).

The fusion itself happens at export: torch's exporter lowers scaled_dot_product_attention
(called by nn.MultiheadAttention and by ModifiedResNet's attention pooling) to `Attention`
at opset >= 23. This pass is the gate: it counts the fused nodes against the model's
attention blocks and fails the build when they differ, instead of shipping a graph where
some blocks silently stayed as MatMul/Softmax/MatMul.

    q ─┐
    k ─┼─► Attention(is_causal | attn_mask) ─► [B, H, S, d]      one node per block
    v ─┘
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import onnx

from clipexport.errors import PassError

if TYPE_CHECKING:
    from clipexport.passes import PassConfig

# Decomposed attention leaves a Softmax per block; a fused graph has none.
_UNFUSED_MARKERS = ("Softmax",)


def attention_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """The fused attention nodes of the main graph: ONNX `Attention` and com.microsoft's MultiHeadAttention."""
    return [
        n for n in model.graph.node
        if (n.op_type == "Attention" and n.domain in ("", "ai.onnx"))
        or (n.op_type == "MultiHeadAttention" and n.domain == "com.microsoft")
    ]


def fuse_attention(model: onnx.ModelProto, cfg: PassConfig) -> onnx.ModelProto:
    """Check that the graph has exactly one fused attention node per attention block."""
    if cfg.attention_blocks is None:
        raise PassError("fuse_attention needs the tower's attention block count (PassConfig.attention_blocks)")
    fused = attention_nodes(model)
    leftovers = sum(n.op_type in _UNFUSED_MARKERS for n in model.graph.node)
    if len(fused) != cfg.attention_blocks or leftovers:
        raise PassError(
            f"attention fusion on the {cfg.tower} tower: {len(fused)} fused attention nodes for "
            f"{cfg.attention_blocks} attention blocks ({leftovers} unfused Softmax left). "
            "Build with --no-fuse-attention to export attention as plain MatMul/Softmax."
        )
    ops = sorted({f"{n.domain + '.' if n.domain else ''}{n.op_type}" for n in fused})
    cfg.notes.append(f"{len(fused)} fused attention nodes ({', '.join(ops) or 'none'}) for {cfg.attention_blocks} blocks")
    cfg.details["attention"] = {"lowering": "onnx", "fused_nodes": len(fused), "blocks": cfg.attention_blocks,
                                "ops": ops}
    return model


def check_unfused(model: onnx.ModelProto, cfg: PassConfig) -> int:
    """With fusion off, no block may carry a fused node (a half-fused graph is the worst of both)."""
    fused = attention_nodes(model)
    if fused:
        raise PassError(f"{cfg.tower} tower: fusion is off but the graph has {len(fused)} fused attention nodes")
    return sum(n.op_type == "Softmax" for n in model.graph.node)
