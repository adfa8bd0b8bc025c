"""`clipexport serve` as a user runs it: a child process serving a tiny-twin artifact on Triton
(nvidia-pytriton's bundled tritonserver), on free loopback ports; real HTTP and gRPC clients.

One server per module for the request tests (dynamic batching with a 400 ms window and batches of
up to 8, so concurrent requests share one batch); the signal tests start their own.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from serving import TEXTS, Served, encoded_images, infer_grpc, infer_http, model_stats, require_bundled_triton

from clipexport.cli import cli
from clipexport.runtime import Runtime, load

MAX_REQUEST_BYTES = 100_000


@pytest.fixture(scope="module")
def rt(vit_artifact: Path) -> Runtime:
    return load(vit_artifact, backend="onnxruntime", device="cpu")


@pytest.fixture(scope="module")
def served(vit_artifact: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    require_bundled_triton()
    server = Served(vit_artifact, "--max-batch", "8", "--max-queue-delay-us", "400000",
                    "--max-request-bytes", str(MAX_REQUEST_BYTES), log_dir=tmp_path_factory.mktemp("serve"))
    try:
        yield server.wait_ready()
    finally:
        server.kill()


def _error(fn: object, *args: object) -> str:
    from tritonclient.utils import InferenceServerException

    with pytest.raises(InferenceServerException) as info:
        fn(*args)  # type: ignore[operator]
    return str(info.value)


def test_serve_embeddings_match_runtime_over_http_and_grpc(served: Served, rt: Runtime) -> None:
    assert served.stdout[-1].strip() == "ready: clip_image, clip_text"
    images = encoded_images(4)
    expected_images = rt.encode_image(images, normalize=False)
    with pytest.warns(UserWarning):  # the long caption is cut on both sides alike
        expected_texts = rt.encode_text(TEXTS, normalize=False)
    for infer, url in ((infer_http, served.http_url), (infer_grpc, served.grpc_url)):
        got = infer(url, "clip_image", "image", images)
        assert got.dtype == np.float32 and got.shape == (4, 24)
        assert float(np.abs(got - expected_images).max()) < 1e-5
        got = infer(url, "clip_text", "text", [t.encode("utf-8") for t in TEXTS])
        assert float(np.abs(got - expected_texts).max()) < 1e-5
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{served.ports.metrics}/metrics", timeout=10) as response:
        metrics = response.read().decode()
    assert 'nv_inference_request_success{model="clip_image",version="1"}' in metrics


def _concurrently(url: str, model: str, name: str, values: list[list[bytes]]) -> list[object]:
    """Send one request per entry at once; each entry's embedding array or exception, in order."""
    with ThreadPoolExecutor(len(values)) as pool:
        futures = [pool.submit(infer_http, url, model, name, v) for v in values]
        return [f.exception() or f.result() for f in futures]


def test_bad_requests_fail_alone_inside_one_dynamic_batch(served: Served, rt: Runtime) -> None:
    images = encoded_images(3, seed=7)
    expected = rt.encode_image(images, normalize=False)
    before = model_stats(served.http_url, "clip_image")
    values = [[images[0]], [b"GIF89a, truncated"], [images[1]], [b""], [b"\0" * (MAX_REQUEST_BYTES + 1)],
              [images[2]]]
    results = _concurrently(served.http_url, "clip_image", "image", values)
    after = model_stats(served.http_url, "clip_image")
    formed = {size: count - before.get(size, 0) for size, count in after.items() if count != before.get(size, 0)}
    assert formed == {6: 1}, f"expected the 6 requests in one batch, Triton formed {formed}"
    assert "image 0" in str(results[1]) and "not an image file" in str(results[1])
    assert all(str(results[i]).startswith("[400]") for i in (1, 3, 4)), results  # the client's fault, not ours
    assert "empty (0 bytes)" in str(results[3])
    assert f"over this server's limit of {MAX_REQUEST_BYTES}" in str(results[4])
    for i, row in ((0, 0), (2, 1), (5, 2)):
        assert isinstance(results[i], np.ndarray), results[i]
        assert float(np.abs(results[i][0] - expected[row]).max()) < 1e-5  # type: ignore[index]

    texts = ["a photo of a cat.", "a diagram"]
    expected = rt.encode_text(texts, normalize=False)
    results = _concurrently(served.http_url, "clip_text", "text",
                            [[texts[0].encode()], [b""], [b"\xff\xfe not utf-8"], [b"   "], [texts[1].encode()]])
    assert "text 0: empty" in str(results[1]) and "not UTF-8" in str(results[2]) and "text 0: empty" in str(results[3])
    assert float(np.abs(results[0][0] - expected[0]).max()) < 1e-5  # type: ignore[index]
    assert float(np.abs(results[4][0] - expected[1]).max()) < 1e-5  # type: ignore[index]


def test_wrong_tensors_are_refused_and_the_server_stays_up(served: Served) -> None:
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(served.http_url)

    def send(name: str, shape: list[int], dtype: str, array: np.ndarray) -> None:
        tensor = httpclient.InferInput(name, shape, dtype)
        tensor.set_data_from_numpy(array)
        client.infer("clip_image", [tensor])

    image = encoded_images(1)[0]
    assert "'picture'" in _error(send, "picture", [1, 1], "BYTES", np.array([[image]], dtype=object))
    message = _error(send, "image", [1, 1], "FP32", np.zeros((1, 1), np.float32))
    assert "data-type" in message and "BYTES" in message
    message = _error(send, "image", [1, 2], "BYTES", np.array([[image, image]], dtype=object))
    assert "shape" in message and "[1,2]" in message.replace(" ", "")
    message = _error(send, "image", [9, 1], "BYTES", np.array([[image]] * 9, dtype=object))  # over --max-batch 8
    assert "batch" in message
    assert client.is_server_ready() and client.is_model_ready("clip_image") and client.is_model_ready("clip_text")
    assert infer_http(served.http_url, "clip_image", "image", [image]).shape == (1, 24)
    client.close()


def test_sigterm_finishes_requests_in_flight_and_exits_0(vit_artifact: Path, rt: Runtime, tmp_path: Path) -> None:
    require_bundled_triton()
    # A 2 s batching window: the requests below are still queued in Triton when SIGTERM comes.
    server = Served(vit_artifact, "--normalize", "--max-queue-delay-us", "2000000", "--exit-timeout", "20",
                    log_dir=tmp_path).wait_ready()
    images = encoded_images(3, seed=3)
    import tritonclient.http as httpclient

    keep_alive = httpclient.InferenceServerClient(server.http_url)  # a connection opened before the signal
    try:
        tensor = httpclient.InferInput("image", [1, 1], "BYTES")
        tensor.set_data_from_numpy(np.array([[images[0]]], dtype=object))
        assert keep_alive.infer("clip_image", [tensor]).as_numpy("embedding").shape == (1, 24)
        with ThreadPoolExecutor(6) as pool:
            futures = [pool.submit(infer_http, server.http_url, "clip_image", "image", [im], 30) for im in images]
            time.sleep(0.8)
            sent = time.monotonic()
            server.process.send_signal(signal.SIGTERM)
            time.sleep(0.2)
            late = pool.submit(infer_http, server.http_url, "clip_image", "image", images[:1], 10)
            # Triton keeps serving open connections after SIGTERM; the drain must refuse them too.
            reused = pool.submit(keep_alive.infer, "clip_image", [tensor])
            status = server.process.wait(30)
            took = time.monotonic() - sent
        expected = rt.encode_image(images, normalize=True)
        for future, row in zip(futures, expected):
            got = future.result()[0]
            assert abs(float(np.linalg.norm(got)) - 1.0) < 1e-5  # --normalize
            assert float(np.abs(got - row).max()) < 1e-5
        assert late.exception() is not None  # not accepted after the signal
        assert reused.exception() is not None
        assert status == 0 and took < 20, (status, took, server.log_tail())
    finally:
        keep_alive.close()
        server.kill()


def test_second_signal_exits_at_once(vit_artifact: Path, tmp_path: Path) -> None:
    require_bundled_triton()
    server = Served(vit_artifact, "--max-queue-delay-us", "5000000", log_dir=tmp_path).wait_ready()
    try:
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(infer_http, server.http_url, "clip_image", "image", encoded_images(1), 30)
            time.sleep(0.5)
            server.process.send_signal(signal.SIGINT)
            time.sleep(0.3)
            sent = time.monotonic()
            server.process.send_signal(signal.SIGINT)
            status = server.process.wait(10)
            took = time.monotonic() - sent
            assert pending.exception(timeout=30) is not None  # an error, not a hang
        assert status == 128 + signal.SIGINT and took < 3, (status, took)
    finally:
        server.kill()


def test_tampered_artifact_is_refused_before_anything_listens(vit_artifact: Path, tmp_path: Path) -> None:
    source = tmp_path / "artifact"
    shutil.copytree(vit_artifact, source)
    with open(source / "image.onnx", "r+b") as fh:
        fh.seek(500)
        byte = fh.read(1)
        fh.seek(500)
        fh.write(bytes([byte[0] ^ 0xFF]))
    result = CliRunner().invoke(cli, ["serve", str(source), "--http-port", "1"])
    assert result.exit_code == 1 and "image.onnx does not match its sha256" in result.output
    assert "Traceback" not in result.output and "ready" not in result.output


def test_max_batch_over_the_artifact_is_refused(vit_artifact: Path) -> None:
    require_bundled_triton()
    batch_max = json.loads((vit_artifact / "manifest.json").read_text())["batch"]["max"]
    process = subprocess.run([sys.executable, "-m", "clipexport", "serve", str(vit_artifact), "--max-batch",
                              str(batch_max + 1)], capture_output=True, text=True, timeout=120, check=False)
    assert process.returncode == 1
    assert f"--max-batch {batch_max + 1}: this artifact was verified for batches of 1..{batch_max}" in process.stderr


def test_readme_serve_snippets_run_against_a_live_server(vit_artifact: Path, rt: Runtime, tmp_path: Path) -> None:
    """The README's serve command (its options, on the twin artifact and free ports), then its
    tritonclient snippet executed and its curl request sent as written (host:port replaced)."""
    import re
    import shlex
    import urllib.request

    import tomllib

    require_bundled_triton()
    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text(encoding="utf-8")
    start = readme.index("## `clipexport serve`")
    section = readme[start:readme.index("\n## ", start + 1)]
    bash = [b.strip() for b in re.findall(r"```bash\n(.*?)```", section, flags=re.DOTALL)]
    (python_snippet,) = re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)
    install, command = bash[0].splitlines()
    assert install == "pip install 'clipexport[serve]'"
    extras = tomllib.loads((root / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(d.startswith("nvidia-pytriton") for d in extras["serve"])
    args = shlex.split(command)
    assert args[:2] == ["clipexport", "serve"]

    server = Served(vit_artifact, *args[3:], log_dir=tmp_path).wait_ready()
    try:
        namespace: dict[str, object] = {}
        exec(python_snippet.replace("127.0.0.1:8000", server.http_url), namespace)  # noqa: S102 (the README's code)
        emb = np.asarray(namespace["emb"])
        expected = rt.encode_text(["a photo of a cat", "a diagram"], normalize=True)
        assert emb.shape == (2, 24) and float(np.abs(emb - expected).max()) < 1e-5

        curl = shlex.split(bash[1])
        assert curl[:2] == ["curl", "-s"] and curl[3] == "-d"
        request = urllib.request.Request("http://" + curl[2].replace("127.0.0.1:8000", server.http_url),
                                         data=curl[4].encode(), headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            (output,) = json.loads(response.read())["outputs"]
        assert output["name"] == "embedding" and output["shape"] == [1, 24]
        assert float(np.abs(np.array(output["data"], np.float32) - expected[0]).max()) < 1e-5
    finally:
        server.kill()


def test_serve_repository_configs(vit_artifact: Path, tmp_path: Path) -> None:
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    from clipexport.errors import UsageError
    from clipexport.serve import ServeOptions, write_serve_repository

    repo = write_serve_repository(vit_artifact, tmp_path / "repo", ("image", "text"), 24, 64,
                                  ServeOptions(max_batch=4, max_queue_delay_us=750, instances=2, normalize=True,
                                               backend="onnxruntime", device="cpu"))
    assert repo.models == {"image": "clip_image", "text": "clip_text"} and repo.max_batch == 4
    for tower, name in repo.models.items():
        config = text_format.Parse((tmp_path / "repo" / name / "config.pbtxt").read_text(),
                                   model_config_pb2.ModelConfig())
        assert (config.name, config.backend, config.max_batch_size) == (name, "python", 4)
        assert [(i.name, model_config_pb2.DataType.Name(i.data_type), list(i.dims)) for i in config.input] == [
            (tower, "TYPE_STRING", [1])]
        assert [(o.name, model_config_pb2.DataType.Name(o.data_type), list(o.dims)) for o in config.output] == [
            ("embedding", "TYPE_FP32", [24])]
        assert [(g.count, g.kind) for g in config.instance_group] == [(2, model_config_pb2.ModelInstanceGroup.KIND_CPU)]
        assert config.dynamic_batching.max_queue_delay_microseconds == 750
        cfg = json.loads((tmp_path / "repo" / name / "1" / "clipexport.json").read_text())
        assert (cfg["artifact"], cfg["backend"], cfg["device"], cfg["normalize"]) == (
            str(vit_artifact.resolve()), "onnxruntime", "cpu", True)
    with pytest.raises(UsageError, match="verified for batches of 1..64"):
        write_serve_repository(vit_artifact, tmp_path / "other", ("image",), 24, 64, ServeOptions(max_batch=65))
