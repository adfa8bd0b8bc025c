"""clipexport `hf:` against optimum-onnx on the same transformers CLIPModel, in one process.

What a user would pick instead for a transformers CLIP is optimum: `optimum-cli export onnx
--task zero-shot-image-classification` (fp32) and `optimum-cli onnxruntime quantize` (dynamic
int8). This script

1. saves random-weight CLIPModels with `save_pretrained` (ViT-B/32 = `CLIPConfig()`, and a
   ViT-L/14-size one); biases are drawn too (CLIPModel initializes them to zero, and exporters
   fold a zero bias away: real weights have them);
2. builds `hf:DIR` with clipexport (fp32 and int8, each build passing its parity gate) in child
   processes, and exports/quantizes the same directory with optimum's own CLI from optimum's own
   virtual environment (`--optimum-venv`: optimum-onnx pins other transformers/onnx versions);
3. loads everything into this process's ONNX Runtime and times it interleaved (A B A B ...),
   reporting medians and the interquartile range of each cell, and parity against transformers.

optimum writes one joint graph that needs both `pixel_values` and `input_ids`; each of its towers
is cut out of it with `onnx.utils.extract_model` (its own nodes, untouched), so a dummy of the
other input costs it nothing. Text rows feed the same ids to both: 32 ImageNet-style prompts,
trimmed to the longest prompt's EOT + 1 columns (optimum's graph takes any length too), and
clipexport's graph at the full 77 columns for the "untrimmed" row.

    python benchmarks/peer_optimum.py --optimum-venv /work/venv-optimum --repeat 15

Run it with as little else on the machine as you can; the results file states the spread.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from cpu_passes import CLASSES  # noqa: E402  (the same 32 ImageNet classes as the CPU pass report)

SIZES = {
    "ViT-B/32": {},  # CLIPConfig()'s defaults are OpenAI's ViT-B/32
    "ViT-L/14": {
        "text_config": {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12,
                        "num_hidden_layers": 12},
        "vision_config": {"hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16,
                          "num_hidden_layers": 24, "patch_size": 14, "image_size": 224},
        "projection_dim": 768,
    },
}


def cpu_flags() -> list[str]:
    wanted = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8")
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    have = set(line.split(":", 1)[-1].split())
    return [f for f in wanted if f in have]


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def save_model(size: str, directory: Path, seed: int) -> None:
    import torch
    from transformers import CLIPConfig, CLIPModel

    if (directory / "model.safetensors").is_file():
        return
    torch.manual_seed(seed)
    model = CLIPModel(CLIPConfig(**SIZES[size])).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0.0, 0.02)
    model.save_pretrained(str(directory))


def run(command: list[str], log: Callable[[str], None], env: dict[str, str] | None = None) -> None:
    log("$ " + " ".join(command))
    done = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    if done.returncode != 0:
        raise SystemExit(f"failed ({done.returncode}): {' '.join(command)}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")


def build_ours(model_dir: Path, out: Path, precision: str, towers: str, log: Callable[[str], None],
               tree: Path | None = None) -> None:
    """clipexport's own build (a child process: every graph passed its parity gate); `tree` runs
    another source tree's clipexport (the base to compare with)."""
    if (out / "manifest.json").is_file():
        return
    env = dict(os.environ, PYTHONPATH=str(tree or HERE.parent))
    run([sys.executable, "-m", "clipexport", "build", f"hf:{model_dir}", "--precision", precision,
         "--towers", towers, "--out", str(out), "--force"], log, env)


def export_optimum(venv: Path, model_dir: Path, out: Path, log: Callable[[str], None]) -> tuple[Path, Path]:
    """optimum's fp32 export and its dynamic int8 quantization (`--avx512_vnni`, as its docs show for
    x86 servers), both with optimum's own CLI from its own environment."""
    cli = str(venv / "bin" / "optimum-cli")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    fp32, int8 = out / "fp32", out / "int8"
    if not (fp32 / "model.onnx").is_file():
        run([cli, "export", "onnx", "-m", str(model_dir), "--task", "zero-shot-image-classification", str(fp32)],
            log, env)
    if not (int8 / "model_quantized.onnx").is_file():
        run([cli, "onnxruntime", "quantize", "--avx512_vnni", "--onnx_model", str(fp32), "-o", str(int8)], log, env)
    return fp32 / "model.onnx", int8 / "model_quantized.onnx"


def extract(joint: Path, tower: str, out: Path) -> Path:
    """One tower of optimum's joint graph: its nodes from the tower's input to its embedding."""
    import onnx.utils

    target = out / f"{joint.stem}-{tower}.onnx"
    if not target.is_file():
        graph_inputs = {i.name for i in onnx.load(str(joint), load_external_data=False).graph.input}
        text_inputs = [n for n in ("input_ids", "attention_mask") if n in graph_inputs]  # optimum's has a mask
        names = (["pixel_values"], ["image_embeds"]) if tower == "image" else (text_inputs, ["text_embeds"])
        onnx.utils.extract_model(str(joint), str(target), *names)
    return target


def text_feed(sess: Any, ids: np.ndarray) -> dict[str, np.ndarray]:
    """ids, and for a graph that takes one the tokenizer's attention mask (1 up to EOT, 0 on padding)."""
    names = {i.name for i in sess.get_inputs()}
    feed = {"input_ids": ids}
    if "attention_mask" in names:
        feed["attention_mask"] = (ids != 0).astype(np.int64)
    return feed


def session(path: Path, threads: int) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@dataclass
class Cell:
    label: str
    run: Callable[[], np.ndarray]
    times: list[float] = field(default_factory=list)

    def median_ms(self) -> float:
        return float(np.median(self.times) * 1e3)

    def spread(self) -> float:
        """Interquartile range over the median."""
        q1, q3 = np.percentile(self.times, [25, 75])
        return float((q3 - q1) / np.median(self.times))


def interleaved(cells: list[Cell], repeat: int, warmup: int = 2) -> None:
    """A B C A B C ...: a burst of load elsewhere on the machine hits every cell alike."""
    for cell in cells:
        for _ in range(warmup):
            cell.run()
    for _ in range(repeat):
        for cell in cells:
            start = time.perf_counter()
            cell.run()
            cell.times.append(time.perf_counter() - start)


def cosine_and_max(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return float((a * b).sum(1).min()), float(np.abs(a - b).max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--optimum-venv", type=Path, default=Path("/work/venv-optimum"))
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "clipexport-peer-optimum")
    parser.add_argument("--sizes", nargs="+", default=list(SIZES))
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "peer-optimum")
    parser.add_argument("--base-tree", type=Path, default=None,
                        help="another clipexport source tree (e.g. the main branch) whose hf: text graph "
                             "is timed as the base")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    args.work.mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        print(msg, flush=True)

    import onnxruntime as ort
    import torch
    from transformers import CLIPModel

    import clipexport
    from clipexport.verify import trim_to_eot

    prompts = [f"a photo of a {c}." for c in CLASSES]
    rows: list[dict[str, Any]] = []
    parity: list[dict[str, Any]] = []
    for size in args.sizes:
        key = size.replace("/", "-")
        model_dir = args.work / f"{key}-model"
        save_model(size, model_dir, seed=0)
        towers = "image,text" if size == "ViT-B/32" else "image"
        ours = {p: args.work / f"{key}-clipexport-{p}" for p in ("fp32", "int8")}
        for precision, out in ours.items():
            build_ours(model_dir, out, precision, towers, log)
        baseline = None
        if args.base_tree is not None and "text" in towers:
            baseline = args.work / f"{key}-clipexport-base-fp32"
            build_ours(model_dir, baseline, "fp32", "text", log, tree=args.base_tree)
        opt_fp32, opt_int8 = export_optimum(args.optimum_venv, model_dir, args.work / f"{key}-optimum", log)
        graphs: dict[tuple[str, str, str], Path] = {}
        for tower in towers.split(","):
            graphs[("clipexport", "fp32", tower)] = ours["fp32"] / f"{tower}.onnx"
            graphs[("clipexport", "int8", tower)] = ours["int8"] / f"{tower}.onnx"
            graphs[("optimum", "fp32", tower)] = extract(opt_fp32, tower, opt_fp32.parent)
            graphs[("optimum", "int8", tower)] = extract(opt_int8, tower, opt_int8.parent)
        sessions = {k: session(p, args.threads) for k, p in graphs.items()}

        hf = CLIPModel.from_pretrained(str(model_dir)).eval()
        loaded = clipexport.load(ours["fp32"])
        rng = np.random.default_rng(0)
        pixels = rng.standard_normal((8, 3, 224, 224)).astype(np.float32)
        with torch.no_grad():
            want_image = hf.get_image_features(pixel_values=torch.from_numpy(pixels)).pooler_output.numpy()
        for precision in ("fp32", "int8"):
            for tool in ("clipexport", "optimum"):
                got = sessions[(tool, precision, "image")].run(None, {"pixel_values": pixels})[0]
                cos, err = cosine_and_max(got, want_image)
                parity.append({"size": size, "tower": "image", "tool": tool, "precision": precision,
                               "cosine_min": cos, "max_abs_normalized": err})
        for batch in (1, 8):
            x = pixels[:batch]
            cells = [Cell(f"{tool} {precision}", lambda s=sessions[(tool, precision, "image")], x=x:
                          s.run(None, {"pixel_values": x})[0])
                     for precision in ("fp32", "int8") for tool in ("clipexport", "optimum")]
            interleaved(cells, args.repeat)
            for cell in cells:
                rows.append({"size": size, "tower": "image", "case": f"batch {batch}", "graph": cell.label,
                             "median_ms": cell.median_ms(), "iqr_over_median": cell.spread()})
                log(f"{size} image batch {batch} {cell.label}: {cell.median_ms():.1f} ms (IQR {cell.spread():.0%})")
        if "text" not in towers:
            continue
        ids = loaded.tokenize(prompts)
        trimmed = trim_to_eot(ids)
        with torch.no_grad():
            want_text = hf.get_text_features(input_ids=torch.from_numpy(ids)).pooler_output.numpy()
        for precision in ("fp32", "int8"):
            for tool in ("clipexport", "optimum"):
                s = sessions[(tool, precision, "text")]
                got = s.run(None, text_feed(s, trimmed))[0]
                cos, err = cosine_and_max(got, want_text)
                parity.append({"size": size, "tower": "text", "tool": tool, "precision": precision,
                               "cosine_min": cos, "max_abs_normalized": err, "tokens": trimmed.shape[1]})
        graphs_text = [(tool, precision) for precision in ("fp32", "int8") for tool in ("clipexport", "optimum")]
        cases = [(f"1 prompt, {trim_to_eot(ids[:1]).shape[1]} tokens", trim_to_eot(ids[:1])),
                 (f"8 prompts, {trim_to_eot(ids[:8]).shape[1]} tokens", trim_to_eot(ids[:8])),
                 (f"32 prompts, {trimmed.shape[1]} tokens", trimmed),
                 ("32 prompts, 77 tokens", ids)]
        if baseline is not None:  # the graph the base tree builds (fixed at 77 tokens there)
            sessions[("clipexport base", "fp32", "text")] = session(baseline / "text.onnx", args.threads)
        for case, feed in cases:
            cells = [Cell(f"{tool} {precision}", lambda s=sessions[(tool, precision, "text")], feed=feed:
                          s.run(None, text_feed(s, feed))[0]) for tool, precision in graphs_text]
            if baseline is not None and case.startswith("32 prompts"):
                base = sessions[("clipexport base", "fp32", "text")]
                cells.append(Cell("clipexport base fp32", lambda s=base: s.run(None, {"input_ids": ids})[0]))
            interleaved(cells, args.repeat)
            for cell in cells:
                rows.append({"size": size, "tower": "text", "case": case, "graph": cell.label,
                             "median_ms": cell.median_ms(), "iqr_over_median": cell.spread()})
                log(f"{size} text {case} {cell.label}: {cell.median_ms():.1f} ms (IQR {cell.spread():.0%})")
        del sessions, hf, loaded

    report = {"onnxruntime": ort.__version__, "threads": args.threads, "repeat": args.repeat,
              "cpu": cpu_name(), "cpu_flags": cpu_flags(), "optimum": optimum_version(args.optimum_venv),
              "load_average": os.getloadavg(), "rows": rows, "parity": parity}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(render(report))
    log(f"wrote {args.out.with_suffix('.md')}")


def optimum_version(venv: Path) -> str:
    done = subprocess.run([str(venv / "bin" / "python"), "-c",
                           "import importlib.metadata as m; print(m.version('optimum-onnx'), m.version('optimum'))"],
                          capture_output=True, text=True, check=False)
    return " / ".join(done.stdout.split()) if done.returncode == 0 else "unknown"


def render(report: dict[str, Any]) -> str:
    rows, parity = report["rows"], report["parity"]
    cells = {(r["size"], r["tower"], r["case"], r["graph"]): r for r in rows}
    lines = [
        "# clipexport `hf:` vs optimum-onnx (one process, interleaved)",
        "",
        f"ONNX Runtime {report['onnxruntime']}, {report['threads']} threads, CPU {report['cpu']} "
        f"(flags: {', '.join(report['cpu_flags'])}); optimum-onnx / optimum {report['optimum']}. "
        f"Each cell: median of {report['repeat']} runs, all cells of a table interleaved (A B C D A B C D ...); "
        "in brackets the interquartile range over the median, the noise of a machine shared with other "
        f"developers (load average at the end: {', '.join(f'{x:.1f}' for x in report['load_average'])}).",
        "",
        "Random-weight transformers `CLIPModel`s saved with `save_pretrained` (biases drawn too). "
        "clipexport: `clipexport build hf:DIR [--precision int8]` (fused Attention, trimmed text, "
        "static Q/DQ int8). optimum: `optimum-cli export onnx --task zero-shot-image-classification` and "
        "`optimum-cli onnxruntime quantize --avx512_vnni` (dynamic int8), each tower cut out of its joint graph.",
        "",
        "| model | tower | case | clipexport fp32 | optimum fp32 | clipexport int8 | optimum int8 | "
        "ours fp32 / optimum fp32 | ours int8 / optimum int8 | our int8 speed-up over our fp32 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    seen: list[tuple[str, str, str]] = []
    for r in rows:
        k = (r["size"], r["tower"], r["case"])
        if k not in seen:
            seen.append(k)
    for size, tower, case in seen:
        if (size, tower, case, "optimum fp32") not in cells:
            continue

        def cell(graph: str) -> dict[str, Any]:
            return cells[(size, tower, case, graph)]

        def fmt(graph: str) -> str:
            c = cell(graph)
            return f"{c['median_ms']:.1f} ms (±{c['iqr_over_median']:.0%})"

        of, oi, cf, ci = (cell(g)["median_ms"] for g in
                          ("optimum fp32", "optimum int8", "clipexport fp32", "clipexport int8"))
        lines.append(f"| {size} | {tower} | {case} | {fmt('clipexport fp32')} | {fmt('optimum fp32')} | "
                     f"{fmt('clipexport int8')} | {fmt('optimum int8')} | {of / cf:.2f}x faster | "
                     f"{oi / ci:.2f}x faster | {cf / ci:.2f}x |")
    lines += ["", "\"Nx faster\" = the other's median over ours (above 1: ours is faster).", ""]
    base = [r for r in rows if r["graph"] == "clipexport base fp32"]
    if base:
        lines += ["## Text: this branch against the base tree's `hf:` graph", "",
                  "The base tree's text graph is fixed at 77 tokens (no dynamic sequence, unfused attention); "
                  "it was timed in the same interleaved runs as the 32-prompt rows above, always at 77 tokens.", "",
                  "| model | case | base fp32 (77 tokens) | clipexport fp32 | speed-up |", "|---|---|---|---|---|"]
        for b in base:
            ours = cells[(b["size"], b["tower"], b["case"], "clipexport fp32")]
            lines.append(f"| {b['size']} | {b['case']} | {b['median_ms']:.1f} ms (±{b['iqr_over_median']:.0%}) | "
                         f"{ours['median_ms']:.1f} ms | {b['median_ms'] / ours['median_ms']:.2f}x |")
        lines.append("")
    lines += [
              "## Parity (normalized embeddings vs transformers in PyTorch, fp32)", "",
              "| model | tower | graph | cosine min | max abs |", "|---|---|---|---|---|"]
    for p in parity:
        tokens = f" ({p['tokens']} tokens)" if "tokens" in p else ""
        lines.append(f"| {p['size']} | {p['tower']}{tokens} | {p['tool']} {p['precision']} | "
                     f"{p['cosine_min']:.7f} | {p['max_abs_normalized']:.2g} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
