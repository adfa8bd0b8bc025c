"""Towers over protobuf's 2 GB (ViT-bigG-14): weights exported to ONNX external data, the
model loaded one tower at a time, parity with the tower freed before ONNX Runtime loads.

The tiny twins take the same path with `large_tower_bytes=0` (the CLI's --external-data);
benchmarks/bigg.py runs it at size.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import open_clip
import pytest
import torch
from click.testing import CliRunner

import clipexport
from clipexport.build import BuildOptions, build, plan_build, verify_artifact
from clipexport.cli import cli
from clipexport.errors import ArtifactError, UsageError
from clipexport.hashing import file_sha256
from clipexport.models import load_reference


@pytest.fixture(scope="module")
def vit_twin(tmp_path_factory):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from twins import write_twin

    return write_twin("vit", tmp_path_factory.mktemp("twin-vit-large"))


@pytest.fixture(scope="module")
def large_artifact(vit_twin, tmp_path_factory):
    out = tmp_path_factory.mktemp("large") / "art"
    result = build(BuildOptions(model=vit_twin, pretrained="none", out=out, large_tower_bytes=0))
    return out, result


def test_every_weight_of_both_towers_lives_in_external_data_listed_with_its_sha256(large_artifact):
    out, result = large_artifact
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["loading"] == "per-tower"
    for tower in ("image", "text"):
        info = manifest["towers"][tower]
        assert info["external_data"] == [f"{tower}.onnx.data"]
        data = out / f"{tower}.onnx.data"
        assert manifest["files"][data.name] == file_sha256(data)
        graph = onnx.load(str(out / f"{tower}.onnx"), load_external_data=False).graph
        external = [t for t in graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
        # every weight matrix is external; what stays inline is small constants only
        inline_bytes = sum(len(t.raw_data) for t in graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL)
        assert len(external) >= 10 and inline_bytes < 4096
        assert data.stat().st_size >= 4 * info["parameters"] * 0.9
        # the graph file alone is small: no weight was copied into it
        assert (out / f"{tower}.onnx").stat().st_size < 200_000
        simplify = next(p for p in info["passes"] if p["name"] == "simplify")
        assert simplify["status"] == "applied" and "memory-mapped external data" in simplify["detail"]
        assert simplify["nodes_after"] < simplify["nodes_before"]  # constants were folded
        assert not list(out.glob(".raw-*"))
        assert info["attention"]["fused_nodes"] == info["attention"]["blocks"] == 2
    assert result.parity["image"].cosine_min >= 0.99999 and result.parity["image"].max_rel_err < 1e-4
    assert result.parity["text"].trimmed_lengths and result.parity["text"].max_rel_err < 1e-4


def test_per_tower_reference_is_deterministic_and_released(vit_twin):
    ref = load_reference(vit_twin, "none", seed=3, per_tower=True)
    assert all(p.device.type == "meta" for p in ref.model.visual.parameters())
    ref.materialize("image")
    first = {k: v.clone() for k, v in ref.model.visual.state_dict().items()}
    ref.release("image")
    assert all(p.device.type == "meta" for p in ref.model.visual.parameters())
    ref.materialize("image")
    second = ref.model.visual.state_dict()
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    ref.materialize("text")
    assert torch.equal(ref.model.attn_mask, torch.full((77, 77), float("-inf")).triu(1))
    assert ref.model.logit_scale.item() == pytest.approx(np.log(1 / 0.07), rel=1e-6)  # open_clip's initial value


def test_runtime_loads_the_external_data_artifact_and_matches_onnxruntime(large_artifact):
    out, _ = large_artifact
    runtime = clipexport.load(out, backend="onnxruntime")
    pixels = np.random.default_rng(0).standard_normal((3, 3, 32, 32)).astype(np.float32)
    session = ort.InferenceSession(str(out / "image.onnx"), providers=["CPUExecutionProvider"])
    (direct,) = session.run(None, {"pixel_values": pixels})
    np.testing.assert_allclose(runtime.encode_pixels(pixels, normalize=False), direct, rtol=0, atol=1e-6)
    prompts = ["a photo of a dog.", "a diagram"]
    texts = runtime.encode_text(prompts)
    assert texts.shape == (2, 24)
    np.testing.assert_allclose(np.linalg.norm(texts, axis=1), 1.0, atol=1e-5)
    # the numbers, not just the shape: the text graph run directly on the full 77 ids (the runtime trims
    # them to the last EOT first), and the PyTorch text tower the artifact was built from
    ids = runtime.tokenize(prompts)
    text_session = ort.InferenceSession(str(out / "text.onnx"), providers=["CPUExecutionProvider"])
    (direct_text,) = text_session.run(None, {text_session.get_inputs()[0].name: ids})
    raw = runtime.encode_text(prompts, normalize=False)
    np.testing.assert_allclose(raw, direct_text, rtol=0, atol=1e-5)
    np.testing.assert_allclose(texts, direct_text / np.linalg.norm(direct_text, axis=1, keepdims=True), atol=1e-6)
    from clipexport.models.towers import text_tower

    manifest = json.loads((out / "manifest.json").read_text())
    # loaded tower by tower, as the build loaded it (the random initialization differs from a whole-model load)
    ref = load_reference(manifest["model"], "none", seed=int(manifest["weights"]["seed"]), per_tower=True)
    ref.materialize("text")
    with torch.no_grad():
        expected = text_tower(ref.model)(torch.from_numpy(ids)).numpy()
    np.testing.assert_allclose(raw, expected, rtol=0, atol=1e-5)


def test_verify_rebuilds_the_same_per_tower_reference_and_catches_a_changed_data_file(large_artifact, tmp_path):
    out, _ = large_artifact
    checked = verify_artifact(out)
    assert {"image.onnx.data", "text.onnx.data"} <= set(checked["files"])
    assert checked["parity"]["image"].max_rel_err < 1e-4
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    with open(copy / "image.onnx.data", "r+b") as f:
        f.seek(64)
        f.write(b"\x00\x01\x02\x03")
    with pytest.raises(ArtifactError, match="image.onnx.data does not match"):
        verify_artifact(copy, files_only=True)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_per_tower_checkpoint_load_matches_open_clip_loading_the_same_file(vit_twin, tmp_path, suffix):
    """A checkpoint read tower by tower gives the graph the weights open_clip's own loader gives."""
    whole = load_reference(vit_twin, "none", seed=0).model
    generator = torch.Generator().manual_seed(7)
    state = {k: v + 0.05 * torch.randn(v.shape, generator=generator) if v.is_floating_point() else v
             for k, v in whole.state_dict().items()}
    checkpoint = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(checkpoint))
    else:
        torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, checkpoint)
    out = tmp_path / "art"
    build(BuildOptions(model=vit_twin, pretrained=str(checkpoint), out=out, large_tower_bytes=0))

    reference = open_clip.create_model(vit_twin, pretrained=None, load_weights=False).eval()
    open_clip.load_checkpoint(reference, str(checkpoint))
    pixels = torch.randn(2, 3, 32, 32, generator=generator)
    tokens = open_clip.get_tokenizer(vit_twin)(["a red car", "two dogs on the sea"])
    with torch.no_grad():
        want_image = reference.encode_image(pixels).numpy()
        want_text = reference.encode_text(tokens).numpy()
    image = ort.InferenceSession(str(out / "image.onnx"), providers=["CPUExecutionProvider"])
    text = ort.InferenceSession(str(out / "text.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(image.run(None, {"pixel_values": pixels.numpy()})[0], want_image, atol=2e-5)
    np.testing.assert_allclose(text.run(None, {"input_ids": tokens.numpy()})[0], want_text, atol=2e-5)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["logit_scale"] == pytest.approx(float(state["logit_scale"].exp()), rel=1e-6)


@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_quantizing_a_large_tower_is_refused_before_any_work(vit_twin, twin, tmp_path, precision):
    for model in (vit_twin, twin("timm")):  # loaded tower by tower, and loaded whole
        out = tmp_path / f"{precision}-{model[-8:]}"
        with pytest.raises(UsageError, match="int8 and fp8 builds of a tower whose weights go to external data"):
            plan_build(BuildOptions(model=model, pretrained="none", precision=precision, out=out, large_tower_bytes=0))
        assert not out.exists()


@pytest.fixture(scope="module")
def fp16_large_artifact(vit_twin, tmp_path_factory):
    out = tmp_path_factory.mktemp("large-fp16") / "art"
    result = build(BuildOptions(model=vit_twin, pretrained="none", precision="fp16", out=out, large_tower_bytes=0))
    return out, result


def test_fp16_large_tower_is_converted_weight_by_weight_into_one_fp16_data_file(fp16_large_artifact):
    out, result = fp16_large_artifact
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["loading"] == "per-tower" and manifest["precision"] == "fp16"
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []  # no probe, raw or twin left
    for tower in ("image", "text"):
        info = manifest["towers"][tower]
        assert info["external_data"] == [f"{tower}.onnx.data"]
        data = out / f"{tower}.onnx.data"
        assert manifest["files"][data.name] == file_sha256(data)
        assert data.stat().st_mode == (out / f"{tower}.onnx").stat().st_mode  # not owner-only
        graph = onnx.load(str(out / f"{tower}.onnx"), load_external_data=False).graph
        external = [t for t in graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
        low = [t for t in external if t.data_type == onnx.TensorProto.FLOAT16]
        kept = [t for t in external if t.data_type == onnx.TensorProto.FLOAT]
        low_bytes = sum(2 * int(np.prod(t.dims)) for t in low)
        # the weight matrices are fp16 in the data file; the fp32 originals are gone with the old file
        assert len(low) >= 8 and low_bytes >= 2 * info["parameters"] * 0.8
        assert data.stat().st_size < 4 * info["parameters"] * 0.6
        assert all(len(t.raw_data) == 0 for t in graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL)
        assert sum(int(np.prod(t.dims)) for t in kept) < 0.2 * info["parameters"]  # norms, the final projection
        record = next(p for p in info["passes"] if p["name"] == "precision")
        assert record["status"] == "applied" and "weight by weight over the external data file" in record["detail"]
        assert info["attention"]["fused_nodes"] == 2
        parity = result.parity[tower]
        assert parity.passed and "emulated" in parity.note
        assert 0.999 <= parity.cosine_min < 1.0 - 1e-9  # fp16 rounding is there, and small
    onnx.checker.check_model(str(out / "image.onnx"))


def test_fp16_large_tower_artifact_loads_verifies_and_matches_the_fp32_one(fp16_large_artifact, large_artifact):
    out, _ = fp16_large_artifact
    fp32_out, _ = large_artifact
    pixels = np.random.default_rng(1).standard_normal((3, 3, 32, 32)).astype(np.float32)
    low = clipexport.load(out, backend="onnxruntime").encode_pixels(pixels, normalize=False)
    full = clipexport.load(fp32_out, backend="onnxruntime").encode_pixels(pixels, normalize=False)
    cosine = (low * full).sum(1) / np.linalg.norm(low, axis=1) / np.linalg.norm(full, axis=1)
    assert cosine.min() > 0.999 and not np.array_equal(low, full)
    checked = verify_artifact(out)  # parity again, through the hard-linked emulation twin
    assert checked["parity"]["image"].passed and checked["parity"]["text"].passed
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_bf16_large_tower_of_a_model_loaded_whole(twin, tmp_path):
    out = tmp_path / "timm-bf16"
    result = build(BuildOptions(model=twin("timm"), pretrained="none", precision="bf16", towers=["image"], out=out,
                                large_tower_bytes=0))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["loading"] == "whole" and manifest["towers"]["image"]["external_data"] == ["image.onnx.data"]
    graph = onnx.load(str(out / "image.onnx"), load_external_data=False).graph
    assert sum(t.data_type == onnx.TensorProto.BFLOAT16 for t in graph.initializer) >= 4
    assert result.parity["image"].passed and result.parity["image"].cosine_min >= 0.99


def test_emulation_twin_beside_the_data_when_hard_links_fail_is_removed_after(fp16_large_artifact, vit_twin,
                                                                              tmp_path, monkeypatch):
    """Simulates an artifact on another file system than the temporary folder (os.link fails)."""
    import os
    import shutil

    out, _ = fp16_large_artifact
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)

    def cross_device(*_args):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", cross_device)
    checked = verify_artifact(copy)
    assert checked["parity"]["image"].passed
    assert not [p for p in copy.iterdir() if p.name.startswith(".")]


def test_cli_external_data_flag_takes_the_large_tower_path(vit_twin, tmp_path):
    out = tmp_path / "cli"
    result = CliRunner().invoke(cli, ["build", vit_twin, "--pretrained", "none", "--towers", "image",
                                      "--external-data", "--out", str(out), "-q"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["towers"]["image"]["external_data"] == ["image.onnx.data"]
    assert manifest["towers"]["image"]["parity"]["passed"]


def test_non_builtin_class_loads_whole_but_still_exports_external_data(twin, tmp_path):
    """A timm image tower is not built tower by tower; its weights still go to external data."""
    model = twin("timm")
    out = tmp_path / "timm"
    result = build(BuildOptions(model=model, pretrained="none", towers=["image"], out=out, large_tower_bytes=0))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["loading"] == "whole"
    assert manifest["towers"]["image"]["external_data"] == ["image.onnx.data"]
    assert result.parity["image"].max_rel_err < 1e-4


def test_text_transformer_fed_by_a_hugging_face_tokenizer_also_loads_tower_by_tower(tmp_path):
    """ViT-H/bigG-14-worldwide and the CLIPA ViTs are the built-in CLIP class too: their text tower
    (XLM-V's 901629-row embedding at size) takes the per-tower path like the image tower."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from twins import write_hf_tokenizer_text_twin

    model = write_hf_tokenizer_text_twin("worldwide", tmp_path / "worldwide")
    ref = load_reference(model, "none", seed=0, per_tower=True)
    assert all(p.device.type == "meta" for p in ref.model.token_embedding.parameters())
    ref.materialize("text")
    assert ref.model.token_embedding.weight.shape == (1024, 32) and ref.model.text_eos_id == 2
    ref.release("text")
    assert ref.model.token_embedding.weight.device.type == "meta"

    out = tmp_path / "art"
    result = build(BuildOptions(model=model, pretrained="none", out=out, large_tower_bytes=0))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["loading"] == "per-tower"
    for tower in ("image", "text"):
        assert manifest["towers"][tower]["external_data"] == [f"{tower}.onnx.data"]
        assert result.parity[tower].cosine_min >= 0.99999 and result.parity[tower].max_rel_err < 1e-4


def test_text_tower_without_a_causal_mask_loads_tower_by_tower(tmp_path):
    """ViT-H-14-CLIPA (a 2.5 GB image tower) loads tower by tower; its text tower attends without a
    causal mask (open_clip keeps `attn_mask` as None), which materialize and release must allow."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from twins import write_hf_tokenizer_text_twin

    model = write_hf_tokenizer_text_twin("clipa", tmp_path / "clipa")
    ref = load_reference(model, "none", seed=0, per_tower=True)
    ref.materialize("text")
    assert ref.model.attn_mask is None and ref.model.text_pool_type == "last"
    ref.release("text")
    assert ref.model.token_embedding.weight.device.type == "meta"

    out = tmp_path / "art"
    result = build(BuildOptions(model=model, pretrained="none", out=out, large_tower_bytes=0))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["loading"] == "per-tower" and manifest["tokenizer"]["context_length"] == 32
    for tower in ("image", "text"):
        assert manifest["towers"][tower]["external_data"] == [f"{tower}.onnx.data"]
        assert result.parity[tower].cosine_min >= 0.99999 and result.parity[tower].max_rel_err < 1e-4
