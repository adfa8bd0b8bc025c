"""Try every open_clip config on this machine: random weights, fp32, both towers.

Each model is built in its own child process (a crash or an out-of-memory kill of one
model cannot stop the survey, and the child's peak RSS is measured by wait4). Writes
benchmarks/coverage.md: per model, status, cosine_min, max_abs_err, parameters, time,
peak RSS, or the exact reason it is unsupported.

    python benchmarks/coverage.py                      # every config (hours on 2 cores)
    python benchmarks/coverage.py --only 'RN|ViT-B'    # a regex of model names
    python benchmarks/coverage.py --resume --only coca # try these again; every other row stays as it was
    python benchmarks/coverage.py --max-params 500e6   # skip larger configs (listed as skipped)
    python benchmarks/coverage.py --resume --budget-minutes 60   # continue a survey, an hour at a time
    python benchmarks/coverage.py --resume --jobs 2 --memory-gb 20   # two builds at once while they fit
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORKER = r"""
import json, sys, time
from pathlib import Path
from clipexport.build import BuildOptions, build
from clipexport.errors import ClipExportError, InsufficientMemoryError
name, out = sys.argv[1], Path(sys.argv[2])
result = {"model": name}
try:
    res = build(BuildOptions(model=name, pretrained="none", out=out))
    towers = res.manifest["towers"]
    result.update(status="passed", cosine_min=min(t["parity"]["cosine_min"] for t in towers.values()),
                  max_abs_err=max(t["parity"]["max_abs_err"] for t in towers.values()),
                  params=sum(t["parameters"] for t in towers.values()),
                  stages={k: t["passes"] for k, t in towers.items()})
except InsufficientMemoryError as exc:  # refused before loading: this machine is too small for it
    result.update(status="too large here", reason=str(exc).splitlines()[0][:300])
except ClipExportError as exc:
    result.update(status="failed", reason=str(exc).splitlines()[0][:300])
print("RESULT " + json.dumps(result), flush=True)
"""


def estimate_params(cfg: dict) -> float:
    """Rough parameter count of a transformer config (12 * width^2 per layer): the fallback when
    the model cannot be built on the meta device."""
    total = 0.0
    for tower in ("vision_cfg", "text_cfg"):
        c = cfg.get(tower, {})
        layers = c.get("layers", 0)
        layers = sum(layers) * 4 if isinstance(layers, (list, tuple)) else layers  # ResNet: rough
        width = c.get("width", 0)
        total += 12 * layers * width * width
    return total


def tower_sizes(name: str) -> dict[str, float]:
    """Exact parameters per tower (clipexport's own count on the meta device, the one `build` uses
    for its memory check); the rough estimate where the meta device cannot build the config."""
    import open_clip

    from clipexport.models.per_tower import count_parameters

    cfg = open_clip.get_model_config(name)
    try:
        counts = count_parameters(name, cfg)
    except Exception:  # noqa: BLE001 - a config the meta device cannot build: the rough count, one tower
        rough = estimate_params(cfg)
        return {"image": rough, "text": 0.0, "total": rough}
    return {"image": float(counts["image"]), "text": float(counts["text"]),
            "total": float(counts["image"] + counts["text"])}


def predicted_peak_gb(name: str, sizes: dict[str, float]) -> float:
    """Peak RSS a build is expected to reach, from this machine's earlier surveys: about 1.5 GB plus
    6x the fp32 weights on the normal path (onnxslim and the passes hold copies); towers over
    clipexport's large-tower size go to external data (one tower at a time for built-in CLIPs:
    about 1.3x a large tower, 8x a small one, whichever is more; loaded whole otherwise, about
    2.5x the large towers and still 6x the others)."""
    import open_clip

    from clipexport.build import LARGE_TOWER_BYTES
    from clipexport.models.per_tower import supports_per_tower

    weights = {k: 4 * v / 1e9 for k, v in sizes.items()}
    if max(weights["image"], weights["text"]) * 1e9 <= LARGE_TOWER_BYTES:
        return 1.5 + 6 * weights["total"]
    towers = [w for t, w in weights.items() if t != "total"]
    if supports_per_tower(open_clip.get_model_config(name)):
        # one tower at a time; a tower under the large-tower size takes the normal path's copies
        # (ViT-H-14: its 1.42 GB text tower peaked at 12.5 GB, above the 2.53 GB image tower's path)
        return 1.5 + max(1.3 * w if w * 1e9 > LARGE_TOWER_BYTES else 8 * w for w in towers)
    # loaded whole: a tower under the large-tower size still takes the normal path's copies
    # (ViT-L-16-SigLIP2: a 1.26 GB timm image tower beside a 2.26 GB text tower passed 14.6 GB)
    large = sum(w for w in towers if w * 1e9 > LARGE_TOWER_BYTES)
    return 1.5 + 2.5 * large + 6 * (weights["total"] - large)


def survey(names: list[str], sizes: dict[str, dict[str, float]], max_params: float, timeout: int,
           done: dict[str, dict] | None = None, deadline: float = float("inf"), jobs: int = 1,
           memory_gb: float = 20.0, on_row: Callable[[list[dict]], None] | None = None,
           selected: set[str] | None = None) -> list[dict]:
    """One row per name, in the order given; rows in `done` (an earlier run's) are kept, and names
    reached after `deadline` (time.monotonic) are listed as not run yet.

    Up to `jobs` builds run at once (a build is mostly one Python thread: tracing and the passes),
    and a build starts only while the predicted peaks of those running fit in `memory_gb`; a build
    predicted over it runs alone. `on_row` gets every row so far each time one is decided, so an
    interrupted survey keeps what it measured. Names outside `selected` (--only) keep their earlier
    row whatever it says."""
    import open_clip

    from clipexport.models.architecture import families_of
    from clipexport.recipes import load_recipes, unsupported_reason

    recipes = list(load_recipes().values())
    # Until a name is reached, its row is the earlier run's (so a survey killed midway loses no
    # row it was given), or "not run".
    rows: list[dict] = [done[n] if done and n in done else
                        {"model": n, "status": "not run", "params": sizes[n]["total"],
                         "reason": "not reached within --budget-minutes; continue with --resume"} for n in names]
    lock = threading.Condition()
    running: dict[str, float] = {}  # name -> predicted peak GB

    def decided(index: int, row: dict) -> None:
        with lock:
            rows[index] = row
            running.pop(row["model"], None)
            lock.notify_all()
            print(f"[{index + 1}/{len(names)}] {row['model']}: {row['status']} {row.get('reason', '')}", flush=True)
            if on_row is not None:
                on_row(list(rows))

    threads = []
    for index, name in enumerate(names):
        families = families_of(open_clip.get_model_config(name))
        row: dict = {"model": name, "family": families.describe(), "params": sizes[name]["total"]}
        recipe = next((r for r in recipes if r.covers(families)), None)
        if selected is not None and name not in selected:
            decided(index, done[name] if done and name in done else {**row, "status": "not run",
                                                                    "reason": "not selected by --only"})
            continue
        # an earlier run's measured rows are kept, unless --only names them to be tried again
        if selected is None and done and name in done and done[name]["status"] in ("passed", "failed",
                                                                                  "too large here"):
            decided(index, done[name])
            continue
        if recipe is None:
            row.update(status="unsupported", reason=unsupported_reason(families))
            decided(index, row)
            continue
        if sizes[name]["total"] > max_params:
            row.update(status="skipped", reason=f"{sizes[name]['total'] / 1e6:.0f} M parameters, "
                       f"over --max-params {max_params:.0e}")
            decided(index, row)
            continue
        peak = predicted_peak_gb(name, sizes[name])
        with lock:  # wait for a slot and for memory (alone when the prediction alone is over budget)
            lock.wait_for(lambda peak=peak: not running or (len(running) < jobs and sum(running.values()) + peak <= memory_gb))
        if time.monotonic() > deadline:
            row.update(status="not run", reason="not reached within --budget-minutes; continue with --resume")
            decided(index, row)
            continue
        with lock:
            running[name] = peak
        print(f"start {name} ({sizes[name]['total'] / 1e6:.0f} M parameters, predicted peak {peak:.1f} GB, "
              f"{len(running)} running)", flush=True)

        def work(index: int = index, row: dict = row, name: str = name) -> None:
            row.update(_run_child(name, timeout))
            decided(index, row)

        thread = threading.Thread(target=work, name=name)
        thread.start()
        threads.append(thread)
    for thread in threads:
        thread.join()
    return rows


def _run_child(name: str, timeout: int) -> dict:
    """Build one model in a child process; its own peak RSS comes from wait4's rusage."""
    with tempfile.TemporaryDirectory(prefix="coverage-") as tmp:
        out_path, err_path = Path(tmp) / "stdout", Path(tmp) / "stderr"
        start = time.perf_counter()
        with open(out_path, "w") as out, open(err_path, "w") as err:
            proc = subprocess.Popen([sys.executable, "-c", WORKER, name, str(Path(tmp) / "artifact")],
                                    stdout=out, stderr=err)
            timer = threading.Timer(timeout, proc.kill)
            timer.start()
            _, status, usage = os.wait4(proc.pid, 0)
            timer.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)
        seconds = round(time.perf_counter() - start, 1)
        rss = round(usage.ru_maxrss / 1e6, 2)  # kB -> GB
        for line in out_path.read_text().splitlines():
            if line.startswith("RESULT "):
                data = json.loads(line[len("RESULT "):])
                data.update(seconds=seconds, peak_rss_gb=rss)
                return data
        if seconds >= timeout:
            return {"status": "failed", "reason": f"timed out after {timeout}s", "seconds": seconds}
        tail = (err_path.read_text().strip().splitlines() or ["no output"])[-1][:300]
        return {"status": "failed", "reason": f"crashed (exit {proc.returncode}): {tail}", "seconds": seconds,
                "peak_rss_gb": rss}


def render(rows: list[dict], jobs: int = 1) -> str:
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    lines = [
        "# open_clip config coverage",
        "",
        "Every config of `open_clip.list_models()` tried on this machine (2 cores, 24 GiB): seeded random",
        "weights, fp32, both towers, ONNX Runtime CPU parity against PyTorch. Written by",
        "`python benchmarks/coverage.py`. Peak RSS is that model's own build process (wait4). Models are",
        "tried smallest first; those a run's `--budget-minutes` did not reach are listed as `not run`",
        "(`--resume` continues where it stopped, keeping the rows already measured). Parameters are",
        "counted exactly on PyTorch's meta device; `too large here` is clipexport's own memory check",
        "refusing, before loading anything, a build whose least memory exceeds this machine's. Times are wall clock"
        + (f", with up to {jobs} builds at once (as many as fit the memory budget), so a row's time"
           " includes sharing the 2 cores" if jobs > 1 else "") + ".",
        "",
        "Counts: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())),
        "",
        "| model | family | params | status | cosine_min | max_abs_err | time s | peak RSS GB | reason |",
        "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        params = f"{r['params'] / 1e6:.0f} M" if r.get("params") else "-"
        cos = f"{r['cosine_min']:.7f}" if "cosine_min" in r else "-"
        err = f"{r['max_abs_err']:.2e}" if "max_abs_err" in r else "-"
        lines.append(f"| {r['model']} | {r.get('family', '-')} | {params} | {r['status']} | {cos} | {err} | "
                     f"{r.get('seconds', '-')} | {r.get('peak_rss_gb', '-')} | {r.get('reason', '')} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    import open_clip

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", help="regex of model names to try")
    parser.add_argument("--max-params", type=float, default=float("inf"))
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per model")
    parser.add_argument("--out", type=Path, default=HERE / "coverage.md")
    parser.add_argument("--resume", action="store_true", help="keep the rows of the last run's coverage.json")
    parser.add_argument("--budget-minutes", type=float, default=float("inf"),
                        help="start no new model after this long; the rest are listed as not run")
    parser.add_argument("--jobs", type=int, default=1, help="builds at once (each is mostly one thread)")
    parser.add_argument("--memory-gb", type=float, default=20.0,
                        help="start a build only while the predicted peaks of those running fit in this")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    names = open_clip.list_models()
    previous = args.out.with_suffix(".json")
    done = {r["model"]: r for r in json.loads(previous.read_text())} if args.resume and previous.is_file() else {}
    # --only tries the names it matches; with --resume the other rows stay as they were
    selected = {n for n in names if re.search(args.only, n)} if args.only else None
    if selected is not None and not args.resume:
        names = sorted(selected)
    sizes = {n: tower_sizes(n) for n in names}
    names.sort(key=lambda n: sizes[n]["total"])  # smallest first: within a budget, the most models get tried

    def write(rows: list[dict]) -> None:  # after every decided row: an interrupted survey keeps its rows
        for path, text in ((args.out, render(rows, args.jobs)),
                           (args.out.with_suffix(".json"), json.dumps(rows, indent=1) + "\n")):
            partial = path.with_name(path.name + ".partial")
            partial.write_text(text)
            partial.replace(path)

    rows = survey(names, sizes, args.max_params, args.timeout, done, time.monotonic() + 60 * args.budget_minutes,
                  jobs=args.jobs, memory_gb=args.memory_gb, on_row=write, selected=selected)
    write(rows)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
