"""Our fp32 / fp16 / int8 ONNX graphs on ONNX Runtime's CUDA execution provider, against PyTorch on the same GPU.

For each model (random weights) and precision:
  1. `clipexport build --precision P` on the CPU, in child processes;
  2. per tower and batch (default 1, 8, 64), the same seeded images / tokenized prompts through
     - PyTorch fp32 eager on the GPU, TF32 off: the parity reference;
     - PyTorch fp16 eager, and fp16 `torch.compile` (speed);
     - ONNX Runtime with [CUDAExecutionProvider, CPUExecutionProvider] on each built graph; fp16 runs
       natively here (the build's CPU parity of fp16 is emulated), so this is the real overflow test;
  3. parity per tower (cosine_min, max_abs_err against the fp32 reference, non-finite outputs counted),
     p50 latency, items/s, and the fraction of a same-run GEMM (fp32 and fp16 torch matmul on the GPU);
  4. which nodes ONNX Runtime placed on the CPU (from its profiler's per-node provider): an `Attention`
     falling back to the CPU would ruin the fused graphs.

A graph's session is first opened in a child process, so a provider that crashes on it is reported
instead of ending the run. Writes gpu_ort.json and gpu_ort.md to --out after every model.

    python benchmarks/gpu_ort.py --out gpu-ort                      # a GPU with onnxruntime-gpu
    python benchmarks/gpu_ort.py --provider cpu --models ViT-B-32 --batches 1 --out /tmp/dry   # no GPU
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_MODELS = ("ViT-B-32", "ViT-L-14")
PRECISIONS = ("fp32", "fp16", "int8")
PROVIDERS = {"cuda": "CUDAExecutionProvider", "cpu": "CPUExecutionProvider"}
ORT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
              "tensor(int32)": np.int32}


def build(model: str, precision: str, work: Path) -> tuple[str, Path, float, str]:
    """One artifact, built in a child process: (precision, directory, seconds, error or '')."""
    out = work / f"{model.replace('/', '_').replace(':', '_')}-{precision}"
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "clipexport", "build", model, "--pretrained", "none",
                           "--precision", precision, "--out", str(out), "--force", "-q"],
                          capture_output=True, text=True, check=False)
    error = "" if done.returncode == 0 else (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]
    return precision, out, time.perf_counter() - start, error


def session_opens(onnx_path: Path, provider: str) -> str:
    """'' when ONNX Runtime opens the graph on `provider` in a child process, else why not (a crash included)."""
    code = ("import sys, onnxruntime as ort\n"
            "s = ort.InferenceSession(sys.argv[1], providers=[sys.argv[2], 'CPUExecutionProvider'])\n"
            "print(s.get_providers()[0])\n")
    done = subprocess.run([sys.executable, "-c", code, str(onnx_path), provider], capture_output=True, text=True,
                          check=False, timeout=1800)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or [f"exit {done.returncode} (signal?)"])[-1]
        return f"session failed ({last[:200]})"
    if done.stdout.strip() != provider:
        return f"onnxruntime fell back to {done.stdout.strip()}"
    return ""


def placement(onnx_path: Path, provider: str, feeds: dict[str, np.ndarray]) -> dict[str, Any]:
    """Nodes per execution provider in one profiled run, and the op types ONNX Runtime ran on the CPU."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.enable_profiling = True
    with tempfile.TemporaryDirectory(prefix="gpu-ort-profile-") as tmp:
        options.profile_file_prefix = str(Path(tmp) / "run")
        session = ort.InferenceSession(str(onnx_path), options, providers=[provider, "CPUExecutionProvider"])
        session.run(None, feeds)
        events = json.loads(Path(session.end_profiling()).read_text())
    nodes: dict[str, tuple[str, str]] = {}  # node name -> (provider, op type)
    for event in events:
        args = event.get("args", {})
        if event.get("cat") == "Node" and "provider" in args:
            nodes[event["name"].removesuffix("_kernel_time")] = (args["provider"], args.get("op_name", "?"))
    per_provider = Counter(p for p, _ in nodes.values())
    on_cpu = Counter(op for p, op in nodes.values() if p == "CPUExecutionProvider")
    return {"nodes": dict(per_provider), "cpu_op_types": dict(on_cpu) if provider != "CPUExecutionProvider" else {}}


def gemm_ceiling(device: str) -> dict[str, float]:
    """Best GFLOP/s of a 4096^3 matmul in fp32 and fp16 on the GPU (1024^3 fp32 on the CPU), this run."""
    import torch

    from clipexport.bench import time_runner

    n = 4096 if device == "cuda" else 1024
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    out: dict[str, float] = {"n": n}
    for dtype in (torch.float32, torch.float16) if device == "cuda" else (torch.float32,):
        a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
        seconds = time_runner(lambda a=a, b=b: a @ b, 3, 10, sync)
        out[str(dtype).removeprefix("torch.")] = 2 * n**3 / float(seconds.min()) / 1e9
    return out


def _stats(seconds: np.ndarray, batch: int, flops: float, ceiling: float) -> dict[str, float]:
    p50 = float(np.percentile(seconds, 50))
    return {"p50_ms": p50 * 1e3, "items_per_s": batch / p50, "fraction_of_gemm": flops * batch / p50 / 1e9 / ceiling}


def _parity(want: np.ndarray, got: np.ndarray) -> dict[str, Any]:
    from clipexport.verify import compare

    got = np.asarray(got, dtype=np.float32)
    result = compare(want, got, len(got))
    return {"cosine_min": result.cosine_min, "max_abs_err": result.max_abs_err,
            "nonfinite": int((~np.isfinite(got)).sum())}


def measure_model(model: str, artifacts: dict[str, Path], device: str, batches: list[int], iters: int,
                  use_compile: bool, gemm: dict[str, float], log: Callable[[str], None]) -> dict[str, Any]:
    """Every tower x batch x backend of one model; artifacts: precision -> built directory."""
    import onnxruntime as ort
    import torch

    from clipexport.manifest import read_manifest
    from clipexport.bench import _flops_per_item, _prompts, time_runner
    from clipexport.models import load_reference

    provider = PROVIDERS[device]
    sync: Callable[[], None] = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    ref = load_reference(model, "none", 0)
    tokenizer = ref.tokenizer()
    manifests = {p: read_manifest(d) for p, d in artifacts.items()}
    rows: list[dict[str, Any]] = []
    placements: dict[str, Any] = {}
    refused: dict[str, str] = {}
    for tower in ("image", "text"):
        module = ref.tower(tower).eval()
        rng = torch.Generator().manual_seed(0)

        def make(batch: int, t: str = tower, rng: Any = rng) -> Any:
            if t == "image":
                return torch.randn(batch, 3, ref.image_size, ref.image_size, generator=rng)
            return tokenizer(_prompts(batch))

        flops = _flops_per_item(module, make(1))
        module = module.to(device)
        half = None
        for batch in batches:
            x = make(batch)
            xd = x.to(device)
            previous = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
            try:
                with torch.no_grad():
                    want = module(xd).float().cpu().numpy()
                    seconds = time_runner(lambda m=module, x=xd: m(x), 2, iters, sync)
            finally:
                torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = previous
            rows.append({"tower": tower, "batch": batch, "backend": "torch fp32 (reference, TF32 off)",
                         **_stats(seconds, batch, flops, gemm["float32"])})
            if device == "cuda":  # fp16 eager / compiled: speed, and their own parity
                import copy

                half = half or copy.deepcopy(module).half()
                variants: list[tuple[str, Any]] = [("torch fp16 eager", half)]
                if use_compile:
                    variants.append(("torch fp16 compile", torch.compile(half)))
                xh = xd.half() if tower == "image" else xd
                for label, fn in variants:
                    try:
                        with torch.no_grad():
                            got = fn(xh).float().cpu().numpy()
                            seconds = time_runner(lambda f=fn, x=xh: f(x), 3, iters, sync)
                    except Exception as exc:  # noqa: BLE001 - inductor fails in many ways on odd machines
                        rows.append({"tower": tower, "batch": batch, "backend": label, "skipped": str(exc)[:200]})
                        continue
                    rows.append({"tower": tower, "batch": batch, "backend": label, **_parity(want, got),
                                 **_stats(seconds, batch, flops, gemm["float16"])})
            for precision, directory in artifacts.items():
                info = manifests[precision]["towers"].get(tower)
                if info is None:
                    continue
                path = directory / info["onnx"]
                key = f"{precision}/{tower}"
                if key not in refused:
                    refused[key] = session_opens(path, provider)
                label = f"onnxruntime {precision} ({provider.removesuffix('ExecutionProvider')})"
                if refused[key]:
                    rows.append({"tower": tower, "batch": batch, "backend": label, "skipped": refused[key]})
                    continue
                session = ort.InferenceSession(str(path), providers=[provider, "CPUExecutionProvider"])
                declared = session.get_inputs()[0]
                feeds = {declared.name: x.numpy().astype(ORT_DTYPES.get(declared.type, np.float32), copy=False)}
                if key not in placements:
                    placements[key] = placement(path, provider, feeds)
                # Inputs and outputs stay on the device (I/O binding), as PyTorch's do: no host copies timed.
                binding = session.io_binding()
                ort_device = "cuda" if device == "cuda" else "cpu"
                binding.bind_ortvalue_input(declared.name, ort.OrtValue.ortvalue_from_numpy(
                    feeds[declared.name], ort_device, 0))
                binding.bind_output(session.get_outputs()[0].name, ort_device)
                session.run_with_iobinding(binding)
                got = binding.copy_outputs_to_cpu()[0]
                seconds = time_runner(lambda s=session, b=binding: s.run_with_iobinding(b), 2, iters, lambda: None)
                ceiling = gemm["float16"] if precision == "fp16" and "float16" in gemm else gemm["float32"]
                rows.append({"tower": tower, "batch": batch, "backend": label, **_parity(want, got),
                             **_stats(seconds, batch, flops, ceiling)})
                del session
            log(f"  {model} {tower} batch {batch}: done")
        del module, half
        if device == "cuda":
            torch.cuda.empty_cache()
    return {"rows": rows, "placement": placements}


def render(results: dict[str, Any]) -> str:
    env = results["environment"]
    gemm = ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in env["gemm"].items() if k != "n")
    lines = [f"# ONNX Runtime on {env['provider']} vs PyTorch ({env.get('gpu') or env['device']})", "",
             f"- torch {env['torch']}, onnxruntime {env['onnxruntime']} (providers: {', '.join(env['providers'])}); "
             f"random weights (`--pretrained none`); same-run GEMM ({env['gemm']['n']}^3): {gemm}",
             "- parity: against PyTorch fp32 eager on the same device with TF32 off; raw (unnormalized) embeddings",
             "", "| model | tower | batch | backend | cosine_min | max_abs_err | non-finite | p50 ms | items/s | of GEMM |",
             "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for model, entry in results["models"].items():
        for precision, error in entry.get("build_errors", {}).items():
            lines.append(f"| {model} | | | build {precision} | failed: {error} | | | | | |")
        for r in entry.get("rows", []):
            if "skipped" in r:
                lines.append(f"| {model} | {r['tower']} | {r['batch']} | {r['backend']} | skipped: {r['skipped']} "
                             "| | | | | |")
                continue
            cosine = f"{r['cosine_min']:.6f}" if "cosine_min" in r else "(reference)"
            abs_err = f"{r['max_abs_err']:.2e}" if "max_abs_err" in r else ""
            lines.append(f"| {model} | {r['tower']} | {r['batch']} | {r['backend']} | {cosine} | {abs_err} | "
                         f"{r.get('nonfinite', '')} | {r['p50_ms']:.2f} | {r['items_per_s']:.1f} | "
                         f"{100 * r['fraction_of_gemm']:.0f}% |")
    lines += ["", "## Node placement (ONNX Runtime profiler, one run)", "", "| model | graph | nodes per provider | "
              "op types on the CPU |", "| --- | --- | --- | --- |"]
    for model, entry in results["models"].items():
        for key, p in entry.get("placement", {}).items():
            cpu = ", ".join(f"{op} x{n}" for op, n in sorted(p["cpu_op_types"].items())) or "none"
            nodes = ", ".join(f"{k.removesuffix('ExecutionProvider')} {v}" for k, v in sorted(p["nodes"].items()))
            lines.append(f"| {model} | {key} | {nodes} | {cpu} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS))
    parser.add_argument("--precisions", default=",".join(PRECISIONS))
    parser.add_argument("--batches", default="1,8,64")
    parser.add_argument("--provider", default="cuda", choices=sorted(PROVIDERS))
    parser.add_argument("--iters", type=int, default=20, help="timed runs per measurement (after warm-up)")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile (it compiles per batch)")
    parser.add_argument("--work", type=Path, default=Path("engines/gpu-ort"))
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)

    import onnxruntime as ort
    import torch

    device = args.provider
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_ort: torch sees no CUDA GPU (use --provider cpu for a dry run)")
    if device == "cuda" and hasattr(ort, "preload_dlls"):
        # onnxruntime-gpu finds cuBLAS/cuDNN through the nvidia-* wheels PyTorch already installed
        ort.preload_dlls()
    if PROVIDERS[device] not in ort.get_available_providers():
        sys.exit(f"gpu_ort: onnxruntime {ort.__version__} has no {PROVIDERS[device]} (install onnxruntime-gpu); "
                 f"it has {ort.get_available_providers()}")
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    batches = [int(b) for b in args.batches.split(",")]
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"environment": {
        "device": device, "provider": PROVIDERS[device], "providers": ort.get_available_providers(),
        "gpu": torch.cuda.get_device_name() if device == "cuda" else None, "torch": torch.__version__,
        "onnxruntime": ort.__version__, "cpu_count": os.cpu_count(), "gemm": gemm_ceiling(device)},
        "models": {}}

    def save() -> None:
        (args.out / "gpu_ort.json").write_text(json.dumps(results, indent=1))
        (args.out / "gpu_ort.md").write_text(render(results))

    jobs = [(m, p) for m in models for p in precisions]
    with ThreadPoolExecutor(max_workers=min(len(jobs), max(1, (os.cpu_count() or 2) // 4))) as pool:
        built = list(pool.map(lambda job: (job[0], *build(job[0], job[1], args.work)), jobs))
    for model in models:
        mine = [b for b in built if b[0] == model]
        entry: dict[str, Any] = {"build_s": {p: round(s, 1) for _, p, _, s, _ in mine},
                                 "build_errors": {p: e for _, p, _, _, e in mine if e}}
        results["models"][model] = entry
        artifacts = {p: d for _, p, d, _, e in mine if not e}
        print(f"{model}: built {sorted(artifacts)}" + (f", failed {entry['build_errors']}" if entry["build_errors"]
                                                        else ""), flush=True)
        if artifacts:
            entry.update(measure_model(model, artifacts, device, batches, args.iters, not args.no_compile,
                                       results["environment"]["gemm"], lambda m: print(m, flush=True)))
        save()
    save()
    print(render(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
