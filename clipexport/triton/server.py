"""Run the `tritonserver` that the `nvidia-pytriton` wheel bundles, on a model repository of ours.

    with TritonServer(repo, Ports.free()) as server:       # waits until /v2/health/ready says 200
        server.http_url                                     # "127.0.0.1:PORT"

The wheel carries the server binary, the Python backend and one Python-backend stub per Python
version (`pytriton/tritonserver/...`). Three things make it run our Python models here, each a
trap seen on this machine (../shared/FACTS.md, "Triton here"):

- The backend directory must hold the stub next to libtriton_python.so: we make one of symlinks
  (symlinks, not copies: the stub finds its bundled libraries by a path relative to itself).
- The stub links libpython3.X.so; a system copy of another patch release breaks model loading,
  so the running interpreter's LIBDIR goes first in LD_LIBRARY_PATH.
- The stub's embedded Python ignores PYTHONPATH and takes its prefix from the `python3` it finds
  on PATH. We give it a throw-away virtual environment whose one .pth file lists this process's
  sys.path, so a model imports exactly the clipexport, numpy and onnxruntime we import.
- The stub (pybind11 built against numpy 1.x) reads numpy 2 arrays wrongly: every element of a
  tensor comes out as its first byte, so a TYPE_STRING input cannot even be parsed. Its Python
  needs numpy<2 (what nvidia-pytriton pins). Where this process has numpy 2, a directory holding
  numpy 1.x goes first on the stub's path: $CLIPEXPORT_TRITON_PYTHONPATH, else
  <sys.prefix>/triton-stub-site (where .ci/run installs it:
  `pip install --no-deps --target .venv/triton-stub-site 'numpy<2'`).

Nothing here imports pytriton's Python package (it pins numpy<2); only its files are used.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from clipexport.errors import ClipExportError, UsageError

#: Seconds tritonserver waits for in-flight requests after SIGTERM/SIGINT before it gives up.
DEFAULT_EXIT_TIMEOUT_S = 30
GUARD_FILE = Path(__file__).with_name("guard.py")
#: Directories put first on the stub's sys.path (os.pathsep-separated), e.g. one holding numpy<2.
STUB_PATH_ENV = "CLIPEXPORT_TRITON_PYTHONPATH"
STUB_SITE_DIR = "triton-stub-site"


class ServerError(ClipExportError):
    """tritonserver could not be found, did not start, or died."""


@dataclass(frozen=True)
class BundledTriton:
    """Paths inside the installed nvidia-pytriton wheel."""

    binary: Path
    backend: Path  # backends/python: libtriton_python.so, triton_python_backend_utils.py
    stub: Path  # python_backend_stubs/3.X/triton_python_backend_stub for this interpreter
    libs: Path  # nvidia_pytriton.libs: the shared libraries the binary and stub were linked with


def bundled_triton() -> BundledTriton:
    """The bundled server for this interpreter, or a UsageError saying how to get it."""
    spec = importlib.util.find_spec("pytriton")  # finds the package without running its __init__
    if spec is None or not spec.submodule_search_locations:
        raise UsageError("the Triton server comes with the nvidia-pytriton wheel: "
                         "pip install 'clipexport[serve]' (Linux x86_64/aarch64, glibc 2.35+)")
    root = Path(next(iter(spec.submodule_search_locations))) / "tritonserver"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    found = BundledTriton(binary=root / "bin" / "tritonserver", backend=root / "backends" / "python",
                          stub=root / "python_backend_stubs" / version / "triton_python_backend_stub",
                          libs=root.parent.parent / "nvidia_pytriton.libs")
    for path in (found.binary, found.backend / "libtriton_python.so", found.stub):
        if not path.exists():
            raise UsageError(f"nvidia-pytriton is installed but lacks {path} (Python {version} needs a "
                             "stub for its own version; the wheel carries 3.8-3.13)")
    return found


@dataclass(frozen=True)
class Ports:
    http: int = 8000
    grpc: int = 8001
    metrics: int = 8002

    @classmethod
    def free(cls, host: str = "127.0.0.1") -> Ports:
        """Three ports nothing listens on right now (the OS picks them)."""
        socks = []
        try:
            for _ in range(3):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                s.bind((host, 0))
                socks.append(s)
            http, grpc, metrics = (s.getsockname()[1] for s in socks)
        finally:
            for s in socks:
                s.close()
        return cls(http, grpc, metrics)


def server_command(repo: Path, ports: Ports, backend_dir: Path, host: str = "127.0.0.1",
                   exit_timeout_s: int = DEFAULT_EXIT_TIMEOUT_S, bundled: BundledTriton | None = None) -> list[str]:
    """The tritonserver command line: every endpoint on `host`, models all loaded or none.

    Explicit model control (every model loaded at start) so that drain() can unload them: the
    one way Triton refuses new requests on open keep-alive connections while it finishes the
    requests already queued (after SIGTERM it keeps serving open connections until they close).
    """
    bundled = bundled or bundled_triton()
    return [str(bundled.binary), "--model-repository", str(repo), "--backend-directory", str(backend_dir),
            "--http-address", host, "--http-port", str(ports.http),
            "--grpc-address", host, "--grpc-port", str(ports.grpc),
            "--metrics-address", host, "--metrics-port", str(ports.metrics),
            "--allow-metrics", "true", "--allow-gpu-metrics", "false", "--allow-cpu-metrics", "true",
            "--strict-readiness", "true", "--exit-on-error", "true", "--exit-timeout-secs", str(exit_timeout_s),
            "--model-control-mode", "explicit", "--load-model", "*",
            "--log-verbose", "0"]


def stub_path_first() -> list[str]:
    """Directories to put before our sys.path in the stub: numpy<2 where we run numpy 2.

    Raises UsageError when the stub would get numpy 2 and no numpy 1.x directory is given.
    """
    configured = os.environ.get(STUB_PATH_ENV)
    if configured:
        first = [p for p in configured.split(os.pathsep) if p]
    else:
        default = Path(sys.prefix) / STUB_SITE_DIR
        first = [str(default)] if default.is_dir() else []
    numpy_dirs = [d for d in first if (Path(d) / "numpy" / "__init__.py").is_file()]
    if numpy_dirs:
        version = _numpy_version(Path(numpy_dirs[0]))
    else:
        import numpy

        version = numpy.__version__
    if int(version.split(".")[0]) >= 2:
        raise UsageError(f"Triton's Python-backend stub (nvidia-pytriton) needs numpy<2, and it would get numpy "
                         f"{version}: install numpy<2 into a directory (pip install --no-deps --target "
                         f"{Path(sys.prefix) / STUB_SITE_DIR} 'numpy<2') or name one in ${STUB_PATH_ENV}")
    return first


def _numpy_version(directory: Path) -> str:
    for meta in sorted(directory.glob("numpy-*.dist-info")):
        return meta.name[len("numpy-"):-len(".dist-info")]
    return "unknown"


def prepare_environment(workdir: Path, bundled: BundledTriton | None = None,
                        sys_path: Sequence[str] | None = None) -> tuple[Path, dict[str, str]]:
    """A backend directory and the environment for tritonserver, made under `workdir`.

    Returns (backend_dir, env). sys_path: what the stub's Python imports from (default: the
    numpy<2 directory of stub_path_first(), then ours).
    """
    bundled = bundled or bundled_triton()
    if sys_path is None:
        sys_path = [*stub_path_first(), *sys.path]
    backend_dir = workdir / "backends"
    (backend_dir / "python").mkdir(parents=True, exist_ok=True)
    for source in [*sorted(bundled.backend.iterdir()), bundled.stub]:
        if source.is_file():
            link = backend_dir / "python" / source.name
            if not link.exists():
                link.symlink_to(source)

    # A virtual environment of nothing but a .pth file: the stub's Python finds pyvenv.cfg next
    # to bin/python3 (found on PATH), and site adds each line of the .pth to sys.path.
    venv = workdir / "python-env"
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    site_dir = venv / "lib" / version / "site-packages"
    site_dir.mkdir(parents=True, exist_ok=True)
    (venv / "bin").mkdir(exist_ok=True)
    real_python = Path(sys.executable).resolve()
    for name in ("python3", version):
        if not (venv / "bin" / name).exists():
            (venv / "bin" / name).symlink_to(real_python)
    (venv / "pyvenv.cfg").write_text(f"home = {real_python.parent}\ninclude-system-site-packages = false\n"
                                     f"version = {sys.version_info.major}.{sys.version_info.minor}."
                                     f"{sys.version_info.micro}\n", encoding="utf-8")
    entries = [str(Path(p).resolve()) for p in sys_path if p]
    (site_dir / "clipexport-server.pth").write_text("".join(e + "\n" for e in entries if "\n" not in e),
                                                    encoding="utf-8")

    env = dict(os.environ)
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (libdir, str(bundled.libs), env.get("LD_LIBRARY_PATH", ""))
                                             if p)
    env["PATH"] = os.pathsep.join([str(venv / "bin"), env.get("PATH", "")])
    env.pop("PYTHONHOME", None)
    return backend_dir, env


def _post(url: str, timeout_s: float) -> None:
    request = urllib.request.Request(url, data=b"{}", method="POST", headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        response.read()


def model_states(http_url: str, timeout_s: float = 2.0) -> dict[str, str]:
    """{model name: state} from Triton's repository index (READY, UNLOADING, UNAVAILABLE, ...)."""
    import json

    request = urllib.request.Request(f"http://{http_url}/v2/repository/index", data=b"{}", method="POST")
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        return {str(m["name"]): str(m.get("state", "")) for m in json.loads(response.read())}


def ready(http_url: str, timeout_s: float = 1.0) -> bool:
    """Whether Triton's readiness endpoint answers 200 (every model loaded)."""
    try:
        with urllib.request.urlopen(f"http://{http_url}/v2/health/ready", timeout=timeout_s) as response:
            return int(response.status) == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


class TritonServer:
    """tritonserver on `repo` as a child process; a context manager that waits for readiness.

    The child is guard.py, which runs tritonserver in a session of its own and kills that whole
    session (tritonserver and its Python stubs) when it ends or when we die, even by SIGKILL. A
    Ctrl-C in a terminal reaches only us; we decide what tritonserver gets. Its log goes to `log`
    (default: a file in the work directory).
    """

    def __init__(self, repo: Path, ports: Ports | None = None, host: str = "127.0.0.1",
                 exit_timeout_s: int = DEFAULT_EXIT_TIMEOUT_S, workdir: Path | None = None,
                 log: IO[Any] | None = None, start_timeout_s: float = 120.0) -> None:
        self.repo = Path(repo)
        self.ports = ports or Ports.free(host)
        self.host = host
        self.exit_timeout_s = exit_timeout_s
        self.start_timeout_s = start_timeout_s
        self._own_workdir = workdir is None
        self.workdir = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="clipexport-triton-"))
        self._log = log
        self.log_path: Path | None = None
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def http_url(self) -> str:
        return f"{_url_host(self.host)}:{self.ports.http}"

    @property
    def grpc_url(self) -> str:
        return f"{_url_host(self.host)}:{self.ports.grpc}"

    @property
    def metrics_url(self) -> str:
        return f"http://{_url_host(self.host)}:{self.ports.metrics}/metrics"

    def start(self) -> None:
        """Launch tritonserver; return once it reports ready, or raise ServerError with its log's tail."""
        bundled = bundled_triton()
        backend_dir, env = prepare_environment(self.workdir, bundled)
        command = server_command(self.repo, self.ports, backend_dir, self.host, self.exit_timeout_s, bundled)
        if self._log is None:
            self.log_path = self.workdir / "tritonserver.log"
            out: Any = open(self.log_path, "wb")  # noqa: SIM115 (kept open for the child's lifetime)
        else:
            out = self._log
        guard = [sys.executable, "-I", str(GUARD_FILE), str(os.getpid())]
        self.process = subprocess.Popen([*guard, *command], env=env, stdout=out, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerError(f"tritonserver exited with status {self.process.returncode} while starting:\n"
                                  f"{self.log_tail()}")
            if ready(self.http_url):
                return
            time.sleep(0.2)
        self.kill()
        raise ServerError(f"tritonserver was not ready within {self.start_timeout_s:.0f} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        if self.log_path is None or not self.log_path.exists():
            return "(log not captured)"
        text = self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()
        # Triton prints wide ASCII tables; the error lines are what a reader needs.
        return "\n".join(line for line in text if not line.startswith(("+-", "| ", "|  ")))[-6000:] if text else ""

    def signal(self, signum: int) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signum)

    def drain(self, timeout_s: float | None = None) -> bool:
        """Stop taking requests and finish those Triton holds: unload every model and wait.

        New requests (on new or open connections) get "model not ready" at once; the queued and
        running ones are answered first (Triton unloads a model after its in-flight requests).
        True when every model was unloaded within `timeout_s` (default: the exit timeout).
        """
        deadline = time.monotonic() + (timeout_s if timeout_s is not None else self.exit_timeout_s)
        try:
            names = list(model_states(self.http_url))
            for name in names:
                _post(f"http://{self.http_url}/v2/repository/models/{name}/unload", timeout_s=5.0)
            while time.monotonic() < deadline:
                states = model_states(self.http_url)
                if all(states.get(n) not in ("READY", "UNLOADING", "LOADING") for n in names):
                    return True
                time.sleep(0.1)
        except (urllib.error.URLError, OSError, ValueError):
            return False
        return False

    def shutdown(self, drain_timeout_s: float | None = None, grace_s: float = 5.0) -> tuple[bool, int]:
        """drain(), then SIGTERM; SIGKILL when tritonserver still waits for clients' open
        connections after `grace_s` (nothing is left in flight by then). Returns (drained, status)."""
        assert self.process is not None
        drained = self.drain(drain_timeout_s)
        self.signal(signal.SIGTERM)
        try:
            status = self.process.wait(timeout=grace_s if drained else self.exit_timeout_s + 5)
        except subprocess.TimeoutExpired:
            self.kill()
            status = 0 if drained else -signal.SIGKILL
        return drained, status if status is not None else -1

    def stop(self, timeout_s: float | None = None) -> int:
        """SIGTERM: Triton stops taking requests, answers those in flight, exits. Returns its status."""
        assert self.process is not None
        self.signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout_s if timeout_s is not None else self.exit_timeout_s + 15)
        except subprocess.TimeoutExpired:
            self.kill()
            return self.process.wait()

    def kill(self, wait: bool = True) -> None:
        """SIGKILL tritonserver and everything in its session (the Python-backend stubs), via the guard.

        wait=False from a signal handler: the interrupted main thread may be inside wait() itself.
        """
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(self.process.pid, signal.SIGUSR1)
        if wait:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=10)

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.stop()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> TritonServer:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _url_host(host: str) -> str:
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


__all__ = ["DEFAULT_EXIT_TIMEOUT_S", "BundledTriton", "Ports", "ServerError", "TritonServer", "bundled_triton",
           "model_states", "prepare_environment", "ready", "server_command", "stub_path_first"]
