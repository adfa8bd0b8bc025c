"""The committed CPU latency reports: ViT-B-32 and ViT-L-14, both towers, every precision that runs here.

For each model and precision: build the artifact (random weights: latency does not depend on
the values), then `clipexport bench` it with PyTorch eager and ONNX Runtime in one process, and
write benchmarks/results/cpu-<model>-<precision>/{report.json,report.md,latency.png}. A precision
whose build fails on this machine is listed in benchmarks/results/cpu_summary.md with the reason.

    python benchmarks/cpu_report.py                       # ViT-B-32 and ViT-L-14, all precisions
    python benchmarks/cpu_report.py --models ViT-B-32 --precisions fp32 --iters 5
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def main() -> None:
    from clipexport.bench import BenchConfig, run_bench, write_report
    from clipexport.build import BuildOptions, build
    from clipexport.errors import ClipExportError
    from clipexport.progress import Progress

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="ViT-B-32,ViT-L-14")
    parser.add_argument("--precisions", default="fp32,fp16,bf16,int8,fp8")
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    progress = Progress()
    # Rows of earlier runs stay (a run may cover one model); this run's rows replace theirs.
    summary_json = RESULTS / "cpu_summary.json"
    rows: dict[str, str] = json.loads(summary_json.read_text()) if summary_json.is_file() else {}
    for model in args.models.split(","):
        for precision in args.precisions.split(","):
            name = f"cpu-{model}-{precision}"
            progress.say(f"== {name}")
            with tempfile.TemporaryDirectory(prefix="cpu-report-") as tmp:
                try:
                    artifact = build(BuildOptions(model=model, pretrained="none", precision=precision,
                                                  out=Path(tmp) / "artifact"), progress).out_dir
                except ClipExportError as exc:
                    rows[name] = f"| {model} | {precision} | not built here: {str(exc).splitlines()[0][:200]} |"
                    _write_summary(rows, summary_json)
                    continue
                config = BenchConfig(backends=("torch", "onnxruntime"),
                                     batches=[int(b) for b in args.batches.split(",")],
                                     warmup=args.warmup, iters=args.iters)
                report = run_bench(artifact, config, progress)
                write_report(report, RESULTS / name)
                rows[name] = f"| {model} | {precision} | {_headline(report)} [{name}/report.md]({name}/report.md) |"
            _write_summary(rows, summary_json)  # after each report: a crash later loses nothing


def _write_summary(rows: dict[str, str], summary_json: Path) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    summary_json.write_text(json.dumps(rows, indent=1, sort_keys=True) + "\n")
    summary = ["# CPU latency reports", "", "Batch 8 p50, ONNX Runtime (CPU) vs PyTorch eager fp32 in the same process.", "",
               "| model | precision | result |", "| --- | --- | --- |", *(rows[k] for k in sorted(rows))]
    (RESULTS / "cpu_summary.md").write_text("\n".join(summary) + "\n")
    print(f"wrote {RESULTS / 'cpu_summary.md'}")


def _headline(report: Any) -> str:
    """image/text at batch 8: ONNX Runtime's p50 and its speed-up over PyTorch eager (fp32)."""
    parts = []
    for tower in ("image", "text"):
        rows = {r.backend: r for r in report.rows if r.tower == tower and r.batch == 8 and r.status == "ok"}
        ort, torch = rows.get("onnxruntime"), rows.get("torch")
        if ort and torch:
            parts.append(f"{tower} {ort.p50_ms:.0f} ms ({torch.p50_ms / ort.p50_ms:.2f}x torch)")
        elif torch:
            parts.append(f"{tower}: onnxruntime skipped")
    return "; ".join(parts) + "." if parts else ""


if __name__ == "__main__":
    main()
