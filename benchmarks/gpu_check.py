"""GPU parity and latency of built artifacts: the runtime's PyTorch backend on CUDA against ONNX Runtime.

For each model (random weights, fp32):
  1. `clipexport build` on the CPU, all models at once in child processes;
  2. parity: the same 16 images and 16 texts (the artifact's own preprocessing and tokenizer)
     through `clipexport.load(dir, backend="pytorch", device="cuda")` and through
     `load(dir, backend="onnxruntime", device="cpu")`: cosine_min and max_abs_err per tower,
     with PyTorch's default TF32 settings and again with TF32 off for matmuls and convolutions;
  3. latency: `clipexport bench` on CUDA (PyTorch eager) and on the CPU (ONNX Runtime), same process.

Writes gpu_check.json and gpu_check.md to --out after every model, so a run cut short keeps what it
measured. Needs a CUDA GPU visible to torch; --device cpu runs the same steps on the CPU (a dry run).

    python benchmarks/gpu_check.py --out gpu-results
    python benchmarks/gpu_check.py --models ViT-B-32 --device cpu --out /tmp/dry   # no GPU
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from clipexport.verify import compare

DEFAULT_MODELS = ("ViT-B-32", "RN50-quickgelu", "xlm-roberta-base-ViT-B-32", "hf-clip-b32", "ViT-L-14")
HF_CLIP = "hf-clip-b32"  # a transformers CLIPModel directory of CLIPConfig()'s ViT-B/32 size, written here
TEXTS = [
    "a photo of a cat", "a diagram", "two dogs playing in the snow on a sunny winter afternoon",
    "ein Foto von einer Katze", "une photo d'un chien", "猫の写真", "фотография собаки", "x",
    "a red car parked next to a blue house with a white fence and a large oak tree in the garden",
    "espresso", "a close-up of a golden retriever", "a satellite image of a river delta",
    "an airliner taking off at dusk", "a goldfish in a bowl", "a volcano erupting at night", "",
]


def _images(count: int = 16) -> list[np.ndarray]:
    """Seeded uint8 RGB images of assorted sizes: smooth gradients plus noise (not all one size)."""
    rng = np.random.default_rng(0)
    images = []
    for i in range(count):
        h, w = 160 + 37 * (i % 5), 200 + 29 * (i % 7)
        y, x = np.mgrid[0:h, 0:w]
        base = np.stack([(x * (i + 1)) % 256, (y * 3 + i * 17) % 256, ((x + y) * 2) % 256], axis=-1)
        noise = rng.integers(0, 40, size=(h, w, 3))
        images.append(np.clip(base + noise, 0, 255).astype(np.uint8))
    return images


def _build(model: str, work: Path) -> tuple[str, Path, float, str]:
    """Build one fp32 artifact in a child process; (model, directory, seconds, error or '')."""
    name = model
    if model == HF_CLIP:
        from transformers import CLIPConfig

        config_dir = work / "hf-clip-b32-config"
        CLIPConfig().save_pretrained(str(config_dir))
        name = f"hf:{config_dir}"
    out = work / f"{model}-fp32"
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "clipexport", "build", name, "--pretrained", "none",
                           "--out", str(out), "--force", "-q"], capture_output=True, text=True, check=False)
    error = "" if done.returncode == 0 else (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]
    return model, out, time.perf_counter() - start, error


def _compare(got: np.ndarray, want: np.ndarray) -> dict[str, float]:
    parity = compare(want, got, len(got))  # the build's own worst-row measure
    return {"cosine_min": parity.cosine_min, "max_abs_err": parity.max_abs_err}


def _texts_or_ids(runtime: Any) -> Any:
    """TEXTS, or (a model whose tokenizer files need the hub, e.g. XLM-R offline) seeded token ids
    of assorted lengths, padded with the artifact's pad id."""
    try:
        runtime.tokenize(["probe"])
        return TEXTS
    except Exception:  # noqa: BLE001 - InputError: no tokenizer in this artifact
        sequence = runtime.manifest["towers"]["text"].get("sequence", {})
        pad, length = int(sequence.get("pad_id", 0)), int(runtime.context_length)
        rng = np.random.default_rng(0)
        ids = np.full((len(TEXTS), length), pad, dtype=np.int64)
        for row, n in enumerate(np.linspace(2, length, len(TEXTS)).astype(int)):
            ids[row, :n] = rng.integers(5, 1000, size=n)
        return ids


def _encode_text(runtime: Any, texts_or_ids: Any) -> np.ndarray:
    if isinstance(texts_or_ids, np.ndarray):
        return runtime.encode_tokens(texts_or_ids, normalize=False)
    return runtime.encode_text(texts_or_ids, normalize=False)


def _set_tf32(enabled: bool) -> None:
    import torch

    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


def parity(directory: Path, device: str) -> dict[str, Any]:
    """PyTorch on `device` vs ONNX Runtime on the CPU, both through clipexport.load."""
    import torch

    from clipexport.runtime import load

    reference = load(directory, backend="onnxruntime", device="cpu")
    images = _images()
    texts = _texts_or_ids(reference)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # long texts are cut the same way on both sides
        want = {"image": reference.encode_image(images, normalize=False),
                "text": _encode_text(reference, texts)}
    out: dict[str, Any] = {}
    settings = {"default": None, "tf32_off": False} if device == "cuda" else {"default": None}
    defaults = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    out["torch_defaults"] = {"matmul_allow_tf32": defaults[0], "cudnn_allow_tf32": defaults[1]}
    runtime = load(directory, backend="pytorch", device=device)
    try:
        for label, tf32 in settings.items():
            if tf32 is not None:
                _set_tf32(tf32)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                got = {"image": runtime.encode_image(images, normalize=False),
                       "text": _encode_text(runtime, texts)}
            out["text_input"] = "texts" if texts is TEXTS else "seeded token ids (no tokenizer files offline)"
            out[label] = {tower: _compare(got[tower], want[tower]) for tower in got}
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = defaults
    return out


def latency(directory: Path, device: str, batches: list[int], cpu_batches: list[int]) -> dict[str, Any]:
    from clipexport.bench import BenchConfig, run_bench

    runs = {device: run_bench(directory, BenchConfig(backends=("torch",), batches=batches, device=device,
                                                      warmup=5, iters=30))}
    runs["cpu-onnxruntime"] = run_bench(directory, BenchConfig(backends=("onnxruntime",), batches=cpu_batches,
                                                               device="cpu", warmup=2, iters=10))
    return {key: report.to_json() for key, report in runs.items()}


def _cosine(value: float) -> str:
    """Cosines this close to 1 read better as their distance from it."""
    return f"1 - {1 - value:.1e}" if value > 0.9999 else f"{value:.6f}"


def render(results: dict[str, Any]) -> str:
    env = results["environment"]
    lines = [f"# GPU parity and latency ({env.get('gpu') or env['device']})", "",
             (f"- device {env['device']}, torch {env['torch']}, onnxruntime {env['onnxruntime']}, "
              f"{env['cpu_count']} CPU cores; fp32 artifacts, random weights (`--pretrained none`)"),
             ("- parity: `load(dir, backend='pytorch', device=...)` vs `load(dir, backend='onnxruntime', "
              "device='cpu')` on the same 16 images and 16 texts, raw (unnormalized) embeddings"), "",
             "| model | build s | setting | image cosine_min | image max_abs | text cosine_min | text max_abs |",
             "| --- | ---: | --- | ---: | ---: | ---: | ---: |"]
    for model, row in results["models"].items():
        if row.get("error"):
            lines.append(f"| {model} | {row.get('build_s', 0):.0f} | failed: {row['error']} | | | | |")
            continue
        if not row.get("parity"):
            lines.append(f"| {model} | {row['build_s']:.0f} | built, not checked yet | | | | |")
        for label in ("default", "tf32_off"):
            p = row.get("parity", {}).get(label)
            if p:
                lines.append(f"| {model} | {row['build_s']:.0f} | {label} | {_cosine(p['image']['cosine_min'])} | "
                             f"{p['image']['max_abs_err']:.2e} | {_cosine(p['text']['cosine_min'])} | "
                             f"{p['text']['max_abs_err']:.2e} |")
    lines += ["", "## Latency (p50 ms; items/s)", "",
              "| model | tower | backend | batch | p50 ms | items/s | of GEMM |", "| --- | --- | --- | ---: | ---: | ---: | ---: |"]
    for model, row in results["models"].items():
        for key, report in row.get("latency", {}).items():
            for r in report["rows"]:
                if r["status"] == "ok":
                    lines.append(f"| {model} | {r['tower']} | {r['backend']} ({key}) | {r['batch']} | "
                                 f"{r['p50_ms']:.2f} | {r['items_per_s']:.1f} | {100 * (r['fraction_of_gemm'] or 0):.0f}% |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS),
                        help=f"comma-separated open_clip names, or {HF_CLIP} (a transformers CLIPModel)")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--batches", default="1,8,32,128", help="CUDA batch sizes")
    parser.add_argument("--cpu-batches", default="1,8", help="ONNX Runtime CPU batch sizes")
    parser.add_argument("--work", type=Path, default=Path("engines/gpu-check"))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--deadline-s", type=float, default=1e9, help="start no model's checks after this long")
    args = parser.parse_args()

    import onnxruntime
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_check: torch sees no CUDA GPU (use --device cpu for a dry run)")
    start = time.perf_counter()
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"environment": {
        "device": args.device, "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
        "torch": torch.__version__, "onnxruntime": onnxruntime.__version__, "cpu_count": os.cpu_count()},
        "models": {}}

    def save() -> None:
        (args.out / "gpu_check.json").write_text(json.dumps(results, indent=1))
        (args.out / "gpu_check.md").write_text(render(results))

    with ThreadPoolExecutor(max_workers=len(models)) as pool:  # builds are child processes: threads suffice
        builds = list(pool.map(lambda m: _build(m, args.work), models))
    for model, directory, seconds, error in builds:
        print(f"built {model} in {seconds:.0f} s" + (f": FAILED {error}" if error else ""), flush=True)
        results["models"][model] = {"build_s": seconds, "error": error}
    save()
    for model, directory, _, error in builds:
        if error:
            continue
        if time.perf_counter() - start > args.deadline_s:
            results["models"][model]["error"] = "not checked: --deadline-s reached"
            continue
        row = results["models"][model]
        row["parity"] = parity(directory, args.device)
        print(f"{model} parity: {json.dumps(row['parity'])}", flush=True)
        save()
        row["latency"] = latency(directory, args.device, [int(b) for b in args.batches.split(",")],
                                 [int(b) for b in args.cpu_batches.split(",")])
        save()
        print(f"{model} latency done ({time.perf_counter() - start:.0f} s)", flush=True)
    print(render(results))


if __name__ == "__main__":
    main()
