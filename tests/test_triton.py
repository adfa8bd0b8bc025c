"""`clipexport triton`: a model repository for a tiny-twin artifact, checked without a Triton server.

Every config.pbtxt is parsed with tritonclient's ModelConfig protobuf and compared with the ONNX
graphs; the Python-backend model.py runs against a stand-in for `triton_python_backend_utils`
(the module only Triton's stub process provides), alone and chained with the repository's ONNX
models the way its ensemble config says, and must give clipexport.Runtime's numbers.
"""

from __future__ import annotations

import importlib.util
import io
import json
import shutil
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from twins import write_twin

from clipexport.cli import cli
from clipexport.errors import ArtifactError, UsageError
from clipexport.hashing import file_sha256
from clipexport.runtime import Runtime, load
from clipexport.triton import TritonOptions, write_repository

pytest.importorskip("torch")
pytest.importorskip("open_clip")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")
from google.protobuf import json_format, text_format

TEXTS = ["a photo of a dog.", "", "東京の夜景 🍕", "tom &amp; jerry", "a very long caption " * 30]
ONNX_TO_TRITON = {1: "TYPE_FP32", 10: "TYPE_FP16", 16: "TYPE_BF16", 7: "TYPE_INT64", 6: "TYPE_INT32"}


# -- fixtures ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from clipexport.build import BuildOptions, build

    model = write_twin("vit", tmp_path_factory.mktemp("twin-triton"))
    out = tmp_path_factory.mktemp("artifact-triton") / "vit"
    return build(BuildOptions(model=model, pretrained="none", towers=["image", "text"], out=out)).out_dir


@pytest.fixture(scope="module")
def manifest(artifact: Path) -> dict[str, Any]:
    return json.loads((artifact / "manifest.json").read_text())


@pytest.fixture(scope="module")
def rt(artifact: Path) -> Runtime:
    return load(artifact, backend="onnxruntime", device="cpu")


@pytest.fixture(scope="module")
def repo(artifact: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("triton") / "repo"
    result = write_repository(artifact, TritonOptions(out=out))
    assert result.out == out and result.notes == ()
    return out


def _configs(repo: Path) -> dict[str, Any]:
    """Every model's config.pbtxt, parsed the way Triton parses it."""
    configs = {}
    for path in sorted(repo.glob("*/config.pbtxt")):
        config = text_format.Parse(path.read_text(encoding="utf-8"), model_config_pb2.ModelConfig())
        assert config.name == path.parent.name
        configs[config.name] = config
    return configs


@pytest.fixture(scope="module")
def configs(repo: Path) -> dict[str, Any]:
    return _configs(repo)


def _dtype(value: int) -> str:
    return model_config_pb2.DataType.Name(value)


# -- a stand-in for triton_python_backend_utils ------------------------------------------------

class _Tensor:
    def __init__(self, name: str, array: np.ndarray) -> None:
        self._name, self._array = name, np.asarray(array)

    def name(self) -> str:
        return self._name

    def as_numpy(self) -> np.ndarray:
        return self._array


class _Request:
    def __init__(self, inputs: list[_Tensor]) -> None:
        self._inputs = inputs

    def inputs(self) -> list[_Tensor]:
        return self._inputs


class _TritonError(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self._message = message

    def message(self) -> str:
        return self._message


class _Response:
    def __init__(self, output_tensors: list[_Tensor] | None = None, error: _TritonError | None = None) -> None:
        self._outputs, self._error = list(output_tensors or []), error

    def output_tensors(self) -> list[_Tensor]:
        return self._outputs

    def has_error(self) -> bool:
        return self._error is not None

    def error(self) -> _TritonError | None:
        return self._error


def _by_name(tensors: list[_Tensor], name: str) -> _Tensor | None:
    return next((t for t in tensors if t.name() == name), None)


@pytest.fixture
def pb_stand_in(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    """A small fake of the module Triton's Python backend injects, with the calls model.py makes."""
    module = types.ModuleType("triton_python_backend_utils")
    module.Tensor = _Tensor  # type: ignore[attr-defined]
    module.InferenceRequest = _Request  # type: ignore[attr-defined]
    module.InferenceResponse = _Response  # type: ignore[attr-defined]
    module.TritonError = _TritonError  # type: ignore[attr-defined]
    module.get_input_tensor_by_name = lambda request, name: _by_name(request.inputs(), name)  # type: ignore[attr-defined]
    module.get_output_tensor_by_name = (  # type: ignore[attr-defined]
        lambda response, name: _by_name(response.output_tensors(), name))
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", module)
    return module


def _python_model(repo: Path, configs: dict[str, Any], name: str) -> Any:
    """The repository's own model.py, imported from its path and initialized as Triton would."""
    path = repo / name / "1" / "model.py"
    spec = importlib.util.spec_from_file_location(f"_triton_model_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.TritonPythonModel()
    model.initialize({"model_config": json_format.MessageToJson(configs[name]), "model_name": name,
                      "model_version": "1", "model_repository": str(repo / name),
                      "model_instance_kind": "CPU", "model_instance_device_id": "0"})
    return model


def _strings(values: list[bytes]) -> np.ndarray:
    return np.array(values, dtype=object).reshape(-1, 1)  # TYPE_STRING [N, 1], as Triton hands it over


def _run_python(model: Any, pb: types.ModuleType, input_name: str, output_name: str, values: list[bytes]) -> np.ndarray:
    (response,) = model.execute([pb.InferenceRequest([pb.Tensor(input_name, _strings(values))])])
    assert not response.has_error(), response.error().message()
    tensor = pb.get_output_tensor_by_name(response, output_name)
    assert tensor is not None
    return tensor.as_numpy()


def _run_ensemble(repo: Path, configs: dict[str, Any], name: str, value: np.ndarray,
                  pb: types.ModuleType) -> dict[str, np.ndarray]:
    """Run an ensemble's steps in order, moving tensors by the config's input/output maps."""
    ensemble = configs[name]
    (inp,) = ensemble.input
    tensors = {inp.name: value}
    for step in ensemble.ensemble_scheduling.step:
        config = configs[step.model_name]
        feeds = {model_name: tensors[ens_name] for model_name, ens_name in step.input_map.items()}
        if config.backend == "python":
            model = _python_model(repo, configs, step.model_name)
            (response,) = model.execute([pb.InferenceRequest([pb.Tensor(k, v) for k, v in feeds.items()])])
            assert not response.has_error(), response.error().message()
            outputs = {t.name(): t.as_numpy() for t in response.output_tensors()}
        else:
            assert config.platform == "onnxruntime_onnx"
            session = ort.InferenceSession(str(repo / step.model_name / "1" / config.default_model_filename),
                                           providers=["CPUExecutionProvider"])
            names = [o.name for o in config.output]
            outputs = dict(zip(names, session.run(names, feeds)))
        for model_name, ens_name in step.output_map.items():
            tensors[ens_name] = outputs[model_name]
    return {o.name: tensors[o.name] for o in ensemble.output}


def _encoded_images() -> list[bytes]:
    rng = np.random.default_rng(0)
    out = []
    for (w, h), fmt, mode in [((40, 30), "PNG", "RGB"), ((17, 64), "JPEG", "RGB"), ((32, 32), "PNG", "RGBA"),
                              ((100, 7), "JPEG", "L")]:
        channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
        pixels = rng.integers(0, 256, (h, w, channels), dtype=np.uint8)
        image = Image.fromarray(pixels[:, :, 0] if channels == 1 else pixels, mode)
        buffer = io.BytesIO()
        image.save(buffer, format=fmt, quality=90) if fmt == "JPEG" else image.save(buffer, format=fmt)
        out.append(buffer.getvalue())
    return out


# -- the repository and its configs ------------------------------------------------------------

def test_repository_has_three_models_per_tower(repo: Path, configs: dict[str, Any]) -> None:
    assert set(configs) == {"clip_image", "clip_image_preprocess", "clip_image_encoder",
                            "clip_text", "clip_text_tokenize", "clip_text_encoder"}
    for tower in ("image", "text"):
        assert (repo / f"clip_{tower}_encoder" / "1" / "model.onnx").is_file()
        assert list((repo / f"clip_{tower}" / "1").iterdir()) == []  # ensembles need an empty version dir
    assert (repo / "clip_text_tokenize" / "1" / "tokenizer" / "bpe_simple_vocab_16e6.txt.gz").is_file()
    assert not list(repo.parent.glob(".repo.partial-*"))


def test_encoder_configs_match_the_onnx_graphs(repo: Path, configs: dict[str, Any], manifest: dict[str, Any],
                                               artifact: Path) -> None:
    batch = manifest["batch"]
    for tower in ("image", "text"):
        config = configs[f"clip_{tower}_encoder"]
        path = repo / config.name / "1" / config.default_model_filename
        assert config.platform == "onnxruntime_onnx" and config.default_model_filename == "model.onnx"
        assert path.read_bytes() == (artifact / f"{tower}.onnx").read_bytes()
        assert config.max_batch_size == batch["max"]
        assert list(config.dynamic_batching.preferred_batch_size) == sorted({batch["opt"], batch["max"]})
        assert config.dynamic_batching.max_queue_delay_microseconds == 100
        assert [(g.count, g.kind) for g in config.instance_group] == [(1, model_config_pb2.ModelInstanceGroup.KIND_GPU)]
        graph = onnx.load_model(str(path), load_external_data=False).graph
        for declared, values in ((config.input, graph.input), (config.output, graph.output)):
            expected = []
            for v in values:
                t = v.type.tensor_type
                dims = [d.dim_value if d.dim_value else -1 for d in t.shape.dim]
                assert t.shape.dim[0].dim_param, "the graph's batch axis is dynamic"
                expected.append((v.name, ONNX_TO_TRITON[t.elem_type], dims[1:]))  # batch axis left out
            assert [(d.name, _dtype(d.data_type), list(d.dims)) for d in declared] == expected
    assert list(configs["clip_text_encoder"].input[0].dims) == [-1]  # the trimmed text graph: any length
    assert list(configs["clip_image_encoder"].input[0].dims) == [3, 32, 32]


def test_python_model_configs(configs: dict[str, Any], manifest: dict[str, Any]) -> None:
    image, text = configs["clip_image_preprocess"], configs["clip_text_tokenize"]
    for config in (image, text):
        assert config.backend == "python" and config.platform == ""
        assert config.max_batch_size == manifest["batch"]["max"]
        assert [(g.count, g.kind) for g in config.instance_group] == [(1, model_config_pb2.ModelInstanceGroup.KIND_CPU)]
        assert config.HasField("dynamic_batching")
    assert [(i.name, _dtype(i.data_type), list(i.dims)) for i in image.input] == [("image", "TYPE_STRING", [1])]
    assert [(o.name, _dtype(o.data_type), list(o.dims)) for o in image.output] == [
        ("pixel_values", "TYPE_FP32", [3, 32, 32])]
    assert [(i.name, _dtype(i.data_type), list(i.dims)) for i in text.input] == [("text", "TYPE_STRING", [1])]
    assert [(o.name, _dtype(o.data_type), list(o.dims)) for o in text.output] == [("input_ids", "TYPE_INT64", [77])]


def test_ensemble_maps_are_consistent(configs: dict[str, Any]) -> None:
    for tower, raw in (("image", "image"), ("text", "text")):
        ensemble = configs[f"clip_{tower}"]
        assert ensemble.platform == "ensemble" and not ensemble.instance_group
        assert [(i.name, _dtype(i.data_type)) for i in ensemble.input] == [(raw, "TYPE_STRING")]
        assert [(o.name, _dtype(o.data_type), list(o.dims)) for o in ensemble.output] == [
            ("embedding", "TYPE_FP32", [24])]
        steps = ensemble.ensemble_scheduling.step
        assert [s.model_name for s in steps] == [f"clip_{tower}_{'preprocess' if tower == 'image' else 'tokenize'}",
                                                 f"clip_{tower}_encoder"]
        # Each tensor a step reads is the ensemble's input or an earlier step's output, of the same type.
        available = {i.name: (i.data_type, list(i.dims)) for i in ensemble.input}
        for step in steps:
            model = configs[step.model_name]
            assert step.model_version == -1
            assert ensemble.max_batch_size <= model.max_batch_size
            inputs = {i.name: (i.data_type, list(i.dims)) for i in model.input}
            outputs = {o.name: (o.data_type, list(o.dims)) for o in model.output}
            assert set(step.input_map) == set(inputs)
            for model_name, ens_name in step.input_map.items():
                dtype, dims = available[ens_name]
                want_dtype, want_dims = inputs[model_name]
                assert dtype == want_dtype and len(dims) == len(want_dims)
                assert all(w in (-1, d) for d, w in zip(dims, want_dims)), (dims, want_dims)
            for model_name, ens_name in step.output_map.items():
                available[ens_name] = outputs[model_name]
        for out in ensemble.output:
            assert available[out.name] == (out.data_type, list(out.dims))


def test_instances_kind_delay_and_prefix(artifact: Path, tmp_path: Path) -> None:
    out = tmp_path / "repo"
    write_repository(artifact, TritonOptions(out=out, towers=("image",), instances=3, kind="cpu",
                                             max_queue_delay_us=250, prefix="vit_b"))
    configs = _configs(out)
    assert set(configs) == {"vit_b_image", "vit_b_image_preprocess", "vit_b_image_encoder"}
    kinds = model_config_pb2.ModelInstanceGroup
    assert [(g.count, g.kind) for g in configs["vit_b_image_encoder"].instance_group] == [(3, kinds.KIND_CPU)]
    assert [(g.count, g.kind) for g in configs["vit_b_image_preprocess"].instance_group] == [(3, kinds.KIND_CPU)]
    assert configs["vit_b_image_encoder"].dynamic_batching.max_queue_delay_microseconds == 250
    steps = configs["vit_b_image"].ensemble_scheduling.step
    assert [s.model_name for s in steps] == ["vit_b_image_preprocess", "vit_b_image_encoder"]


# -- the Python-backend model against the runtime ----------------------------------------------

def test_python_model_with_stand_in_pb_utils_gives_runtime_pixels(repo: Path, configs: dict[str, Any], rt: Runtime,
                                                                   pb_stand_in: types.ModuleType) -> None:
    images = _encoded_images()
    model = _python_model(repo, configs, "clip_image_preprocess")
    pixels = _run_python(model, pb_stand_in, "image", "pixel_values", images)
    expected = rt.preprocess(images)
    assert pixels.dtype == np.float32 and pixels.shape == (len(images), 3, 32, 32)
    assert float(np.abs(pixels - expected).max()) == 0.0


def test_python_model_with_stand_in_pb_utils_gives_runtime_token_ids(repo: Path, configs: dict[str, Any],
                                                                      rt: Runtime,
                                                                      pb_stand_in: types.ModuleType) -> None:
    model = _python_model(repo, configs, "clip_text_tokenize")
    with pytest.warns(UserWarning):  # the long caption is cut, as Runtime.tokenize cuts it
        ids = _run_python(model, pb_stand_in, "text", "input_ids", [t.encode("utf-8") for t in TEXTS])
    with pytest.warns(UserWarning):
        expected = rt.tokenize(TEXTS)
    assert ids.dtype == np.int64 and ids.shape == (len(TEXTS), 77)
    np.testing.assert_array_equal(ids, expected)


def test_python_model_with_stand_in_pb_utils_fails_only_the_bad_request(repo: Path, configs: dict[str, Any],
                                                                         pb_stand_in: types.ModuleType) -> None:
    pb = pb_stand_in
    model = _python_model(repo, configs, "clip_image_preprocess")
    good = _encoded_images()[:1]
    responses = model.execute([pb.InferenceRequest([pb.Tensor("image", _strings([b"not an image"]))]),
                               pb.InferenceRequest([pb.Tensor("image", _strings(good))]),
                               pb.InferenceRequest([pb.Tensor("wrong", _strings(good))])])
    assert [r.has_error() for r in responses] == [True, False, True]
    assert "not an image file" in responses[0].error().message()
    assert "no input 'image'" in responses[2].error().message()
    assert responses[1].output_tensors()[0].as_numpy().shape == (1, 3, 32, 32)

    text = _python_model(repo, configs, "clip_text_tokenize")
    (response,) = text.execute([pb.InferenceRequest([pb.Tensor("text", _strings([b"\xff\xfe"]))])])
    assert response.has_error() and "not UTF-8" in response.error().message()


def test_ensembles_with_stand_in_pb_utils_match_runtime_embeddings(repo: Path, configs: dict[str, Any], rt: Runtime,
                                                                     pb_stand_in: types.ModuleType) -> None:
    images = _encoded_images()
    got = _run_ensemble(repo, configs, "clip_image", _strings(images), pb_stand_in)["embedding"]
    expected = rt.encode_image(images, normalize=False)
    assert got.shape == expected.shape == (len(images), 24)
    assert float(np.abs(got - expected).max()) < 1e-5

    with pytest.warns(UserWarning):
        got = _run_ensemble(repo, configs, "clip_text", _strings([t.encode() for t in TEXTS]), pb_stand_in)["embedding"]
    with pytest.warns(UserWarning):
        expected = rt.encode_text(TEXTS, normalize=False)  # runs trimmed ids; the repository runs full context
    assert got.shape == expected.shape == (len(TEXTS), 24)
    assert float(np.abs(got - expected).max()) < 1e-5


# -- TensorRT plans ----------------------------------------------------------------------------

def _copy(artifact: Path, tmp_path: Path, edit: Any = None, extra: dict[str, bytes] | None = None) -> Path:
    target = tmp_path / "artifact"
    shutil.copytree(artifact, target)
    manifest = json.loads((target / "manifest.json").read_text())
    for name, data in (extra or {}).items():
        (target / name).write_bytes(data)
        manifest["files"][name] = file_sha256(target / name)
    if edit is not None:
        edit(manifest)
    (target / "manifest.json").write_text(json.dumps(manifest))
    return target


def _with_image_plan(manifest: dict[str, Any], attention: str = "plugin") -> None:
    manifest["towers"]["image"]["engine"] = {
        "file": "image.0123456789ab.plan", "tensorrt_version": "10.14.1", "attention_mode": attention,
        "key": {"tensorrt_version": "10.14.1", "gpu_name": "NVIDIA H100 80GB HBM3", "compute_capability": [9, 0]},
    }


def test_tensorrt_plan_is_used_where_the_artifact_has_one(artifact: Path, tmp_path: Path) -> None:
    plan_bytes = b"stand-in for a serialized engine"
    source = _copy(artifact, tmp_path, _with_image_plan, {"image.0123456789ab.plan": plan_bytes})

    result = write_repository(source, TritonOptions(out=tmp_path / "gpu"))
    configs = _configs(tmp_path / "gpu")
    image, text = configs["clip_image_encoder"], configs["clip_text_encoder"]
    assert image.platform == "tensorrt_plan" and image.default_model_filename == "model.plan"
    assert (tmp_path / "gpu" / "clip_image_encoder" / "1" / "model.plan").read_bytes() == plan_bytes
    assert not (tmp_path / "gpu" / "clip_image_encoder" / "1" / "model.onnx").exists()
    assert [i.name for i in image.input] == ["pixel_values"] and list(image.input[0].dims) == [3, 32, 32]
    assert text.platform == "onnxruntime_onnx"  # no plan for the text tower
    assert any("TensorRT 10.14.1" in n for n in result.notes)
    assert any("attention plugin" in n for n in result.notes)
    assert "TensorRT 10.14.1" in (tmp_path / "gpu" / "clip_image_encoder" / "config.pbtxt").read_text()

    # Plans run on GPUs only: --kind cpu serves the ONNX graph.
    write_repository(source, TritonOptions(out=tmp_path / "cpu", kind="cpu"))
    assert _configs(tmp_path / "cpu")["clip_image_encoder"].platform == "onnxruntime_onnx"
    write_repository(source, TritonOptions(out=tmp_path / "ort", backend="onnxruntime"))
    assert _configs(tmp_path / "ort")["clip_image_encoder"].platform == "onnxruntime_onnx"

    with pytest.raises(UsageError, match="no TensorRT plan for the text tower"):
        write_repository(source, TritonOptions(out=tmp_path / "trt", backend="tensorrt"))
    with pytest.raises(UsageError, match="--kind gpu"):
        write_repository(source, TritonOptions(out=tmp_path / "trt", backend="tensorrt", kind="cpu",
                                               towers=("image",)))
    write_repository(source, TritonOptions(out=tmp_path / "trt", backend="tensorrt", towers=("image",)))
    assert _configs(tmp_path / "trt")["clip_image_encoder"].platform == "tensorrt_plan"


def test_tensorrt_plan_with_a_minimum_batch_is_refused(artifact: Path, tmp_path: Path) -> None:
    def edit(manifest: dict[str, Any]) -> None:
        _with_image_plan(manifest, "native")
        manifest["batch"]["min"] = 2

    source = _copy(artifact, tmp_path, edit, {"image.0123456789ab.plan": b"plan"})
    with pytest.raises(UsageError, match="at least 2"):
        write_repository(source, TritonOptions(out=tmp_path / "repo"))
    assert not (tmp_path / "repo").exists()


# -- bad input ---------------------------------------------------------------------------------

def test_missing_or_unknown_tower(artifact: Path, tmp_path: Path) -> None:
    image_only = _copy(artifact, tmp_path, lambda m: m["towers"].pop("text"))
    with pytest.raises(UsageError, match="has no text tower"):
        write_repository(image_only, TritonOptions(out=tmp_path / "repo", towers=("text",)))
    with pytest.raises(UsageError, match="expected image and/or text"):
        write_repository(artifact, TritonOptions(out=tmp_path / "repo", towers=("audio",)))
    assert not (tmp_path / "repo").exists()
    write_repository(image_only, TritonOptions(out=tmp_path / "repo"))  # default: the towers it has
    assert set(_configs(tmp_path / "repo")) == {"clip_image", "clip_image_preprocess", "clip_image_encoder"}


def test_text_tower_without_tokenizer_gets_the_encoder_only(artifact: Path, tmp_path: Path) -> None:
    def edit(manifest: dict[str, Any]) -> None:
        manifest["tokenizer"] = {"kind": "none", "context_length": 77, "reason": "no files at build time"}

    result = write_repository(_copy(artifact, tmp_path, edit), TritonOptions(out=tmp_path / "repo"))
    assert set(_configs(tmp_path / "repo")) == {"clip_image", "clip_image_preprocess", "clip_image_encoder",
                                                 "clip_text_encoder"}
    assert [n for n in result.notes if "no tokenizer" in n and "token ids" in n]
    (text,) = [t for t in result.towers if t.tower == "text"]
    assert text.ensemble is None and text.preprocess is None


def test_tampered_artifact_writes_nothing(artifact: Path, tmp_path: Path) -> None:
    source = _copy(artifact, tmp_path)
    with open(source / "text.onnx", "r+b") as fh:
        fh.seek(1000)
        byte = fh.read(1)
        fh.seek(1000)
        fh.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(ArtifactError, match="text.onnx does not match its sha256"):
        write_repository(source, TritonOptions(out=tmp_path / "out" / "repo"))
    assert not (tmp_path / "out").exists()
    (source / "tokenizer" / "bpe_simple_vocab_16e6.txt.gz").unlink()
    with pytest.raises(ArtifactError, match="bpe_simple_vocab_16e6.txt.gz is missing"):
        write_repository(source, TritonOptions(out=tmp_path / "repo"))
    with pytest.raises(ArtifactError, match="no manifest.json"):
        write_repository(tmp_path, TritonOptions(out=tmp_path / "elsewhere" / "repo"))


def test_existing_out_needs_force(artifact: Path, tmp_path: Path) -> None:
    out = tmp_path / "repo"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(UsageError, match="already exists; pass --force"):
        write_repository(artifact, TritonOptions(out=out))
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    # --force replaces only an earlier repository of ours (or an empty directory), never a user's files
    with pytest.raises(UsageError, match="--force replaces only an earlier output of clipexport"):
        write_repository(artifact, TritonOptions(out=out, force=True))
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    (out / "keep.txt").unlink()
    write_repository(artifact, TritonOptions(out=out, force=True))  # empty: replaced
    write_repository(artifact, TritonOptions(out=out, force=True))  # ours: replaced again
    assert (out / "clip_image" / "config.pbtxt").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["repo"]  # no staging or replaced dirs left
    with pytest.raises(UsageError, match="outside the artifact"):
        write_repository(artifact, TritonOptions(out=artifact / "triton", force=True))


def test_failure_while_writing_leaves_nothing(artifact: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from clipexport.triton import repository

    calls = []
    real = shutil.copyfile

    def failing_copy(src: Any, dst: Any) -> Any:
        calls.append(dst)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(repository.shutil, "copyfile", failing_copy)
    with pytest.raises(OSError, match="No space left"):
        write_repository(artifact, TritonOptions(out=tmp_path / "repo"))
    assert list(tmp_path.iterdir()) == []


def test_cli(artifact: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "repo"
    result = runner.invoke(cli, ["triton", str(artifact), "--out", str(out), "--towers", "text", "--kind", "cpu",
                                 "--instances", "2"])
    assert result.exit_code == 0, result.output
    assert "clip_text: clip_text_tokenize -> clip_text_encoder (onnxruntime_onnx)" in result.output
    configs = _configs(out)
    assert [(g.count, g.kind) for g in configs["clip_text_encoder"].instance_group] == [
        (2, model_config_pb2.ModelInstanceGroup.KIND_CPU)]
    result = runner.invoke(cli, ["triton", str(artifact), "--out", str(out)])
    assert result.exit_code == 1 and "error:" in result.output and "--force" in result.output
    assert "Traceback" not in result.output
    result = runner.invoke(cli, ["triton", str(artifact), "--out", str(tmp_path / "x"), "--towers", "image,sound"])
    assert result.exit_code == 1 and "'sound'" in result.output


# -- the dims gate: what preprocess and the tokenizer make must be what the graph takes ---------

@pytest.fixture
def dims_check_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """These cases edit the manifest's shapes without a graph to match: the graph check (which
    refuses any such manifest first) is switched off so the dims check beneath it is what runs."""
    from clipexport.triton import repository

    monkeypatch.setattr(repository, "check_graphs", lambda directory, manifest: None)


def test_the_graph_check_refuses_an_edited_shape_first(artifact: Path, tmp_path: Path) -> None:
    def edit(manifest: dict[str, Any]) -> None:
        manifest["towers"]["image"]["inputs"][0]["shape"] = ["batch", 3, 32, 48]

    with pytest.raises(ArtifactError, match="not this tower's graph"):
        write_repository(_copy(artifact, tmp_path, edit), TritonOptions(out=tmp_path / "repo"))
    assert not (tmp_path / "repo").exists()


@pytest.mark.usefixtures("dims_check_only")
def test_non_square_image_size_keeps_height_then_width(artifact: Path, tmp_path: Path) -> None:
    """Every twin is square; a (3, W, H) transposition only shows with a non-square size."""
    def edit(manifest: dict[str, Any]) -> None:
        manifest["preprocess"]["size"] = [32, 48]  # (height, width)
        manifest["towers"]["image"]["inputs"][0]["shape"] = ["batch", 3, 32, 48]

    write_repository(_copy(artifact, tmp_path, edit), TritonOptions(out=tmp_path / "repo", towers=("image",)))
    configs = _configs(tmp_path / "repo")
    assert [list(o.dims) for o in configs["clip_image_preprocess"].output] == [[3, 32, 48]]
    assert [list(i.dims) for i in configs["clip_image_encoder"].input] == [[3, 32, 48]]
    settings = json.loads((tmp_path / "repo" / "clip_image_preprocess" / "1" / "clipexport.json").read_text())
    assert settings["preprocess"]["size"] == [32, 48]


@pytest.mark.usefixtures("dims_check_only")
@pytest.mark.parametrize(("size", "shape", "message"), [
    ([48, 32], ["batch", 3, 32, 48], r"the graph takes \[3, 32, 48\] but preprocess gives \[3, 48, 32\]"),
    (32, ["batch", 3, 48, 48], r"the graph takes \[3, 48, 48\] but preprocess gives \[3, 32, 32\]"),
])
def test_manifest_whose_image_graph_disagrees_with_preprocess_writes_nothing(artifact: Path, tmp_path: Path,
                                                                            size: Any, shape: list[Any],
                                                                            message: str) -> None:
    def edit(manifest: dict[str, Any]) -> None:
        manifest["preprocess"]["size"] = size
        manifest["towers"]["image"]["inputs"][0]["shape"] = shape

    with pytest.raises(ArtifactError, match=message):
        write_repository(_copy(artifact, tmp_path, edit), TritonOptions(out=tmp_path / "repo"))
    assert not (tmp_path / "repo").exists()


@pytest.mark.usefixtures("dims_check_only")
def test_manifest_whose_text_graph_disagrees_with_the_context_length_writes_nothing(artifact: Path,
                                                                                    tmp_path: Path) -> None:
    def edit(manifest: dict[str, Any]) -> None:
        manifest["towers"]["text"]["inputs"][0]["shape"] = ["batch", 77]  # an untrimmed graph: 77 tokens exactly
        manifest["tokenizer"]["context_length"] = 76

    with pytest.raises(ArtifactError, match=r"the graph takes \[77\] tokens but the tokenizer makes 76"):
        write_repository(_copy(artifact, tmp_path, edit), TritonOptions(out=tmp_path / "repo"))
    assert not (tmp_path / "repo").exists()
    fixed = _copy(artifact, tmp_path / "fixed", lambda m: m["towers"]["text"]["inputs"][0].update(shape=["batch", 77]))
    write_repository(fixed, TritonOptions(out=tmp_path / "repo", towers=("text",)))
    assert [list(i.dims) for i in _configs(tmp_path / "repo")["clip_text_encoder"].input] == [[77]]
