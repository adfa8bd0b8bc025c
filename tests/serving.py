"""Helpers for the tests that talk to a real Triton server: inputs, clients, the bundled server."""

from __future__ import annotations

import io

import numpy as np
import pytest

TEXTS = ["a photo of a dog.", "東京の夜景 🍕", "tom &amp; jerry", "a very long caption " * 30]


def require_bundled_triton() -> None:
    """Skip (one line) where nvidia-pytriton's tritonserver is not installed."""
    from clipexport.errors import UsageError
    from clipexport.triton.server import bundled_triton

    try:
        bundled_triton()
    except UsageError as exc:
        pytest.skip(f"no bundled tritonserver: {exc}")
    pytest.importorskip("tritonclient.http")
    pytest.importorskip("tritonclient.grpc")


def encoded_images(count: int = 4, seed: int = 0) -> list[bytes]:
    """PNG/JPEG files of several sizes and modes (RGB, RGBA, L), as bytes."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    kinds = [((40, 30), "PNG", "RGB"), ((17, 64), "JPEG", "RGB"), ((32, 32), "PNG", "RGBA"), ((100, 7), "JPEG", "L")]
    out = []
    for i in range(count):
        (w, h), fmt, mode = kinds[i % len(kinds)]
        channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
        pixels = rng.integers(0, 256, (h, w, channels), dtype=np.uint8)
        image = Image.fromarray(pixels[:, :, 0] if channels == 1 else pixels, mode)
        buffer = io.BytesIO()
        image.save(buffer, format=fmt)
        out.append(buffer.getvalue())
    return out


def strings(values: list[bytes]) -> np.ndarray:
    """TYPE_STRING [N, 1]: one item per batch row, as the models take it."""
    return np.array(values, dtype=object).reshape(-1, 1)


def infer_http(url: str, model: str, name: str, values: list[bytes], timeout_s: float = 60.0) -> np.ndarray:
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(url, connection_timeout=timeout_s, network_timeout=timeout_s)
    try:
        tensor = httpclient.InferInput(name, [len(values), 1], "BYTES")
        tensor.set_data_from_numpy(strings(values))
        return client.infer(model, [tensor]).as_numpy("embedding")
    finally:
        client.close()


def infer_grpc(url: str, model: str, name: str, values: list[bytes], timeout_s: float = 60.0) -> np.ndarray:
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    try:
        tensor = grpcclient.InferInput(name, [len(values), 1], "BYTES")
        tensor.set_data_from_numpy(strings(values))
        return client.infer(model, [tensor], client_timeout=timeout_s).as_numpy("embedding")
    finally:
        client.close()


class Served:
    """`python -m clipexport serve ...` as a child process, started on free loopback ports."""

    def __init__(self, artifact: object, *args: str, log_dir: object = None) -> None:
        import subprocess
        import sys
        import tempfile
        from pathlib import Path

        from clipexport.triton.server import Ports

        self.ports = Ports.free()
        self.http_url = f"127.0.0.1:{self.ports.http}"
        self.grpc_url = f"127.0.0.1:{self.ports.grpc}"
        log_dir = Path(str(log_dir)) if log_dir is not None else Path(tempfile.mkdtemp(prefix="serve-log-"))
        self.log_path = log_dir / "serve.stderr"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 (open while the child runs)
        self.command = [sys.executable, "-m", "clipexport", "serve", str(artifact),
                        "--http-port", str(self.ports.http), "--grpc-port", str(self.ports.grpc),
                        "--metrics-port", str(self.ports.metrics), *args]
        self.process = subprocess.Popen(self.command, stdout=subprocess.PIPE, stderr=self._log, text=True)
        self.stdout: list[str] = []

    def wait_ready(self, timeout_s: float = 120.0) -> Served:
        """Read stdout until the `ready:` line; fail with the log's tail otherwise."""
        import threading

        done = threading.Event()

        def read() -> None:
            assert self.process.stdout is not None
            for line in self.process.stdout:
                self.stdout.append(line)
                if line.startswith("ready:"):
                    done.set()
                    break
            done.set()

        threading.Thread(target=read, daemon=True).start()
        done.wait(timeout_s)
        if not any(line.startswith("ready:") for line in self.stdout):
            self.kill()
            raise AssertionError(f"serve not ready; stdout {self.stdout}; log:\n{self.log_tail()}")
        return self

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")[-chars:]

    def kill(self) -> None:
        import signal

        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.send_signal(signal.SIGTERM)  # the second one: at once
            self.process.wait(30)
        self._log.close()


def model_stats(http_url: str, model: str) -> dict[int, int]:
    """{batch size: executions} from Triton's statistics endpoint."""
    import json
    import urllib.request

    with urllib.request.urlopen(f"http://{http_url}/v2/models/{model}/stats", timeout=10) as response:
        stats = json.loads(response.read())["model_stats"][0]
    return {int(b["batch_size"]): int(b["compute_infer"]["count"]) for b in stats.get("batch_stats", [])}
