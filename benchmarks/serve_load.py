"""`clipexport serve` under load and under faults, on this machine's loopback; writes serve.md.

    python benchmarks/serve_load.py                      # builds ViT-B-32 fp32 (--pretrained none)
    python benchmarks/serve_load.py --artifact DIR --requests 128 --out benchmarks/results/serve.md

Load: closed-loop HTTP clients on 127.0.0.1 (concurrency 1, 4, 16; each client sends one item
per request and waits for the answer; a fixed request count per run, and a time limit), image and
text: requests/s, p50/p99 latency, the batch sizes Triton formed (its statistics endpoint), and
the in-process runtime's throughput at the same effective batch, measured right after each run
in this process (same inputs, decoding included), so the ratio compares like with like.

Faults: SIGTERM under load (requests in flight answered, exit status); SIGKILL under load (every
client gets an error within its timeout; a restarted server answers identically); 1,000 malformed
requests interleaved with good ones (every good answer checked, every bad one refused, the RSS of
the server's processes sampled).

Loops are bounded in count and time; nothing listens beyond 127.0.0.1.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from clipexport.triton.server import Ports

CLASSES = ["tench", "goldfish", "great white shark", "tiger shark", "hammerhead", "electric ray", "stingray",
           "cock", "hen", "ostrich", "brambling", "goldfinch", "house finch", "junco", "indigo bunting", "robin"]


# -- inputs ------------------------------------------------------------------------------------

def make_images(count: int, seed: int = 0) -> list[bytes]:
    """JPEG files of photo-like sizes (smooth noise, so they compress like photos, not like static)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        w, h = [(640, 480), (480, 640), (500, 375), (800, 600)][i % 4]
        small = rng.integers(0, 256, (h // 16, w // 16, 3), dtype=np.uint8)
        image = Image.fromarray(small).resize((w, h), Image.Resampling.BILINEAR)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def make_texts(count: int) -> list[str]:
    return [f"a photo of a {CLASSES[i % len(CLASSES)]}." if i % 2 else f"a blurry photo of the {CLASSES[i % 16]}, "
            f"taken at night" for i in range(count)]


# -- the server --------------------------------------------------------------------------------

class Serve:
    def __init__(self, artifact: Path, args: list[str], ports: Ports | None = None) -> None:
        self.ports = ports or Ports.free()
        self.url = f"127.0.0.1:{self.ports.http}"
        self.log = tempfile.NamedTemporaryFile(prefix="serve-load-", suffix=".log", delete=False)  # noqa: SIM115
        command = [sys.executable, "-m", "clipexport", "serve", str(artifact), "--http-port", str(self.ports.http),
                   "--grpc-port", str(self.ports.grpc), "--metrics-port", str(self.ports.metrics), *args]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=self.log, text=True)
        assert self.process.stdout is not None
        deadline = time.monotonic() + 300
        for line in self.process.stdout:
            if line.startswith("ready:"):
                break
            if time.monotonic() > deadline:
                break
        else:
            raise RuntimeError(f"serve did not start; see {self.log.name}")

    def stats(self, model: str) -> tuple[Counter[int], int, int]:
        """({batch size: executions}, inferences, executions) so far."""
        with urllib.request.urlopen(f"http://{self.url}/v2/models/{model}/stats", timeout=10) as response:
            stats = json.loads(response.read())["model_stats"][0]
        batches = Counter({int(b["batch_size"]): int(b["compute_infer"]["count"]) for b in stats.get("batch_stats", [])})
        return batches, int(stats["inference_count"]), int(stats["execution_count"])

    def rss_mb(self) -> float:
        """Resident memory of the serve command, tritonserver and its Python stubs, in MB."""
        total = 0
        for pid in _descendants(self.process.pid) | {self.process.pid}:
            try:
                with open(f"/proc/{pid}/status", encoding="utf-8") as fh:
                    for line in fh:
                        if line.startswith("VmRSS:"):
                            total += int(line.split()[1])
            except OSError:
                pass
        return total / 1024

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                return self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.send_signal(signal.SIGTERM)
        return self.process.wait(30)


def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", encoding="utf-8") as fh:
                    ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry))
            except (OSError, ValueError, IndexError):
                pass
    out: set[int] = set()
    stack = [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            if child not in out:
                out.add(child)
                stack.append(child)
    return out


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _serve_workdirs(pid: int) -> set[str]:
    """The temporary directories (clipexport-serve-*) a serve process runs tritonserver from."""
    out = set()
    for child in _descendants(pid):
        for word in _cmdline(child).split():
            if "/clipexport-serve-" in word:
                out.add(word.split("/clipexport-serve-")[0] + "/clipexport-serve-" +
                        word.split("/clipexport-serve-")[1].split("/")[0])
    return out


def _processes_mentioning(workdirs: set[str]) -> list[int]:
    """Processes still alive whose command line names one of `workdirs` (tritonserver, stubs, guard)."""
    if not workdirs:
        return []
    return [int(e) for e in os.listdir("/proc") if e.isdigit() and any(w in _cmdline(int(e)) for w in workdirs)]


# -- clients -----------------------------------------------------------------------------------

def _client(url: str, timeout_s: float) -> Any:
    import tritonclient.http as httpclient

    return httpclient.InferenceServerClient(url, connection_timeout=timeout_s, network_timeout=timeout_s)


def _request(client: Any, model: str, name: str, value: bytes, dtype: str = "BYTES",
             shape: list[int] | None = None, array: np.ndarray | None = None) -> np.ndarray:
    import tritonclient.http as httpclient

    tensor = httpclient.InferInput(name, shape or [1, 1], dtype)
    tensor.set_data_from_numpy(array if array is not None else np.array([[value]], dtype=object))
    return client.infer(model, [tensor]).as_numpy("embedding")


@dataclass
class Outcome:
    sent: float
    done: float
    ok: bool
    error: str = ""
    value: np.ndarray | None = None


def closed_loop(url: str, model: str, name: str, items: list[bytes], concurrency: int, requests: int,
                time_limit_s: float, timeout_s: float = 30.0, stop_on_error: bool = False,
                outcomes: list[Outcome] | None = None) -> list[Outcome]:
    """`concurrency` clients, each sending one item and waiting, until `requests` were sent in all.

    outcomes: a list to append to as answers come (another thread may watch it)."""
    counter = iter(range(requests))
    lock = threading.Lock()
    outcomes = [] if outcomes is None else outcomes
    deadline = time.monotonic() + time_limit_s

    def worker() -> None:
        client = _client(url, timeout_s)
        try:
            while time.monotonic() < deadline:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                sent = time.perf_counter()
                try:
                    value = _request(client, model, name, items[i % len(items)])
                    outcome = Outcome(sent, time.perf_counter(), True, value=value[0])
                except Exception as exc:  # noqa: BLE001 (any client error is a result here)
                    outcome = Outcome(sent, time.perf_counter(), False, f"{type(exc).__name__}: {exc}")
                with lock:
                    outcomes.append(outcome)
                if stop_on_error and not outcome.ok:
                    return
        finally:
            client.close()

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(time_limit_s + timeout_s + 10)
    return outcomes


# -- load --------------------------------------------------------------------------------------

@dataclass
class LoadRow:
    tower: str
    concurrency: int
    requests: int
    failed: int
    rps: float
    p50_ms: float
    p99_ms: float
    batches: dict[int, int]
    mean_batch: float
    inprocess_ips: float
    ratio: float = field(init=False)

    def __post_init__(self) -> None:
        self.ratio = self.rps / self.inprocess_ips if self.inprocess_ips else float("nan")


def inprocess_rate(rt: Any, tower: str, items: list[Any], batch: int, total: int) -> float:
    """Items/s of the runtime in this process, `batch` items per call, decoding/tokenizing included."""
    encode: Callable[..., np.ndarray] = rt.encode_image if tower == "image" else rt.encode_text
    encode(items[:batch], batch_size=batch, normalize=False)  # warm-up
    done = 0
    start = time.perf_counter()
    while done < total:
        chunk = [items[(done + k) % len(items)] for k in range(batch)]
        encode(chunk, batch_size=batch, normalize=False)
        done += batch
    return done / (time.perf_counter() - start)


def run_load(server: Serve, rt: Any, images: list[bytes], texts: list[str], concurrencies: list[int],
             requests: int, time_limit_s: float) -> list[LoadRow]:
    rows = []
    for tower, model, name, items in (("image", "clip_image", "image", images),
                                      ("text", "clip_text", "text", [t.encode() for t in texts])):
        closed_loop(server.url, model, name, items, 2, 8, 60)  # warm-up
        raw_items: list[Any] = images if tower == "image" else texts
        for c in concurrencies:
            before, inf0, exe0 = server.stats(model)
            start = time.perf_counter()
            outcomes = closed_loop(server.url, model, name, items, c, requests, time_limit_s)
            wall = time.perf_counter() - start
            after, inf1, exe1 = server.stats(model)
            good = [o for o in outcomes if o.ok]
            latencies = np.array([o.done - o.sent for o in good]) * 1000
            formed = {b: after[b] - before.get(b, 0) for b in sorted(after) if after[b] != before.get(b, 0)}
            mean_batch = (inf1 - inf0) / max(1, exe1 - exe0)
            ips = inprocess_rate(rt, tower, raw_items, max(1, round(mean_batch)), max(32, requests // 2))
            row = LoadRow(tower, c, len(outcomes), len(outcomes) - len(good), len(good) / wall,
                          float(np.percentile(latencies, 50)) if len(good) else float("nan"),
                          float(np.percentile(latencies, 99)) if len(good) else float("nan"),
                          formed, mean_batch, ips)
            print(f"  {tower} c={c}: {row.rps:.1f} req/s, p50 {row.p50_ms:.0f} ms, p99 {row.p99_ms:.0f} ms, "
                  f"mean batch {mean_batch:.2f}, in-process {ips:.1f}/s, ratio {row.ratio:.2f}", flush=True)
            rows.append(row)
    return rows


# -- faults ------------------------------------------------------------------------------------

def _wait_for_answers(outcomes: list[Outcome], count: int, limit_s: float) -> None:
    """Until `count` requests were answered (the load is running at full concurrency), at most limit_s."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline and sum(o.ok for o in list(outcomes)) < count:
        time.sleep(0.05)


def fault_sigterm(artifact: Path, images: list[bytes], args: list[str]) -> dict[str, Any]:
    server = Serve(artifact, args)
    result: dict[str, Any] = {}
    signal_at: list[float] = []

    outcomes: list[Outcome] = []

    def send_signal() -> None:
        _wait_for_answers(outcomes, 16, 60)
        signal_at.append(time.perf_counter())
        server.process.send_signal(signal.SIGTERM)

    threading.Thread(target=send_signal, daemon=True).start()
    closed_loop(server.url, "clip_image", "image", images, 16, 100_000, 120, timeout_s=60, stop_on_error=True,
                outcomes=outcomes)
    status = server.process.wait(60)
    exited = time.perf_counter()
    t = signal_at[0]
    in_flight = [o for o in outcomes if o.sent < t and o.done > t]
    before = [o for o in outcomes if o.done <= t]
    after = [o for o in outcomes if o.sent >= t]
    result.update(
        answered_before_signal=sum(o.ok for o in before),
        in_flight_at_signal=len(in_flight), in_flight_answered=sum(o.ok for o in in_flight),
        in_flight_failed=[o.error[:120] for o in in_flight if not o.ok][:3],
        sent_after_signal=len(after), sent_after_signal_answered=sum(o.ok for o in after),
        after_signal_errors=sorted({o.error.split(":")[0] for o in after if not o.ok}),
        after_signal_message=next((o.error[:200] for o in after if not o.ok), ""),
        exit_status=status, exit_s=round(exited - t, 2))
    return result


def fault_sigkill(artifact: Path, images: list[bytes], args: list[str], timeout_s: float = 30.0) -> dict[str, Any]:
    server = Serve(artifact, args)
    client = _client(server.url, timeout_s)
    reference = np.stack([_request(client, "clip_image", "image", im)[0] for im in images[:4]])
    client.close()
    killed_at: list[float] = []

    outcomes: list[Outcome] = []

    def kill() -> None:
        _wait_for_answers(outcomes, 16, 60)
        killed_at.append(time.perf_counter())
        server.process.send_signal(signal.SIGKILL)

    workdirs = _serve_workdirs(server.process.pid)
    threading.Thread(target=kill, daemon=True).start()
    start = time.perf_counter()
    closed_loop(server.url, "clip_image", "image", images, 16, 100_000, 120, timeout_s=timeout_s,
                stop_on_error=True, outcomes=outcomes)
    t = killed_at[0]
    failed = [o for o in outcomes if not o.ok]
    hung = time.perf_counter() - start > 120
    time.sleep(1.0)
    leftovers = len(_processes_mentioning(workdirs))
    restarted = Serve(artifact, args, ports=server.ports)  # the same ports: freed by the kill
    client = _client(restarted.url, timeout_s)
    again = np.stack([_request(client, "clip_image", "image", im)[0] for im in images[:4]])
    client.close()
    status = restarted.stop()
    return {"answered_before_kill": sum(o.ok for o in outcomes if o.done <= t),
            "clients_with_error": len(failed), "clients": 16,
            "slowest_error_after_kill_s": round(max((o.done - t for o in failed), default=0.0), 2),
            "client_timeout_s": timeout_s, "hung": hung,
            "errors": sorted({o.error.split(":")[0] for o in failed}),
            "restart_same_ports": True, "restart_max_abs_diff": float(np.abs(again - reference).max()),
            "restart_exit_status": status, "orphans_after_kill": leftovers}


def fault_malformed(artifact: Path, images: list[bytes], texts: list[str], args: list[str],
                    rt: Any, count: int = 1000, max_request_bytes: int = 1_000_000) -> dict[str, Any]:
    server = Serve(artifact, [*args, "--max-request-bytes", str(max_request_bytes)])
    good_images = images[:8]
    good_texts = texts[:8]
    expected_image = rt.encode_image(good_images, normalize=False)
    expected_text = rt.encode_text(good_texts, normalize=False)
    kinds: list[tuple[str, str, str, Any]] = [
        # (kind, model, what the error must mention, how to send it)
        ("not an image", "clip_image", "not an image file", ("image", b"%PDF-1.7 not an image at all")),
        ("truncated JPEG", "clip_image", "Truncated", ("image", b"\xff\xd8\xff\xe0 truncated jpeg")),
        ("empty image", "clip_image", "empty", ("image", b"")),
        ("oversize image", "clip_image", "over this server's limit", ("image", b"\0" * (max_request_bytes + 1))),
        ("wrong tensor name", "clip_image", "unexpected inference input", ("picture", images[0])),
        ("wrong dtype", "clip_image", "data-type", "fp32"),
        ("wrong shape", "clip_image", "unexpected shape", "shape"),
        ("empty text", "clip_text", "empty", ("text", b"")),
        ("non-UTF-8 text", "clip_text", "not UTF-8", ("text", b"\xc3\x28 caf\xe9")),
    ]
    plan: list[tuple[str, int]] = []  # ("bad", kind index) or ("good-image"/"good-text", item index)
    for i in range(count):
        plan.append(("bad", i % len(kinds)))
        if i % 2 == 0:
            plan.append(("good-image" if i % 4 == 0 else "good-text", (i // 2) % 8))
    rss: list[tuple[int, float]] = [(0, server.rss_mb())]
    refused: Counter[str] = Counter()
    wrong: list[str] = []
    messages: dict[str, str] = {}
    lock = threading.Lock()
    progress = iter(range(len(plan)))

    def send(client: Any, step: tuple[str, int]) -> None:
        what, k = step
        if what == "good-image":
            got = _request(client, "clip_image", "image", good_images[k])[0]
            if float(np.abs(got - expected_image[k]).max()) > 1e-5:
                wrong.append(f"good image {k} differs")
            return
        if what == "good-text":
            got = _request(client, "clip_text", "text", good_texts[k].encode())[0]
            if float(np.abs(got - expected_text[k]).max()) > 1e-5:
                wrong.append(f"good text {k} differs")
            return
        kind, model, mention, how = kinds[k]
        try:
            if how == "fp32":
                _request(client, model, "image", b"", dtype="FP32", array=np.zeros((1, 1), np.float32))
            elif how == "shape":
                _request(client, model, "image", b"", shape=[1, 2], array=np.array([[images[0], images[1]]], dtype=object))
            else:
                _request(client, model, how[0], how[1])
        except Exception as exc:  # noqa: BLE001
            text = str(exc)
            with lock:
                messages.setdefault(kind, text[:160])
                if mention in text:
                    refused[kind] += 1
                else:
                    wrong.append(f"{kind}: {text[:120]}")
            return
        wrong.append(f"{kind} was answered")

    def worker() -> None:
        client = _client(server.url, 30)
        try:
            while True:
                with lock:
                    i = next(progress, None)
                if i is None:
                    return
                try:
                    send(client, plan[i])
                except Exception as exc:  # noqa: BLE001 (a good request that failed)
                    with lock:
                        wrong.append(f"{plan[i][0]}: {type(exc).__name__}: {exc}"[:160])
                if i and i % 300 == 0:
                    with lock:
                        rss.append((i, server.rss_mb()))
        finally:
            client.close()

    start = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        for _ in range(8):
            pool.submit(worker)
    took = time.perf_counter() - start
    rss.append((len(plan), server.rss_mb()))
    ready = server.stats("clip_image") is not None
    status = server.stop()
    goods = sum(1 for what, _ in plan if what != "bad")
    return {"malformed": count, "good": goods, "wrong": wrong[:10], "wrong_count": len(wrong),
            "refused_by_kind": dict(refused), "messages": messages, "rss_mb": [(i, round(m, 1)) for i, m in rss],
            "seconds": round(took, 1), "still_ready": ready, "exit_status": status}


# -- report ------------------------------------------------------------------------------------

def machine() -> dict[str, Any]:
    cpu = ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo", encoding="utf-8")
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "load": os.getloadavg()}


def render(meta: dict[str, Any], rows: list[LoadRow], faults: dict[str, Any]) -> str:
    lines = ["# `clipexport serve` under load and faults (CPU, loopback)", "",
             f"Written by `benchmarks/serve_load.py` on {meta['date']}. Artifact: {meta['model']} fp32 "
             f"(`--pretrained none`: random weights; speed does not depend on them), ONNX Runtime on the CPU, "
             f"served by nvidia-pytriton's bundled tritonserver with `{' '.join(meta['serve_args'])}`.", "",
             f"Machine: {meta['machine']['cpu']}, {meta['machine']['cores']} cores, Python "
             f"{meta['machine']['python']}. **The machine is shared with other developers' jobs and noisy**: "
             f"load average {meta['load_before'][0]:.1f} when the run started and {meta['load_after'][0]:.1f} "
             "when it ended. The clients (Python threads) run on the same two cores as the server, so served "
             "throughput pays for the load generator too. Compare the ratios (measured back to back in this "
             "run), not the absolute numbers. A ratio above 1 is not a real speed-up: the server does the same "
             "work plus transport. A likely cause (not measured) is that, with other jobs runnable, the "
             "served setup (client, tritonserver and stub processes) gets a larger share of the contended CPU "
             "than the one in-process loop.", "",
             "## Load", "",
             f"Closed loop: each client sends one item per HTTP request and waits; {meta['requests']} requests per "
             "run (time limit {0} s). *In-process*: `Runtime.encode_image/encode_text` on the same inputs "
             "(decoding/tokenizing included) in this process, at the run's mean batch, right after the run."
             .format(meta["time_limit_s"]), "",
             "| tower | clients | requests | failed | req/s | p50 ms | p99 ms | batches Triton formed (size×count) "
             "| mean batch | in-process items/s | served / in-process |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: |"]
    for r in rows:
        formed = ", ".join(f"{b}×{n}" for b, n in sorted(r.batches.items()))
        lines.append(f"| {r.tower} | {r.concurrency} | {r.requests} | {r.failed} | {r.rps:.1f} | {r.p50_ms:.0f} | "
                     f"{r.p99_ms:.0f} | {formed} | {r.mean_batch:.2f} | {r.inprocess_ips:.1f} | {r.ratio:.2f} |")
    c16 = [r for r in rows if r.concurrency == max(x.concurrency for x in rows)]
    lines += ["", "Goal: served ≥ 0.9× in-process at the highest concurrency: " + "; ".join(
        f"{r.tower} {r.ratio:.2f}× ({'met' if r.ratio >= 0.9 else 'not met'})" for r in c16) + ".", ""]
    lines += ["## Faults", ""]
    if meta.get("faults_date"):
        lines += [f"(Fault runs of {meta['faults_date']}, after a fix to process clean-up; the load table above is "
                  "from the first run.)", ""]
    s = faults.get("sigterm")
    if s:
        lines += ["**SIGTERM under load** (16 clients, closed loop, image; the signal once 16 requests were answered):",
                  f"- requests in flight at the signal: {s['in_flight_at_signal']}, answered: "
                  f"{s['in_flight_answered']}" + (f" (failures: {s['in_flight_failed']})" if s["in_flight_failed"] else ""),
                  f"- requests sent after the signal: {s['sent_after_signal']}, answered: "
                  f"{s['sent_after_signal_answered']} (errors: {', '.join(s['after_signal_errors']) or 'none'}; "
                  f"e.g. `{s['after_signal_message']}`)",
                  f"- `clipexport serve` exit status {s['exit_status']}, {s['exit_s']} s after the signal", ""]
    k = faults.get("sigkill")
    if k:
        lines += ["**SIGKILL under load** (of the `clipexport serve` process, once 16 requests were answered; 16 clients, client timeout "
                  f"{k['client_timeout_s']} s):",
                  f"- {k['clients_with_error']} of {k['clients']} clients got an error, the last "
                  f"{k['slowest_error_after_kill_s']} s after the kill (errors: {', '.join(k['errors'])}); "
                  f"hung: {k['hung']}",
                  f"- processes of the killed server left 1 s later: {k['orphans_after_kill']}",
                  f"- restarted on the same ports: max abs difference to the answers before the kill "
                  f"{k['restart_max_abs_diff']:.1e} (exit status after SIGTERM {k['restart_exit_status']})", ""]
    m = faults.get("malformed")
    if m:
        lines += [f"**{m['malformed']} malformed requests interleaved with {m['good']} good ones** (8 clients, "
                  f"{m['seconds']} s): wrong outcomes {m['wrong_count']}"
                  + (f" ({'; '.join(m['wrong'])})" if m["wrong"] else "") + "; server still ready: "
                  f"{m['still_ready']}; exit status after SIGTERM {m['exit_status']}.", "",
                  "| malformed kind | refused | what the client was told (first one) |", "| --- | ---: | --- |"]
        for kind, message in m["messages"].items():
            lines.append(f"| {kind} | {m['refused_by_kind'].get(kind, 0)} | {message.replace('|', '/')} |")
        rss = m["rss_mb"]
        steady = [v for i, v in rss if i >= 300] or [rss[-1][1]]
        lines += ["", "RSS of serve + tritonserver + stubs (MB) after N requests: "
                  + ", ".join(f"{i}: {v}" for i, v in rss)
                  + f". Bound stated: growth after the first 300 requests under 64 MB; measured "
                  f"{max(steady) - min(steady):.1f} MB.", ""]
    return "\n".join(lines) + "\n"


def _row(saved: dict[str, Any]) -> LoadRow:
    row = LoadRow(**{k: v for k, v in saved.items() if k != "ratio"})
    row.batches = {int(b): n for b, n in row.batches.items()}
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--artifact", type=Path, help="an artifact to serve (default: build ViT-B-32 fp32 here)")
    parser.add_argument("--requests", type=int, default=128, help="requests per load run")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--time-limit", type=float, default=120.0, help="seconds per load run, at most")
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--max-queue-delay-us", type=int, default=2000)
    parser.add_argument("--skip-faults", action="store_true")
    parser.add_argument("--render", type=Path, help="only write --out again from this serve.json")
    parser.add_argument("--load-from", type=Path, help="take the load table from this earlier serve.json "
                        "(rerun only the faults)")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "serve.md")
    args = parser.parse_args()

    if args.render:
        saved = json.loads(args.render.read_text())
        rows = [_row(r) for r in saved["load"]]
        args.out.write_text(render(saved["meta"], rows, saved["faults"]), encoding="utf-8")
        print(f"wrote {args.out}")
        return
    artifact = args.artifact
    if artifact is None or not (artifact / "manifest.json").exists():
        artifact = artifact or Path(tempfile.mkdtemp(prefix="serve-load-")) / "ViT-B-32-none-fp32"
        subprocess.run([sys.executable, "-m", "clipexport", "build", "ViT-B-32", "--pretrained", "none",
                        "--out", str(artifact)], check=True)
    from clipexport.runtime import load

    rt = load(artifact, backend="onnxruntime", device="cpu")
    images, texts = make_images(32), make_texts(64)
    serve_args = ["--backend", "onnxruntime", "--device", "cpu", "--max-batch", str(args.max_batch),
                  "--max-queue-delay-us", str(args.max_queue_delay_us)]
    meta: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "model": rt.model,
                            "serve_args": serve_args, "requests": args.requests, "time_limit_s": args.time_limit,
                            "machine": machine(), "load_before": os.getloadavg()}
    if args.load_from:
        earlier = json.loads(args.load_from.read_text())
        meta.update({k: earlier["meta"][k] for k in ("date", "load_before", "requests", "time_limit_s")})
        meta["faults_date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        rows = [_row(r) for r in earlier["load"]]
    else:
        print("load runs", flush=True)
        server = Serve(artifact, serve_args)
        try:
            rows = run_load(server, rt, images, texts, args.concurrency, args.requests, args.time_limit)
        finally:
            server.stop()
    faults: dict[str, Any] = {}
    if not args.skip_faults:
        print("SIGTERM under load", flush=True)
        faults["sigterm"] = fault_sigterm(artifact, images, serve_args)
        print(faults["sigterm"], flush=True)
        print("SIGKILL under load", flush=True)
        faults["sigkill"] = fault_sigkill(artifact, images, serve_args)
        print(faults["sigkill"], flush=True)
        print("malformed requests", flush=True)
        faults["malformed"] = fault_malformed(artifact, images, texts, serve_args, rt)
        print({k: v for k, v in faults["malformed"].items() if k != "messages"}, flush=True)
    meta["load_after"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(render(meta, rows, faults), encoding="utf-8")
    args.out.with_suffix(".json").write_text(json.dumps(
        {"meta": meta, "load": [r.__dict__ for r in rows], "faults": faults}, indent=2, default=str) + "\n",
        encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
