"""Latency and throughput per backend, tower and batch size, measured in one process.

For each (tower, batch, backend): warm-up runs, then `iters` timed runs on the same inputs
(GPU work is synchronized before the clock stops). We report p50/p90/p99 latency, items/s,
the model's FLOPs per item (counted by torch's FlopCounterMode on the reference tower), the
achieved FLOP/s, and its ratio to a large GEMM measured in the same run on the same device:
how close the tower gets to what the hardware does on its best-case kernel.

Outputs: report.json (schema below, `schema_version`), report.md, latency.png.
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from clipexport.artifacts import library_versions
from clipexport.manifest import open_artifact
from clipexport.errors import UsageError
from clipexport.progress import Progress

SCHEMA_VERSION = 1
BACKENDS = ("torch", "torch-compile", "onnxruntime", "tensorrt")
# ImageNet-style prompts, the text workload of zero-shot classification.
PROMPT_CLASSES = ("dog", "cat", "tabby cat", "golden retriever", "airliner", "espresso", "goldfish", "volcano")

Runner = Callable[[], Any]


@dataclass
class BenchConfig:
    backends: Sequence[str] = ("torch", "onnxruntime")
    batches: Sequence[int] = (1, 8, 32)
    towers: Sequence[str] = ("image", "text")
    warmup: int = 3
    iters: int = 10
    device: str = "cpu"  # "cpu" or "cuda"

    def __post_init__(self) -> None:
        unknown = [b for b in self.backends if b not in BACKENDS]
        if unknown:
            raise UsageError(f"unknown backend {unknown[0]!r}; choose from {', '.join(BACKENDS)}")
        if not self.batches or any(b < 1 for b in self.batches):
            raise UsageError("--batch needs positive batch sizes, e.g. 1,8,32")
        bad = [t for t in self.towers if t not in ("image", "text")]
        if bad or not self.towers:
            raise UsageError("--tower must be image, text or both")
        if self.warmup < 0 or self.iters < 1:
            raise UsageError("--warmup must be >= 0 and --iters >= 1")


@dataclass
class Row:
    tower: str
    backend: str
    batch: int
    status: str  # "ok" or "skipped"
    reason: str = ""
    p50_ms: float | None = None
    p90_ms: float | None = None
    p99_ms: float | None = None
    items_per_s: float | None = None
    gflop_per_item: float | None = None
    achieved_gflops: float | None = None
    fraction_of_gemm: float | None = None


@dataclass
class Report:
    artifact: str
    model: str
    precision: str
    environment: dict[str, Any]
    gemm: dict[str, Any]
    rows: list[Row] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "artifact": self.artifact,
            "model": self.model,
            "precision": self.precision,
            "environment": self.environment,
            "gemm": self.gemm,
            "rows": [asdict(r) for r in self.rows],
        }


def time_runner(run: Runner, warmup: int, iters: int, sync: Callable[[], None]) -> np.ndarray:
    """Seconds per call of `run`, after `warmup` untimed calls; `sync` waits for queued GPU work."""
    for _ in range(warmup):
        run()
    sync()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        run()
        sync()
        times.append(time.perf_counter() - start)
    return np.asarray(times)


def matmul_probe(n: int) -> Any:
    """An ONNX graph of one fp32 [n, n] x [n, n] MatMul, for onnxruntime's share of the GEMM ceiling."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "b"], ["c"])], "gemm",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [n, n]),
         helper.make_tensor_value_info("b", TensorProto.FLOAT, [n, n])],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, [n, n])],
    )
    # Pin the IR version: make_model stamps the installed onnx's newest, which an older
    # onnxruntime refuses (onnx 1.23.1 wrote IR 14; onnxruntime 1.30 reads up to 13: seen on
    # the GPU machine). IR 8 is opset 17's and every onnxruntime we support reads it.
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def gemm_gflops(device: str, n: int = 2048, iters: int = 5) -> dict[str, Any]:
    """Best GFLOP/s of an n x n x n fp32 matmul: torch on `device`, and onnxruntime's MatMul on CPU."""
    import torch

    out: dict[str, Any] = {"n": n}
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    seconds = time_runner(lambda: a @ b, 2, iters, sync)
    out["torch_gflops"] = 2 * n**3 / seconds.min() / 1e9
    if device == "cpu":
        import onnxruntime as ort

        model = matmul_probe(n)
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        feeds = {"a": a.numpy(), "b": b.numpy()}
        seconds = time_runner(lambda: session.run(None, feeds), 2, iters, lambda: None)
        out["onnxruntime_gflops"] = 2 * n**3 / seconds.min() / 1e9
    out["best_gflops"] = max(v for k, v in out.items() if k.endswith("_gflops"))
    return out


def environment(device: str) -> dict[str, Any]:
    import torch

    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    env: dict[str, Any] = {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": device,
        "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
        "versions": library_versions(),
    }
    return env


def _prompts(batch: int) -> list[str]:
    return [f"a photo of a {PROMPT_CLASSES[i % len(PROMPT_CLASSES)]}." for i in range(batch)]


def _flops_per_item(module: Any, example: Any) -> float:
    """FLOPs of one item through the tower (2 per multiply-add), counted on the plain attention path."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from clipexport.export import export_patches

    with export_patches(), FlopCounterMode(display=False) as counter, torch.no_grad():
        module(example[:1])
    return float(counter.get_total_flops())


def _backend_runner(backend: str, module: Any, onnx_path: Path, input_name: str, batch_input: Any,
                    device: str) -> tuple[Runner, Callable[[], None]] | str:
    """A zero-argument callable running one batch, and its sync; or the reason it cannot run."""
    import torch

    sync: Callable[[], None] = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if backend in ("torch", "torch-compile"):
        model = module.to(device)
        x = batch_input.to(device)
        if backend == "torch-compile":
            try:
                model = torch.compile(model)
                with torch.no_grad():
                    model(x)  # compile now, outside the timed loop; failures become a skip reason
            except Exception as exc:  # noqa: BLE001 - inductor fails in many ways on odd machines
                return f"torch.compile failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"

        def run_torch() -> Any:
            with torch.no_grad():
                return model(x)

        return run_torch, sync
    if backend == "onnxruntime":
        import onnxruntime as ort

        wanted = "CUDAExecutionProvider" if device == "cuda" else "CPUExecutionProvider"
        if wanted not in ort.get_available_providers():
            return f"onnxruntime has no {wanted} (install onnxruntime-gpu for CUDA)"
        try:
            session = ort.InferenceSession(str(onnx_path), providers=[wanted])
        except Exception as exc:  # noqa: BLE001 - e.g. no CPU kernel for a bf16 Conv/MatMul
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            return f"onnxruntime cannot run this graph on {wanted}: {first.split(' : ')[-1][:200]}"
        if session.get_providers()[0] != wanted:
            return f"onnxruntime fell back to {session.get_providers()[0]}"
        # feed the dtype the graph declares (an fp16 graph may take fp16 pixels)
        declared = session.get_inputs()[0].type  # e.g. "tensor(float16)"
        dtypes = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
                  "tensor(int32)": np.int32}
        feeds = {input_name: batch_input.numpy().astype(dtypes.get(declared, np.float32), copy=False)}
        return (lambda: session.run(None, feeds)), (lambda: None)
    if backend == "tensorrt":
        try:
            import tensorrt
        except ImportError:
            tensorrt = None
        # tensorrt-stubs alone makes `import tensorrt` succeed as an empty namespace package.
        if tensorrt is None or not hasattr(tensorrt, "Builder"):
            return "TensorRT is not installed (pip install 'clipexport[tensorrt]' where NVIDIA's index is reachable)"
        if device != "cuda":
            return "TensorRT needs a CUDA GPU"
        return "no TensorRT engine in this artifact (build it with --backend tensorrt)"
    return f"unknown backend {backend}"


def run_bench(directory: Path, config: BenchConfig, progress: Progress | None = None) -> Report:
    """Benchmark every tower of an artifact directory on the configured backends and batches."""
    import torch

    from clipexport.models import load_reference

    progress = progress or Progress(quiet=True)
    if config.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA GPU is visible to PyTorch")
    manifest = open_artifact(directory)  # what runs is what the build verified
    towers = [t for t in config.towers if t in manifest.towers]
    if not towers:
        raise UsageError(f"{directory} has none of the towers {list(config.towers)}")
    weights = manifest.weights
    with progress.stage("load reference model"):
        ref = load_reference(manifest.model, weights.value, weights.seed)
    with progress.stage("measure large-GEMM ceiling"):
        gemm = gemm_gflops(config.device)
    progress.say(f"    GEMM ceiling: {gemm['best_gflops']:.1f} GFLOP/s")
    report = Report(str(directory), manifest.model, manifest.precision, environment(config.device), gemm)
    tokenizer = ref.tokenizer()

    def make(tower: str, batch: int) -> Any:
        return torch.randn(batch, 3, ref.image_size, ref.image_size) if tower == "image" else tokenizer(_prompts(batch))

    # Count every tower's FLOPs on the CPU before any backend runs: the torch backends move their
    # module to the GPU, and towers can share one model (a transformers CLIPModel), so counting the
    # second tower afterwards met CPU inputs and CUDA weights (seen on an H200).
    modules = {tower: ref.tower(tower) for tower in towers}
    tower_flops = {tower: _flops_per_item(modules[tower], make(tower, 1)) for tower in towers}
    for tower in towers:
        entry = manifest.towers[tower]
        module = modules[tower]
        flops = tower_flops[tower]
        for batch in config.batches:
            batch_input = make(tower, batch)
            for backend in config.backends:
                label = f"{tower} batch {batch} {backend}"
                runner = _backend_runner(backend, module, directory / entry.onnx, entry.input.name,
                                         batch_input, config.device)
                if isinstance(runner, str):
                    report.rows.append(Row(tower, backend, batch, "skipped", reason=runner))
                    progress.say(f"  {label}: skipped ({runner})")
                    continue
                run, sync = runner
                seconds = time_runner(run, config.warmup, config.iters, sync)
                p50, p90, p99 = (float(np.percentile(seconds, q)) for q in (50, 90, 99))
                achieved = flops * batch / p50 / 1e9
                report.rows.append(Row(
                    tower, backend, batch, "ok", p50_ms=p50 * 1e3, p90_ms=p90 * 1e3, p99_ms=p99 * 1e3,
                    items_per_s=batch / p50, gflop_per_item=flops / 1e9, achieved_gflops=achieved,
                    fraction_of_gemm=achieved / gemm["best_gflops"],
                ))
                progress.say(f"  {label}: p50 {p50 * 1e3:.1f} ms, {batch / p50:.1f} items/s, {achieved:.0f} GFLOP/s")
    return report


def render_markdown(report: Report) -> str:
    env = report.environment
    lines = [
        f"# Latency: {report.model} ({report.precision})",
        "",
        f"- device: {env['device']}" + (f" ({env['gpu']})" if env.get("gpu") else "") + f"; CPU: {env['cpu']}, "
        f"{env['cpu_count']} cores, torch threads {env['torch_threads']}",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items()),
        f"- large-GEMM ceiling ({report.gemm['n']}^3 fp32, same run): "
        + ", ".join(f"{k.replace('_gflops', '')} {v:.1f} GFLOP/s" for k, v in report.gemm.items()
                    if k.endswith("_gflops") and k != "best_gflops"),
        "- GFLOP/s counts the fp32 model's FLOPs (torch's FlopCounter) per item; \"of GEMM\" divides by the best fp32 "
        "GEMM above, so int8/fp16 kernels (VNNI, AMX) can pass 100%. Text inputs are full-length (77 tokens); "
        "the runtime's EOT trimming is measured in benchmarks/results/cpu_passes.md.",
        "",
    ]
    for tower in dict.fromkeys(r.tower for r in report.rows):
        rows = [r for r in report.rows if r.tower == tower]
        ok = [r for r in rows if r.status == "ok"]
        lines += [f"## {tower} tower" + (f" ({ok[0].gflop_per_item:.2f} GFLOP per item)" if ok else ""), "",
                  "| backend | batch | p50 ms | p90 ms | p99 ms | items/s | GFLOP/s | of GEMM | vs torch |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for r in rows:
            if r.status != "ok":
                lines.append(f"| {r.backend} | {r.batch} | skipped: {r.reason} | | | | | | |")
                continue
            base = next((b for b in ok if b.backend == "torch" and b.batch == r.batch), None)
            speedup = f"{base.p50_ms / r.p50_ms:.2f}x" if base and base.p50_ms and r.p50_ms else "-"
            lines.append(f"| {r.backend} | {r.batch} | {r.p50_ms:.2f} | {r.p90_ms:.2f} | {r.p99_ms:.2f} | "
                         f"{r.items_per_s:.1f} | {r.achieved_gflops:.0f} | {100 * (r.fraction_of_gemm or 0):.0f}% | {speedup} |")
        lines.append("")
    return "\n".join(lines)


def render_plot(report: Report, path: Path) -> None:
    """Latency vs batch (left) and throughput vs batch (right), one line per tower and backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (lat, thr) = plt.subplots(1, 2, figsize=(11, 4.2))
    series: dict[tuple[str, str], list[Row]] = {}
    for r in report.rows:
        if r.status == "ok":
            series.setdefault((r.tower, r.backend), []).append(r)
    for (tower, backend), rows in series.items():
        rows.sort(key=lambda r: r.batch)
        xs = [r.batch for r in rows]
        style = "-" if tower == "image" else "--"
        lat.plot(xs, [r.p50_ms for r in rows], style, marker="o", label=f"{tower} / {backend}")
        thr.plot(xs, [r.items_per_s for r in rows], style, marker="o", label=f"{tower} / {backend}")
    for ax, title, unit in ((lat, "p50 latency", "ms"), (thr, "throughput", "items/s")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size")
        ax.set_ylabel(unit)
        ax.set_title(f"{report.model} {report.precision}: {title}")
        ax.grid(True, which="both", alpha=0.3)
    lat.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(report: Report, out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "report.json", "md": out_dir / "report.md", "png": out_dir / "latency.png"}
    paths["json"].write_text(json.dumps(report.to_json(), indent=2) + "\n")
    paths["md"].write_text(render_markdown(report) + "\n")
    render_plot(report, paths["png"])
    return paths
