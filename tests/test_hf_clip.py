"""transformers CLIPModel as a source: from a CLIPConfig directory and from save_pretrained weights."""

from __future__ import annotations

import collections
import json
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner

import clipexport
from clipexport.build import BuildOptions, build, verify_artifact
from clipexport.cli import cli
from twins import write_tiny_hf_clip

PROMPTS = ["a photo of a dog.", "a diagram", "東京の夜景の写真", ""]


def test_from_a_clip_config_with_random_weights(tmp_path):
    model = write_tiny_hf_clip(tmp_path / "cfg")
    result = build(BuildOptions(model=model, pretrained="none", out=tmp_path / "art"))
    manifest = result.manifest
    assert manifest["recipe"] == "hf_clip" and manifest["families"] == {"image": "hf-clip-vision", "text": "hf-clip-text"}
    towers = manifest["towers"]
    assert towers["image"]["inputs"][0]["shape"] == ["batch", 3, 32, 32]
    assert towers["image"]["outputs"][0]["shape"] == ["batch", 24]
    # exact EOT trimming: a dynamic sequence axis, and parity ran on trimmed ids against the 77-token reference
    assert towers["text"]["inputs"][0] == {"name": "input_ids", "dtype": "int64", "shape": ["batch", "sequence"]}
    assert towers["text"]["sequence"]["axis"] == "sequence" and towers["text"]["sequence"]["pad_id"] == 0
    assert result.parity["text"].trimmed_lengths and min(result.parity["text"].trimmed_lengths) < 77
    # one fused ONNX Attention node per CLIPAttention block (2 per tower), no Softmax left
    for name in ("image", "text"):
        assert towers[name]["attention"] == {"lowering": "onnx", "fused_nodes": 2, "blocks": 2, "ops": ["Attention"]}
        graph = onnx.load(str(tmp_path / "art" / f"{name}.onnx"))
        assert sum(n.op_type == "Softmax" for n in graph.graph.node) == 0
    assert all(p.passed and p.cosine_min >= 0.99999 for p in result.parity.values())
    # each tower counts only its own parameters
    assert towers["image"]["parameters"] + towers["text"]["parameters"] < sum(
        p.numel() for p in clipexport_hf_model(model).parameters())
    # each tower file holds only its own weights
    assert (tmp_path / "art" / "image.onnx").stat().st_size < (tmp_path / "art" / "text.onnx").stat().st_size


def test_from_save_pretrained_weights_matches_transformers(tmp_path):
    from transformers import CLIPModel

    model = write_tiny_hf_clip(tmp_path / "saved", weights=True, seed=5)
    out = tmp_path / "art"
    result = build(BuildOptions(model=model, out=out))  # default: the directory's own weights
    assert result.manifest["weights"]["kind"] == "file"
    assert result.manifest["weights"]["value"].endswith("model.safetensors")

    hf = CLIPModel.from_pretrained(str(tmp_path / "saved")).eval()
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    ids = clipexport.load(out).tokenize(PROMPTS)
    with torch.no_grad():
        want_image = hf.get_image_features(pixel_values=pixels).pooler_output.numpy()
        want_text = hf.get_text_features(input_ids=torch.from_numpy(ids)).pooler_output.numpy()
    got_image = ort.InferenceSession(str(out / "image.onnx")).run(None, {"pixel_values": pixels.numpy()})[0]
    text = ort.InferenceSession(str(out / "text.onnx"))
    got_text = text.run(None, {"input_ids": ids})[0]
    assert np.abs(got_image - want_image).max() < 1e-5 * max(1.0, np.abs(want_image).max())
    assert np.abs(got_text - want_text).max() < 1e-5 * max(1.0, np.abs(want_text).max())
    # trimmed after the longest row's EOT: the same embeddings as transformers at 77 tokens
    keep = int(np.nonzero(ids.any(axis=0))[0].max()) + 1
    assert keep < 20
    trimmed = text.run(None, {"input_ids": ids[:, :keep]})[0]
    assert np.abs(trimmed - want_text).max() < 1e-5 * max(1.0, np.abs(want_text).max())
    loaded = clipexport.load(out)
    assert loaded.trims_text
    assert np.abs(loaded.encode_tokens(ids, normalize=False) - want_text).max() < 1e-5 * max(1.0, np.abs(want_text).max())
    # transformers' own CLIP tokenizer would pad with EOT, ours with 0: EOT pooling never reads the padding
    padded = ids.copy()
    padded[padded == 0] = 49407
    with torch.no_grad():
        other = hf.get_text_features(input_ids=torch.from_numpy(padded)).pooler_output.numpy()
    assert np.abs(other - want_text).max() < 1e-5

    checked = verify_artifact(out)
    assert set(checked["parity"]) == {"image", "text"}


def test_int8_projections_all_become_integer_kernels_on_onnxruntime(tmp_path):
    """The reason int8 pays: after ONNX Runtime's graph optimization every quantized MatMul is an
    integer kernel (MatMulIntegerToFloat). transformers' separate q/k/v projections share one
    activation, a pattern ORT's QDQ fusion leaves as float MatMuls that dequantize their int8
    weights on every run; merge_projections makes them one MatMul."""
    model = write_tiny_hf_clip(tmp_path / "cfg")
    result = build(BuildOptions(model=model, pretrained="none", precision="int8", out=tmp_path / "art"))
    for name in ("image", "text"):
        record = {r["name"]: r for r in result.manifest["towers"][name]["passes"]}["merge_projections"]
        assert record["status"] == "applied" and "2 groups" in record["detail"]  # one q/k/v group per block
        quantized = result.manifest["towers"][name]["quantization"]["quantized_ops"]["MatMul"]
        options = ort.SessionOptions()
        options.optimized_model_filepath = str(tmp_path / f"{name}-ort.onnx")
        ort.InferenceSession(str(tmp_path / "art" / f"{name}.onnx"), options, providers=["CPUExecutionProvider"])
        optimized = onnx.load(str(tmp_path / f"{name}-ort.onnx")).graph
        ops = collections.Counter(n.op_type for n in optimized.node)
        assert ops["MatMulIntegerToFloat"] == quantized == 2 * 4  # q/k/v merged, out, fc1, fc2 per block
        producers = {o: n.op_type for n in optimized.node for o in n.output}
        float_matmuls_on_dq = [n.name for n in optimized.node if n.op_type == "MatMul"
                               and any(producers.get(i) == "DequantizeLinear" for i in n.input)]
        assert float_matmuls_on_dq == []


def clipexport_hf_model(name):
    from clipexport.models import hf_clip

    return hf_clip.create(name, load_weights=False)


def test_untrimmable_clip_text_models_say_why(tmp_path):
    """Trimming is exact only where the text model pools at CLIP BPE's EOT."""
    from transformers import CLIPConfig, CLIPModel

    from clipexport.models.hf_clip import untrimmable_reason

    def model(**text):
        base = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      image_size=32, patch_size=16)
        return CLIPModel(CLIPConfig(text_config={**base, **text}, vision_config=vision))

    assert untrimmable_reason(model(eos_token_id=2)) == ""  # the legacy argmax pooling
    assert untrimmable_reason(model(eos_token_id=49407)) == ""
    assert "eos_token_id 5" in untrimmable_reason(model(eos_token_id=5))
    assert "vocabulary of 1000" in untrimmable_reason(model(vocab_size=1000, eos_token_id=2))


def test_bad_sources_are_clear(tmp_path):
    runner = CliRunner()
    empty = write_tiny_hf_clip(tmp_path / "cfg-only")
    no_weights = runner.invoke(cli, ["build", empty, "--out", str(tmp_path / "a")])
    assert no_weights.exit_code == 1 and "holds no weights" in no_weights.output and "--pretrained none" in no_weights.output
    missing = runner.invoke(cli, ["build", f"hf:{tmp_path / 'nothing-here' / 'x'}", "--pretrained", "none"])
    assert missing.exit_code == 1 and "no such directory" in missing.output
    other = tmp_path / "bert"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "bert"}))
    wrong = runner.invoke(cli, ["build", f"hf:{other}", "--pretrained", "none"])
    assert wrong.exit_code == 1 and "model_type 'bert'" in wrong.output
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    hub = runner.invoke(cli, ["build", "hf:openai/clip-vit-base-patch32", "--pretrained", "none"])
    assert hub.exit_code == 1 and "save_pretrained" in hub.output


@pytest.mark.slow
def test_clip_model_at_vit_b_32_size(tmp_path):
    """CLIPConfig()'s defaults are OpenAI's ViT-B/32: 224 px, patch 32, 12 + 12 layers, 512-d embeddings."""
    from transformers import CLIPConfig

    CLIPConfig().save_pretrained(str(tmp_path / "b32"))
    result = build(BuildOptions(model=f"hf:{tmp_path / 'b32'}", pretrained="none", out=tmp_path / "art"))
    towers = result.manifest["towers"]
    assert towers["image"]["outputs"][0]["shape"] == ["batch", 512]
    for name in ("image", "text"):
        assert towers[name]["attention"]["fused_nodes"] == towers[name]["attention"]["blocks"] == 12
    # trimmed ids (max EOT + 1 columns) against the full 77-token reference
    assert towers["text"]["inputs"][0]["shape"] == ["batch", "sequence"]
    assert min(result.parity["text"].trimmed_lengths) < 77
    for parity in result.parity.values():
        assert parity.passed and parity.cosine_min >= 0.99999 and parity.max_rel_err <= 1e-4, parity.summary()
        print(parity.summary())
