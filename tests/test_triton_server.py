"""`clipexport triton --encoder python` on a real server: the tritonserver nvidia-pytriton bundles.

One server per module on free loopback ports, serving a tiny-twin artifact's repository; real HTTP
and gRPC requests go through the ensembles (Python-backend preprocess/tokenize -> Python-backend
ONNX Runtime encoder) and must give clipexport.Runtime's embeddings.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from serving import TEXTS, encoded_images, infer_grpc, infer_http, require_bundled_triton

from clipexport.errors import UsageError
from clipexport.runtime import Runtime, load
from clipexport.triton import TritonOptions, write_repository

pytest.importorskip("tritonclient.grpc.model_config_pb2")


@pytest.fixture(scope="module")
def rt(vit_artifact: Path) -> Runtime:
    return load(vit_artifact, backend="onnxruntime", device="cpu")


@pytest.fixture(scope="module")
def python_repo(vit_artifact: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("triton-python") / "repo"
    write_repository(vit_artifact, TritonOptions(out=out, kind="cpu", encoder="python"))
    return out


@pytest.fixture(scope="module")
def server(python_repo: Path) -> Iterator[object]:
    require_bundled_triton()
    from clipexport.triton.server import TritonServer

    with TritonServer(python_repo) as running:
        yield running


def test_python_encoder_repository_layout(python_repo: Path, vit_artifact: Path) -> None:
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    for tower, graph_input, dims in (("image", "pixel_values", [3, 32, 32]), ("text", "input_ids", [-1])):
        version = python_repo / f"clip_{tower}_encoder" / "1"
        assert sorted(p.name for p in version.iterdir()) == ["clipexport.json", "model.onnx", "model.py"]
        assert (version / "model.onnx").read_bytes() == (vit_artifact / f"{tower}.onnx").read_bytes()
        cfg = json.loads((version / "clipexport.json").read_text())
        assert (cfg["input"], cfg["dims"], cfg["outputs"]) == (graph_input, dims, [f"{tower}_embeds"])
        config = text_format.Parse((version.parent / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
        assert config.backend == "python" and config.platform == ""
        assert [(g.count, g.kind) for g in config.instance_group] == [(1, model_config_pb2.ModelInstanceGroup.KIND_CPU)]
        assert [(i.name, list(i.dims)) for i in config.input] == [(graph_input, dims)]


def test_python_encoder_refuses_tensorrt(vit_artifact: Path, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="--encoder python runs the ONNX graph"):
        write_repository(vit_artifact, TritonOptions(out=tmp_path / "repo", encoder="python", backend="tensorrt"))
    assert not (tmp_path / "repo").exists()


def test_real_server_http_and_grpc_match_runtime(server: object, rt: Runtime) -> None:
    images = encoded_images(4)
    expected_images = rt.encode_image(images, normalize=False)
    with pytest.warns(UserWarning):  # the long caption is cut, on both sides alike
        expected_texts = rt.encode_text(TEXTS, normalize=False)
    texts = [t.encode("utf-8") for t in TEXTS]
    for infer, url in ((infer_http, server.http_url), (infer_grpc, server.grpc_url)):  # type: ignore[attr-defined]
        got = infer(url, "clip_image", "image", images)
        assert got.dtype == np.float32 and got.shape == (4, 24)
        assert float(np.abs(got - expected_images).max()) < 1e-5
        got = infer(url, "clip_text", "text", texts)
        assert got.shape == (len(TEXTS), 24)
        assert float(np.abs(got - expected_texts).max()) < 1e-5


def test_real_server_bad_request_fails_alone(server: object, rt: Runtime) -> None:
    from tritonclient.utils import InferenceServerException

    url = server.http_url  # type: ignore[attr-defined]
    images = encoded_images(3, seed=1)
    expected = rt.encode_image(images, normalize=False)
    values = [[images[0]], [b"\x89PNG but not really"], [images[1]], [images[2]]]
    with ThreadPoolExecutor(len(values)) as pool:
        futures = [pool.submit(infer_http, url, "clip_image", "image", v) for v in values]
        errors = [f.exception() for f in futures]
    assert isinstance(errors[1], InferenceServerException) and "not an image file" in str(errors[1])
    for i, row in ((0, 0), (2, 1), (3, 2)):
        assert errors[i] is None
        assert float(np.abs(futures[i].result()[0] - expected[row]).max()) < 1e-5
    from clipexport.triton.server import ready

    assert ready(url)


def test_cli_encoder_python(vit_artifact: Path, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from clipexport.cli import cli

    result = CliRunner().invoke(cli, ["triton", str(vit_artifact), "--out", str(tmp_path / "repo"), "--kind", "cpu",
                                      "--encoder", "python", "--towers", "text"])
    assert result.exit_code == 0, result.output
    assert "clip_text: clip_text_tokenize -> clip_text_encoder (python)" in result.output
    assert (tmp_path / "repo" / "clip_text_encoder" / "1" / "model.py").read_bytes() == (
        Path(__file__).resolve().parents[1] / "clipexport" / "triton" / "python_encoder.py").read_bytes()


def test_stub_numpy_must_be_1x(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The bundled stub misreads numpy 2 arrays: a numpy 2 directory for it is refused, a 1.x one used."""
    from clipexport.triton.server import STUB_PATH_ENV, stub_path_first

    for version in ("2.4.6", "1.26.4"):
        site = tmp_path / version
        (site / "numpy").mkdir(parents=True)
        (site / "numpy" / "__init__.py").write_text("")
        (site / f"numpy-{version}.dist-info").mkdir()
    monkeypatch.setenv(STUB_PATH_ENV, str(tmp_path / "2.4.6"))
    with pytest.raises(UsageError, match=r"needs numpy<2, and it would get numpy 2\.4\.6"):
        stub_path_first()
    monkeypatch.setenv(STUB_PATH_ENV, str(tmp_path / "1.26.4"))
    assert stub_path_first() == [str(tmp_path / "1.26.4")]
