"""`clipexport serve DIR`: the click command, and what it does with signals.

The command checks the artifact (clipexport.load: every file against manifest.json), writes the
model repository into a temporary directory, starts tritonserver on it and waits. Signals:

    first SIGTERM / SIGINT   every model is unloaded: Triton refuses new requests (on open
                             connections too) and answers those it holds first; then tritonserver
                             gets SIGTERM (SIGKILL if it still waits for idle client connections
                             after 5 s). We exit 0, or 1 when requests were still in flight after
                             --exit-timeout seconds.
    a second one             tritonserver and its Python stubs get SIGKILL; we exit at once
                             with status 128 + the signal's number

tritonserver runs in its own session (a terminal's Ctrl-C reaches only us) and dies with us.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from types import FrameType
from typing import Any

import click

from clipexport.errors import ClipExportError

EPILOG = """\b
Models (the names and tensors of `clipexport triton`'s ensembles, so one client serves both):
  clip_image  input "image" BYTES [N, 1] (encoded image files)  -> "embedding" FP32 [N, D]
  clip_text   input "text"  BYTES [N, 1] (UTF-8)                -> "embedding" FP32 [N, D]
A bad request (not an image, empty text, over --max-request-bytes, a wrong tensor) gets an error
naming the problem; the requests batched with it are answered as usual.

\b
Examples:
  clipexport serve engines/ViT-B-32-none-fp32
  clipexport serve engines/ViT-B-32-none-fp32 --http-port 9000 --grpc-port 9001 --metrics-port 9002 --normalize
"""


@click.command(name="serve", epilog=EPILOG)
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address of every endpoint (0.0.0.0: all interfaces).")
@click.option("--http-port", type=click.IntRange(1, 65535), default=8000, show_default=True)
@click.option("--grpc-port", type=click.IntRange(1, 65535), default=8001, show_default=True)
@click.option("--metrics-port", type=click.IntRange(1, 65535), default=8002, show_default=True,
              help="Prometheus metrics (Triton's own).")
@click.option("--normalize", is_flag=True, help="Unit-length embeddings (default: as the tower computes them).")
@click.option("--max-batch", type=click.IntRange(min=1), default=None, metavar="N",
              help="Largest batch Triton forms [default: min(32, the artifact's verified maximum)].")
@click.option("--max-queue-delay-us", type=click.IntRange(min=0), default=500, show_default=True, metavar="US",
              help="Dynamic batcher: microseconds a request may wait for a fuller batch.")
@click.option("--instances", type=click.IntRange(min=1), default=1, show_default=True, metavar="N",
              help="Model instances per tower (each a process with its own copy of the tower).")
@click.option("--backend", type=click.Choice(["auto", "onnxruntime", "tensorrt", "pytorch"]), default="auto",
              show_default=True, help="What runs the towers (as clipexport.load).")
@click.option("--device", default=None, help="cpu, cuda, cuda:N [default: the backend's best].")
@click.option("--max-request-bytes", type=click.IntRange(min=1), default=16 * 1024 * 1024, show_default=True,
              metavar="BYTES", help="Largest input of one request; a larger one is refused.")
@click.option("--exit-timeout", "exit_timeout_s", type=click.IntRange(min=1), default=30, show_default=True,
              metavar="S", help="After SIGTERM/SIGINT: seconds to finish the requests in flight.")
def serve(directory: Path, host: str, http_port: int, grpc_port: int, metrics_port: int, normalize: bool,
          max_batch: int | None, max_queue_delay_us: int, instances: int, backend: str, device: str | None,
          max_request_bytes: int, exit_timeout_s: int) -> None:
    """Serve the artifact in DIRECTORY on Triton Inference Server (HTTP, gRPC, metrics).

    Needs `pip install 'clipexport[serve]'` (nvidia-pytriton's tritonserver, Linux). Health and
    readiness are Triton's: GET /v2/health/ready answers 200 once both towers are loaded.
    """
    from clipexport.serve.repository import ServeOptions, write_serve_repository
    from clipexport.triton.server import Ports, ServerError, TritonServer, bundled_triton, stub_path_first

    state: dict[str, Any] = {"signals": 0, "server": None, "workdir": None, "ready": False}

    def on_signal(signum: int, frame: FrameType | None) -> None:
        state["signals"] += 1
        server = state["server"]
        if state["signals"] == 1:
            # The main loop drains: HTTP calls do not belong in a signal handler.
            click.echo(f"{signal.Signals(signum).name}: finishing requests in flight (up to {exit_timeout_s} s); "
                       "send it again to stop at once", err=True)
            if server is not None and not state["ready"]:
                server.signal(signal.SIGTERM)  # still loading: nothing is in flight, stop now
            return
        if server is not None:
            server.kill(wait=False)
        if state["workdir"] is not None:
            shutil.rmtree(state["workdir"], ignore_errors=True)
        os._exit(128 + signum)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        try:
            from clipexport.runtime import load

            # The manifest check (every file's sha256) happens here, before anything listens.
            with load(directory, backend=backend, device=device) as rt:
                facts = (rt.towers, rt.embed_dim, rt.batch_max, rt.model, rt.backend, rt.device)
            towers, embed_dim, batch_max, model, used_backend, used_device = facts
            if embed_dim is None:
                raise ClipExportError(f"{directory}: the manifest gives no embedding size")
            bundled_triton()
            stub_path_first()
            if state["signals"]:
                sys.exit(0)
            workdir = Path(tempfile.mkdtemp(prefix="clipexport-serve-"))
            state["workdir"] = workdir
            repo = write_serve_repository(
                directory, workdir / "repository", towers, embed_dim, batch_max,
                ServeOptions(backend=backend, device=device, normalize=normalize, max_batch=max_batch,
                             max_queue_delay_us=max_queue_delay_us, instances=instances,
                             max_request_bytes=max_request_bytes))
            server = TritonServer(repo.path, Ports(http_port, grpc_port, metrics_port), host=host,
                                  exit_timeout_s=exit_timeout_s, workdir=workdir, log=sys.stderr)
            state["server"] = server
            click.echo(f"serving {directory} ({model}; {used_backend} on {used_device}; "
                       f"embeddings [{embed_dim}]{', normalized' if normalize else ''}; batches up to "
                       f"{repo.max_batch})")
            try:
                server.start()
            except ServerError:
                if state["signals"]:  # stopped while starting: what was asked for
                    sys.exit(0)
                raise
            state["ready"] = True
            names = ", ".join(repo.models.values())
            click.echo(f"ready: {names}\n  http     {server.http_url}\n  grpc     {server.grpc_url}\n"
                       f"  metrics  {server.metrics_url}", nl=True)
            sys.stdout.flush()
            assert server.process is not None
            status = server.process.poll()
            while status is None and not state["signals"]:
                try:
                    status = server.process.wait(timeout=0.2)
                except subprocess.TimeoutExpired:
                    pass
            if status is not None:
                raise ClipExportError(f"tritonserver exited on its own with status {status} (its log is above)")
            drained, status = server.shutdown(drain_timeout_s=exit_timeout_s)
            if not drained:
                raise ClipExportError(f"requests were still in flight after {exit_timeout_s} s (--exit-timeout); "
                                      f"tritonserver exited with status {status}")
            click.echo("stopped", err=True)
            return
        except ClipExportError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(1)
    finally:
        server = state["server"]
        if server is not None:
            server.close()
        if state["workdir"] is not None:
            shutil.rmtree(state["workdir"], ignore_errors=True)
        for signum, handler in previous.items():
            signal.signal(signum, handler)
