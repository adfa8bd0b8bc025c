"""Towers equal open_clip's encode_* exactly; exported graphs have a dynamic batch and match on ORT."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from clipexport.build import parity_batch_sizes, tower_parity
from clipexport.export import export_tower
from clipexport.models import load_reference
from clipexport.models.towers import attention_blocks
from clipexport.passes import PassConfig, count_nodes, run_passes
from clipexport.recipes import BatchRange, load_recipes, recipe_for
from twins import TWINS


@pytest.fixture(scope="module", params=sorted(TWINS))
def reference(request, tmp_path_factory):
    from twins import write_twin

    name = write_twin(request.param, tmp_path_factory.mktemp(request.param))
    return request.param, load_reference(name, "none", seed=3)


def _library_encode(ref, tower: str, x: torch.Tensor) -> torch.Tensor:
    """The source library's own embedding call: open_clip's encode_*, transformers' get_*_features."""
    if ref.families.image == "hf-clip-vision":
        out = (ref.model.get_image_features(pixel_values=x) if tower == "image"
               else ref.model.get_text_features(input_ids=x))
        return out.pooler_output
    # unnormalized, as the towers are (CoCa's encode_* normalize by default, CLIP's do not)
    return ref.model.encode_image(x, normalize=False) if tower == "image" else ref.model.encode_text(x, normalize=False)


def test_towers_are_exactly_encode_image_and_encode_text(reference):
    _, ref = reference
    pixels = torch.randn(3, 3, ref.image_size, ref.image_size)
    ids = ref.tokenizer()(["a photo of a cat.", "", "x " * 100])
    with torch.no_grad():
        assert torch.equal(ref.tower("image")(pixels), _library_encode(ref, "image", pixels))
        assert torch.equal(ref.tower("text")(ids), _library_encode(ref, "text", ids))
    if ref.families.image != "hf-clip-vision":
        # open_clip's built-in text tower holds only text weights (CLIPModel's towers wrap the whole
        # model; its exported graphs keep only the weights they use: see test_hf_clip)
        text_params = {id(p) for p in ref.tower("text").parameters()}
        assert not text_params & {id(p) for p in ref.model.visual.parameters()}


def test_seeded_random_weights_are_reproducible(reference):
    _, ref = reference
    again = load_reference(ref.name, "none", seed=3)
    other = load_reference(ref.name, "none", seed=4)
    a, b, c = (dict(m.model.state_dict()) for m in (ref, again, other))
    # open_clip leaves CoCa's caption decoder's text_projection as torch.empty (its init_parameters
    # is never called): uninitialized memory, different run to run; the decoder is not exported
    a = {k: v for k, v in a.items() if not k.startswith("text_decoder.")}
    assert a and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point())


@pytest.mark.parametrize("tower", ["image", "text"])
def test_export_has_dynamic_batch_and_matches_on_onnxruntime(reference, tower, tmp_path):
    family, ref = reference
    recipe = load_recipes()[family]
    spec = recipe.towers[tower]
    module = ref.tower(tower)
    example = (
        torch.randn(2, 3, ref.image_size, ref.image_size) if tower == "image" else ref.tokenizer()(["a", "b"])
    )
    fuse = recipe.attention == "onnx"  # timm and Hugging Face towers export attention unfused
    graph = export_tower(module, example, spec, BatchRange(1, 4, 16), recipe.opset, fuse_attention=fuse)
    graph, records = run_passes(graph, PassConfig(tower=tower, precision="fp32",
                                                  attention_blocks=attention_blocks(module)),
                                disabled=[] if fuse else ["fuse_attention"])
    applied = [r.name for r in records if r.status == "applied"]
    assert applied == (["simplify", "fuse_attention"] if fuse else ["simplify"]) + ["merge_projections"]
    assert records[0].status == "applied"
    assert records[-1].nodes_after == count_nodes(graph) <= records[0].nodes_before

    (inp,), (out,) = graph.graph.input, graph.graph.output
    assert inp.name == spec.input_name and out.name == spec.output_name
    assert inp.type.tensor_type.shape.dim[0].dim_param == "batch"
    if tower == "text":
        # token ids stay integers end to end
        assert inp.type.tensor_type.elem_type == onnx.TensorProto.INT64
        assert [d.dim_value for d in inp.type.tensor_type.shape.dim[1:]] == [ref.context_length]  # CoCa: 76
    path = tmp_path / f"{tower}.onnx"
    onnx.save(graph, str(path))
    sizes = parity_batch_sizes(recipe, BatchRange(1, 4, 16))
    assert sizes == [1, 3, 8, 16]  # the recipe's sizes in the range, and the range's max
    parity = tower_parity(ref, tower, module, path, spec, recipe.tolerance("fp32"), sizes, 0, "fp32")
    assert [b.batch_size for b in parity.batches] == [1, 3, 8, 16]
    assert parity.passed, parity.summary()
    assert parity.cosine_min > 0.99999 and parity.max_rel_err < 1e-4


def test_parity_catches_a_wrong_graph(reference, tmp_path):
    """Scale the output projection of the exported graph by 1%: the gate must see it."""
    family, ref = reference
    recipe = load_recipes()[family]
    spec = recipe.towers["image"]
    module = ref.tower("image")
    graph = export_tower(module, torch.randn(2, 3, ref.image_size, ref.image_size), spec, BatchRange(1, 4, 16),
                         recipe.opset, fuse_attention=recipe.attention == "onnx")
    initializers = {t.name: t for t in graph.graph.initializer}
    last_matmul = next(n for n in reversed(graph.graph.node) if n.op_type in ("MatMul", "Gemm")
                       and any(i in initializers for i in n.input))
    weight = initializers[next(i for i in last_matmul.input if i in initializers)]
    array = onnx.numpy_helper.to_array(weight) * 1.01
    weight.CopyFrom(onnx.numpy_helper.from_array(array.astype(np.float32), weight.name))
    path = tmp_path / "wrong.onnx"
    onnx.save(graph, str(path))
    parity = tower_parity(ref, "image", module, path, spec, recipe.tolerance("fp32"), [1, 3], 0, "fp32")
    assert not parity.passed
    assert parity.max_rel_err > 1e-4


def test_parity_batch_sizes_follow_the_build_range():
    recipe = recipe_for(__import__("clipexport.models.architecture", fromlist=["x"]).families_of(TWINS["vit"]), "t")
    assert parity_batch_sizes(recipe, BatchRange(4, 8, 16)) == [4, 8, 16]  # the range's max too
    assert parity_batch_sizes(recipe, BatchRange(1, 1, 1)) == [1]
