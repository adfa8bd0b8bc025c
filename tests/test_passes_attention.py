"""Attention fusion: one ONNX Attention node per attention block of every tower, counted; a
count that differs fails the build; --no-fuse-attention exports MatMul/Softmax/MatMul."""

from __future__ import annotations

import collections

import onnx
import pytest
import torch
from twins import TINY_XLMR, TWINS, write_twin

from clipexport.errors import PassError
from clipexport.export import export_tower
from clipexport.models import load_reference
from clipexport.models.towers import attention_blocks
from clipexport.passes import PIPELINE, PassConfig, run_passes
from clipexport.passes.fuse_attention import attention_nodes, check_unfused, fuse_attention
from clipexport.recipes import BatchRange, load_recipes

# Attention blocks of each twin, from its config: ViT blocks + text blocks; ModifiedResNet's
# attention pooling is its image tower's one attention.
EXPECTED = {
    ("vit", "image"): TWINS["vit"]["vision_cfg"]["layers"],
    ("vit", "text"): TWINS["vit"]["text_cfg"]["layers"],
    ("modified_resnet", "image"): 1,
    ("modified_resnet", "text"): TWINS["modified_resnet"]["text_cfg"]["layers"],
    # a ViT image tower and a 2-layer XLM-R whose attention transformers runs through SDPA
    ("hf_text", "image"): TWINS["hf_text"]["vision_cfg"]["layers"],
    ("hf_text", "text"): TINY_XLMR["num_hidden_layers"],
    # CoCa: ViT blocks plus the attentional pooler (one cross-attention), and the text blocks
    ("coca", "image"): TWINS["coca"]["vision_cfg"]["layers"] + 1,
    ("coca", "text"): TWINS["coca"]["text_cfg"]["layers"],
    # transformers' CLIPModel twin (twins.write_tiny_hf_clip): 2 vision and 2 text layers, SDPA attention
    ("hf_clip", "image"): 2,
    ("hf_clip", "text"): 2,
}


# Recipes that lower attention to ONNX Attention (the timm recipe exports it unfused).
FUSED = sorted(f for f in TWINS if load_recipes()[f].attention == "onnx")


def test_fused_families_are_the_ones_with_expected_counts():
    assert set(FUSED) == {family for family, _ in EXPECTED}


@pytest.fixture(scope="module", params=FUSED)
def reference(request, tmp_path_factory):
    return request.param, load_reference(write_twin(request.param, tmp_path_factory.mktemp(request.param)), "none")


def _export(ref, family: str, tower: str, fuse: bool) -> tuple[torch.nn.Module, onnx.ModelProto]:
    recipe = load_recipes()[family]
    module = ref.tower(tower)  # open_clip's image_tower/text_tower, or a transformers CLIPModel's
    example = torch.randn(2, 3, ref.image_size, ref.image_size) if tower == "image" else ref.tokenizer()(["a", "b"])
    return module, export_tower(module, example, recipe.towers[tower], BatchRange(1, 4, 16), recipe.opset,
                                fuse_attention=fuse)


def test_pipeline_order_is_the_designed_one():
    assert [p.name for p in PIPELINE] == ["simplify", "fuse_attention", "trim_text", "merge_projections", "precision",
                                         "quantize"]


@pytest.mark.parametrize("tower", ["image", "text"])
def test_fused_node_count_equals_attention_blocks(reference, tower):
    family, ref = reference
    module, graph = _export(ref, family, tower, fuse=True)
    assert attention_blocks(module) == EXPECTED[(family, tower)]
    cfg = PassConfig(tower=tower, precision="fp32", attention_blocks=attention_blocks(module))
    graph, records = run_passes(graph, cfg)
    ops = collections.Counter(n.op_type for n in graph.graph.node)
    assert ops["Attention"] == EXPECTED[(family, tower)]
    assert ops["Softmax"] == 0  # no block left decomposed
    assert {r.name: r.status for r in records}["fuse_attention"] == "applied"
    assert cfg.details["attention"]["fused_nodes"] == cfg.details["attention"]["blocks"] == EXPECTED[(family, tower)]
    if tower == "text":
        # the causal text blocks carry their mask into the fused node
        assert all(len([i for i in n.input if i]) == 4 or any(a.name == "is_causal" and a.i for a in n.attribute)
                   for n in attention_nodes(graph))


def test_a_fusion_that_misses_a_block_is_an_error(reference):
    family, ref = reference
    module, graph = _export(ref, family, "image", fuse=True)
    blocks = attention_blocks(module)
    with pytest.raises(PassError, match=f"{blocks} fused attention nodes for {blocks + 1} attention blocks"):
        fuse_attention(graph, PassConfig(tower="image", precision="fp32", attention_blocks=blocks + 1))
    # and the pipeline does not swallow it (the pass is required)
    with pytest.raises(PassError):
        run_passes(graph, PassConfig(tower="image", precision="fp32", attention_blocks=blocks + 1))


def test_unfused_export_has_no_attention_node_and_the_gate_refuses_it(reference):
    family, ref = reference
    module, graph = _export(ref, family, "text", fuse=False)
    cfg = PassConfig(tower="text", precision="fp32", attention_blocks=attention_blocks(module))
    assert attention_nodes(graph) == []
    assert check_unfused(graph, cfg) == EXPECTED[(family, "text")]  # one Softmax per block
    with pytest.raises(PassError, match="0 fused attention nodes"):
        fuse_attention(graph, cfg)


@pytest.mark.parametrize("family", FUSED)
def test_build_records_fusion_and_no_fuse_build_passes_parity(twin, tmp_path, family):
    from clipexport.build import BuildOptions, build

    model = twin(family)
    fused = build(BuildOptions(model=model, pretrained="none", out=tmp_path / "fused"))
    for tower in ("image", "text"):
        t = fused.manifest["towers"][tower]
        assert t["attention"]["fused_nodes"] == t["attention"]["blocks"] == EXPECTED[(family, tower)]
        assert t["parity"]["passed"] and t["parity"]["cosine_min"] >= 0.99999
        assert [r["name"] for r in t["passes"] if r["status"] == "applied"][:2] == ["simplify", "fuse_attention"]
    plain = build(BuildOptions(model=model, pretrained="none", out=tmp_path / "plain",
                               disabled_passes=["fuse_attention"]))
    for tower in ("image", "text"):
        t = plain.manifest["towers"][tower]
        assert t["attention"]["lowering"] == "none" and t["attention"]["softmax_nodes"] == EXPECTED[(family, tower)]
        assert {r["name"]: r["status"] for r in t["passes"]}["fuse_attention"] == "disabled"
        assert t["parity"]["passed"] and t["parity"]["cosine_min"] >= 0.99999
