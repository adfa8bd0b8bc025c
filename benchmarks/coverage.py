"""Try every open_clip config on this machine: random weights, fp32, both towers.

Each model is built in its own child process (a crash or an out-of-memory kill of one
model cannot stop the survey, and the child's peak RSS is measured by wait4). Writes
benchmarks/coverage.md: per model, status, cosine_min, max_abs_err, parameters, time,
peak RSS, or the exact reason it is unsupported.

    python benchmarks/coverage.py                      # every config (hours on 2 cores)
    python benchmarks/coverage.py --only 'RN|ViT-B'    # a regex of model names
    python benchmarks/coverage.py --max-params 500e6   # skip larger configs (listed as skipped)
    python benchmarks/coverage.py --resume --budget-minutes 60   # continue a survey, an hour at a time
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORKER = r"""
import json, sys, time
from pathlib import Path
from clipexport.build import BuildOptions, build
from clipexport.errors import ClipExportError
name, out = sys.argv[1], Path(sys.argv[2])
result = {"model": name}
try:
    res = build(BuildOptions(model=name, pretrained="none", out=out))
    towers = res.manifest["towers"]
    result.update(status="passed", cosine_min=min(t["parity"]["cosine_min"] for t in towers.values()),
                  max_abs_err=max(t["parity"]["max_abs_err"] for t in towers.values()),
                  params=sum(t["parameters"] for t in towers.values()),
                  stages={k: t["passes"] for k, t in towers.items()})
except ClipExportError as exc:
    result.update(status="failed", reason=str(exc).splitlines()[0][:300])
print("RESULT " + json.dumps(result), flush=True)
"""


def estimate_params(cfg: dict) -> float:
    """Rough parameter count of a transformer config (12 * width^2 per layer), to skip what cannot fit."""
    total = 0.0
    for tower in ("vision_cfg", "text_cfg"):
        c = cfg.get(tower, {})
        layers = c.get("layers", 0)
        layers = sum(layers) * 4 if isinstance(layers, (list, tuple)) else layers  # ResNet: rough
        width = c.get("width", 0)
        total += 12 * layers * width * width
    return total


def survey(names: list[str], max_params: float, timeout: int, done: dict[str, dict] | None = None,
           deadline: float = float("inf")) -> list[dict]:
    """One row per name; rows in `done` (an earlier run's) are kept, and names reached after
    `deadline` (time.monotonic) are listed as not run yet."""
    from clipexport.models.architecture import families_of
    from clipexport.recipes import load_recipes, unsupported_reason
    import open_clip

    recipes = list(load_recipes().values())
    rows = []
    for index, name in enumerate(names, 1):
        families = families_of(open_clip.get_model_config(name))
        row: dict = {"model": name, "family": families.describe()}
        recipe = next((r for r in recipes if r.covers(families)), None)
        estimate = estimate_params(open_clip.get_model_config(name))
        if done and name in done and done[name]["status"] in ("passed", "failed"):  # the rest: decided anew
            row = done[name]
        elif recipe is None:
            row.update(status="unsupported", reason=unsupported_reason(families))
        elif estimate > max_params:
            row.update(status="skipped", params=estimate, reason=f"about {estimate / 1e6:.0f} M parameters, "
                       f"over --max-params {max_params:.0e}")
        elif time.monotonic() > deadline:
            row.update(status="not run", params=estimate, reason="not reached within --budget-minutes; "
                       "continue with --resume")
        else:
            row.update(_run_child(name, timeout))
        rows.append(row)
        print(f"[{index}/{len(names)}] {name}: {row['status']} {row.get('reason', '')}", flush=True)
    return rows


def _run_child(name: str, timeout: int) -> dict:
    """Build one model in a child process; its own peak RSS comes from wait4's rusage."""
    import threading

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


def render(rows: list[dict]) -> str:
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
        "(`--resume` continues where it stopped, keeping the rows already measured).",
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
        lines.append(f"| {r['model']} | {r['family']} | {params} | {r['status']} | {cos} | {err} | "
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
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    names = [n for n in open_clip.list_models() if not args.only or re.search(args.only, n)]
    previous = args.out.with_suffix(".json")
    done = {r["model"]: r for r in json.loads(previous.read_text())} if args.resume and previous.is_file() else {}
    # smallest first: within a budget, the most models get tried
    names.sort(key=lambda n: estimate_params(open_clip.get_model_config(n)))
    rows = survey(names, args.max_params, args.timeout, done, time.monotonic() + 60 * args.budget_minutes)
    args.out.write_text(render(rows))
    (args.out.with_suffix(".json")).write_text(json.dumps(rows, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
