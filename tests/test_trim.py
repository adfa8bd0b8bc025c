"""Exact text-length trimming: a text graph with a dynamic 'sequence' axis, fed max EOT + 1
columns, gives the embeddings of the full 77-token PyTorch reference."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from twins import TWINS, write_twin

from clipexport.build import _export_module
from clipexport.errors import UnsupportedModelError
from clipexport.export import export_tower
from clipexport.models import load_reference
from clipexport.models.towers import TrimmableTextTower, attention_blocks, text_tower, untrimmable_reason
from clipexport.passes import PassConfig, run_passes
from clipexport.prompts import PARITY_PROMPTS
from clipexport.recipes import BatchRange, load_recipes
from clipexport.verify import compare, trim_to_eot

# Families whose recipe exports a causal text tower trimmed after EOT (the Hugging Face text tower
# trims after its longest unpadded row instead: tested at the end of this file).
TRIMMABLE = sorted(f for f in TWINS if load_recipes()[f].towers["text"].dynamic_sequence and f != "hf_text")


@pytest.fixture(scope="module", params=TRIMMABLE)
def exported(request, tmp_path_factory):
    """(reference, full-length tower, ORT session of the trimmable text graph) per recipe twin."""
    family = request.param
    ref = load_reference(write_twin(family, tmp_path_factory.mktemp(family)), "none", seed=2)
    spec = load_recipes()[family].towers["text"]
    # as the build decides: open_clip's TrimmableTextTower, or transformers' CLIP text tower itself
    trimmable = _export_module(ref, ref.tower("text"), trim=True)
    graph = export_tower(trimmable, ref.tokenizer()(["a", "b"]), spec, BatchRange(1, 8, 64), 23,
                         max_sequence=ref.context_length)
    graph, records = run_passes(graph, PassConfig(tower="text", precision="fp32", trim_text=True,
                                                  attention_blocks=attention_blocks(trimmable)))
    assert {r.name: r.status for r in records}["trim_text"] == "applied"
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    return ref, ref.tower("text"), graph, session


def _run(session: ort.InferenceSession, ids: np.ndarray) -> np.ndarray:
    return session.run(None, {"input_ids": ids})[0]


def test_graph_input_is_batch_by_sequence(exported):
    _, _, graph, _ = exported
    (ids,) = graph.graph.input
    assert [d.dim_param for d in ids.type.tensor_type.shape.dim] == ["batch", "sequence"]
    assert ids.type.tensor_type.elem_type == onnx.TensorProto.INT64  # ids never become floats
    # nothing in the graph turns the ids into floats
    ids_consumers = [n for n in graph.graph.node if "input_ids" in n.input]
    assert all(not (n.op_type == "Cast" and n.attribute[0].i in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16))
               for n in ids_consumers)


def test_trimmable_tower_is_the_builtin_tower_at_full_length(exported):
    ref, full, _, _ = exported
    ids = ref.tokenizer()(list(PARITY_PROMPTS))
    with torch.no_grad():
        if hasattr(ref.model, "encode_text"):  # open_clip
            assert torch.equal(TrimmableTextTower(ref.model)(ids), full(ids))
            assert torch.equal(full(ids), ref.model.encode_text(ids))
        else:  # transformers' CLIPModel: the tower is its own get_text_features
            assert torch.equal(full(ids), ref.model.get_text_features(input_ids=ids).pooler_output)


@pytest.mark.parametrize("prompt_index", range(len(PARITY_PROMPTS)))
def test_each_prompt_trimmed_matches_the_77_token_reference(exported, prompt_index):
    ref, full, _, session = exported
    ids = ref.tokenizer()([PARITY_PROMPTS[prompt_index]])
    with torch.no_grad():
        want = full(ids).numpy()
    trimmed = trim_to_eot(ids.numpy())
    assert trimmed.shape[1] == int(ids.argmax()) + 1 or trimmed.shape[1] == 2
    parity = compare(want, _run(session, trimmed), 1)
    assert parity.cosine_min >= 0.99999 and parity.max_rel_err < 1e-4, parity


def test_every_length_from_eot_to_context_gives_the_same_embedding(exported):
    """Columns after EOT change nothing: lengths EOT+1 .. 77 all match the full reference."""
    ref, full, _, session = exported
    ids = ref.tokenizer()(["a photo of a dog.", "a blurry photo of a tabby cat sleeping on a red sofa.", ""])
    with torch.no_grad():
        want = full(ids).numpy()
    shortest = trim_to_eot(ids.numpy()).shape[1]
    assert shortest < 20  # the batch's longest prompt is short: trimming removes most columns
    for length in sorted({shortest, shortest + 1, 20, 50, 76, 77}):
        parity = compare(want, _run(session, np.ascontiguousarray(ids.numpy()[:, :length])), 3)
        assert parity.cosine_min >= 0.99999 and parity.max_abs_err < 1e-4, (length, parity)


def test_cutting_before_eot_is_wrong_and_parity_sees_it(exported):
    """The check can fail: one column short of the EOT changes the embedding."""
    ref, full, _, session = exported
    ids = ref.tokenizer()(["a blurry photo of a tabby cat sleeping on a red sofa."])
    with torch.no_grad():
        want = full(ids).numpy()
    eot = int(ids.argmax())
    assert compare(want, _run(session, ids.numpy()[:, :eot]), 1).max_rel_err > 1e-3


def test_trim_to_eot_keeps_max_eot_plus_one_columns():
    ids = np.zeros((3, 77), np.int64)
    ids[0, :3] = [49406, 10, 49407]
    ids[1, :6] = [49406, 1, 2, 3, 4, 49407]
    ids[2, :2] = [49406, 49407]
    assert trim_to_eot(ids).shape == (3, 6)
    assert trim_to_eot(ids[2:]).shape == (1, 2)
    assert trim_to_eot(np.zeros((1, 77), np.int64)).shape == (1, 2)  # never below SOT + EOT


def test_models_where_trimming_is_not_exact_keep_a_fixed_length(tmp_path):
    """CLIPA-style text (no causal mask, last-token pooling) cannot be trimmed: say why, export 77."""
    cfg = json.loads(json.dumps(TWINS["vit"]))
    cfg["text_cfg"].update({"no_causal_mask": True, "pool_type": "last"})
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}))
    ref = load_reference(f"local-dir:{tmp_path}", "none")
    reason = untrimmable_reason(ref.model)
    assert "pooling" in reason or "causal" in reason
    with pytest.raises(UnsupportedModelError, match="cannot be trimmed"):
        text_tower(ref.model, trimmable=True)


def test_build_manifest_declares_the_sequence_axis(twin, tmp_path):
    from clipexport.build import BuildOptions, build

    result = build(BuildOptions(model=twin("vit"), pretrained="none", towers=["text"], out=tmp_path / "a"))
    text = result.manifest["towers"]["text"]
    assert text["inputs"] == [{"name": "input_ids", "dtype": "int64", "shape": ["batch", "sequence"]}]
    assert text["sequence"]["axis"] == "sequence" and text["sequence"]["max"] == 77
    parity = text["parity"]
    # build parity ran trimmed inputs (several lengths) against the full-length reference
    assert parity["passed"] and len(set(parity["trimmed_lengths"])) >= 2 and min(parity["trimmed_lengths"]) < 77
    assert parity["cosine_min"] >= 0.99999


def test_hugging_face_text_tower_trims_after_its_longest_unpadded_row(twin, tmp_path):
    """XLM-R-style ids are right-padded with pad id 1; the padding mask makes cutting them exact."""
    import clipexport
    from clipexport.build import BuildOptions, build

    model = twin("hf_text")
    out = tmp_path / "art"
    result = build(BuildOptions(model=model, pretrained="none", towers=["text"], out=out))
    sequence = result.manifest["towers"]["text"]["sequence"]
    assert sequence["axis"] == "sequence" and sequence["pad_id"] == 1
    parity = result.parity["text"]
    assert min(parity.trimmed_lengths) < 20 and parity.cosine_min >= 0.99999 and parity.max_rel_err < 1e-4

    ref = load_reference(model, "none", seed=0)
    texts = ["a photo of the dog", "a red car at night on the sea with two people", "cat"]
    ids = ref.tokenizer()(texts)
    assert int(ids[2, -1]) == 1  # right-padded with the pad id
    with torch.no_grad():
        want = ref.tower("text")(ids).numpy()
    runtime = clipexport.load(out, backend="onnxruntime")
    assert runtime.trims_text
    got = runtime.encode_tokens(ids.numpy(), normalize=False)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)

    # the check can fail: one column short of the longest row changes that row's embedding
    session = ort.InferenceSession(str(out / "text.onnx"), providers=["CPUExecutionProvider"])
    keep = trim_to_eot(ids.numpy(), pad_id=1).shape[1]
    assert keep < 20
    short = _run(session, np.ascontiguousarray(ids.numpy()[:, : keep - 1]))
    assert compare(want, short, 3).max_rel_err > 1e-3
