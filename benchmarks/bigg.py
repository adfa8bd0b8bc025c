"""ViT-bigG-14 (2.54 B parameters, 10.2 GB of fp32 weights) built on this machine: peak memory
and wall time per stage.

The build takes the large-tower path (clipexport/models/per_tower.py, export.export_tower_to_file):
one tower in memory at a time, weights streamed to ONNX external data, reference outputs taken
and the tower freed before ONNX Runtime loads the graph. A sampler thread reads the resident
memory (VmRSS) of this process and of every child (the ONNX Runtime parity process) every
0.1 s; each stage reports the peak of their sum, against the goal of 2x the tower's fp32 weights.
Then the artifact is loaded back with clipexport.load and embeds a few images and texts.

    python benchmarks/bigg.py                      # writes benchmarks/results/bigg.md and bigg.json
    python benchmarks/bigg.py --model ViT-B-32 --external-data --out-name smoke   # the same path, small
    python benchmarks/bigg.py --precision fp16 --out-name bigg-fp16   # fp16 converted over the data files
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Iterator

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def _rss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


class TreeMemory:
    """Samples the resident memory of this process tree; `window()` gives the peak within a block."""

    def __init__(self, interval: float = 0.1) -> None:
        self.interval = interval
        self.current_peak = 0
        self.overall_peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = os.getpid()
        while not self._stop.is_set():
            total = sum(_rss_bytes(pid) for pid in _descendants(me))
            self.current_peak = max(self.current_peak, total)
            self.overall_peak = max(self.overall_peak, total)
            self._stop.wait(self.interval)

    def __enter__(self) -> TreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def reset(self) -> None:
        self.current_peak = sum(_rss_bytes(pid) for pid in _descendants(os.getpid()))


def main() -> None:
    from clipexport.build import BuildOptions, build
    from clipexport.progress import Progress

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-bigG-14")
    parser.add_argument("--pretrained", default="none")
    parser.add_argument("--external-data", action="store_true", help="force the large-tower path (small models)")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16"])
    parser.add_argument("--out-name", default="bigg")
    parser.add_argument("--keep", type=Path, help="keep the artifact here instead of a temporary directory")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    stages: list[dict[str, Any]] = []

    class MeasuredProgress(Progress):
        """Progress that also records each stage's wall time and the tree's peak RSS within it."""

        @contextlib.contextmanager
        def stage(self, label: str) -> Iterator[None]:
            memory.reset()
            start = time.perf_counter()
            with super().stage(label):
                yield
            stages.append({"stage": label, "seconds": round(time.perf_counter() - start, 1),
                           "peak_rss_gb": round(memory.current_peak / 1e9, 2)})
            self.say(f"    peak RSS {memory.current_peak / 1e9:.2f} GB")

    tmp = Path(tempfile.mkdtemp(prefix="bigg-"))
    out = args.keep or tmp / "artifact"
    started = time.perf_counter()
    with TreeMemory() as memory:
        progress = MeasuredProgress()
        options = BuildOptions(model=args.model, pretrained=args.pretrained, out=out, force=True,
                               precision=args.precision,
                               **({"large_tower_bytes": 0} if args.external_data else {}))
        result = build(options, progress)
        build_seconds = time.perf_counter() - started
        with progress.stage("load back (clipexport.load) and embed 2 images + 2 texts"):
            import numpy as np

            import clipexport

            runtime = clipexport.load(out, backend="onnxruntime")
            pixels = np.random.default_rng(0).standard_normal((2, 3, *runtime.image_size)).astype(np.float32)
            images = runtime.encode_pixels(pixels)
            texts = runtime.encode_text(["a photo of a dog.", "a diagram of a volcano."])
            assert images.shape[0] == 2 and texts.shape[0] == 2 and np.isfinite(images).all()
            runtime.close()
            del runtime
    manifest = result.manifest
    files = {name: (out / name).stat().st_size for name in manifest["files"]}
    towers = {
        t: {"parameters": info["parameters"], "fp32_weight_gb": round(4 * info["parameters"] / 1e9, 2),
            "files": info["files"], "cosine_min": result.parity[t].cosine_min,
            "max_abs_err": result.parity[t].max_abs_err, "max_rel_err": result.parity[t].max_rel_err}
        for t, info in manifest["towers"].items()
    }
    report = {
        "model": args.model, "pretrained": args.pretrained, "precision": args.precision,
        "loading": manifest["loading"],
        "build_seconds": round(build_seconds, 1), "overall_peak_rss_gb": round(memory.overall_peak / 1e9, 2),
        "stages": stages, "towers": towers, "files": files,
        "sha256": manifest["files"], "cpu_count": os.cpu_count(),
        "versions": manifest["versions"],
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.out_name}.json").write_text(json.dumps(report, indent=2) + "\n")
    (RESULTS / f"{args.out_name}.md").write_text(render(report) + "\n")
    print(render(report))
    if args.keep is None:
        shutil.rmtree(tmp, ignore_errors=True)


def _tower_of(stage: str) -> str | None:
    for tower in ("image", "text"):
        if f"{tower} tower" in stage:
            return tower
    return None


def render(report: dict[str, Any]) -> str:
    towers = report["towers"]
    lines = [
        f"# {report['model']} on this machine ({report['cpu_count']} cores), pretrained={report['pretrained']}, "
        f"{report.get('precision', 'fp32')}",
        "",
        f"Loading: {report['loading']}. Build wall time {report['build_seconds']} s; peak RSS of the whole process "
        f"tree (build + ONNX Runtime parity child) {report['overall_peak_rss_gb']} GB.",
        "",
        "| tower | parameters | fp32 weights GB | cosine_min | max_abs_err | max_rel_err |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for tower, t in towers.items():
        lines.append(f"| {tower} | {t['parameters'] / 1e9:.3f} B | {t['fp32_weight_gb']} | {t['cosine_min']:.7f} | "
                     f"{t['max_abs_err']:.2e} | {t['max_rel_err']:.2e} |")
    lines += ["", "| stage | seconds | peak RSS GB | goal: < 2x the tower's fp32 weights |",
              "| --- | ---: | ---: | --- |"]
    for s in report["stages"]:
        tower = _tower_of(s["stage"])
        goal = ""
        if tower in towers:
            limit = 2 * towers[tower]["fp32_weight_gb"]
            goal = f"{'met' if s['peak_rss_gb'] < limit else 'MISSED'} ({limit:.1f} GB)"
        lines.append(f"| {s['stage']} | {s['seconds']} | {s['peak_rss_gb']} | {goal} |")
    lines += ["", "| file | bytes | sha256 (manifest) |", "| --- | ---: | --- |"]
    for name, size in report["files"].items():
        lines.append(f"| {name} | {size:,} | {report['sha256'][name][:16]}... |")
    lines += ["", "versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items())]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
