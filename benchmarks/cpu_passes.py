"""Pass by pass on this CPU: PyTorch eager vs the exported graphs on ONNX Runtime, in one process.

For each model (random weights: speed does not depend on them) the script builds, with
clipexport's own build in a child process (so every graph passed its parity gate), the variants

  fp32 unfused   attention as MatMul/Softmax/MatMul (--no-fuse-attention)
  fp32           one ONNX Attention node per block
  fp16           fp16 written into the graph (ORT CPU runs most of it through fp32 casts)
  int8           Q/DQ, per-channel weights, calibrated activations

and times, best of N after warm-up, the image tower at batch 1 and 8 and the text tower on
32 ImageNet-style prompts ("a photo of a {class}."): eager at the full 77 tokens, ONNX at 77
and trimmed to max EOT + 1. It reports ratios to PyTorch eager, achieved GFLOP/s (FLOPs of
the work actually done, counted by torch's FlopCounterMode) against the large-GEMM GFLOP/s
measured in the same run (before and after, so drift shows), and the weight sizes.

    python benchmarks/cpu_passes.py --models ViT-B-32 ViT-L-14 --repeat 4

Run it on an otherwise idle machine: a concurrent heavy process changes every ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

VARIANTS = (  # (label, precision, disabled passes)
    ("fp32 unfused", "fp32", ("fuse_attention",)),
    ("fp32", "fp32", ()),
    ("fp16", "fp16", ()),
    ("int8", "int8", ()),
)
CLASSES = (
    "tench", "goldfish", "great white shark", "tiger shark", "hammerhead shark", "electric ray", "stingray",
    "rooster", "hen", "ostrich", "brambling", "goldfinch", "house finch", "junco", "indigo bunting",
    "American robin", "bulbul", "jay", "magpie", "chickadee", "American dipper", "kite (bird of prey)",
    "bald eagle", "vulture", "great grey owl", "fire salamander", "smooth newt", "newt", "spotted salamander",
    "axolotl", "American bullfrog", "tree frog",
)


@dataclass
class Row:
    model: str
    tower: str
    variant: str
    batch: int
    tokens: int | None
    seconds: float
    ratio_vs_eager: float | None
    gflops: float
    gemm_fraction: float
    weight_mib: float | None
    cosine_min: float | None
    note: str = ""


@dataclass
class Results:
    environment: dict[str, Any] = field(default_factory=dict)
    gemm: list[dict[str, Any]] = field(default_factory=list)
    rows: list[Row] = field(default_factory=list)
    builds: dict[str, Any] = field(default_factory=dict)
    load: list[float] = field(default_factory=list)
    attention: dict[str, dict[str, float]] = field(default_factory=dict)


def best_of(run: Callable[[], Any], repeat: int, warmup: int = 1) -> float:
    """Best seconds of `repeat` timed calls after `warmup` untimed ones."""
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def flops(module: Any, example: Any) -> float:
    """FLOPs of `example` through `module` (2 per multiply-add), on the plain attention path."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from clipexport.export import export_patches

    with export_patches(), FlopCounterMode(display=False) as counter, torch.no_grad():
        module(example)
    return float(counter.get_total_flops())


def session(path: Path) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def weight_mib(directory: Path, tower: str, manifest: dict[str, Any]) -> float:
    return sum((directory / name).stat().st_size for name in manifest["towers"][tower]["files"]) / 2**20


def bench_model(name: str, repeat: int, results: Results, work: Path, log: Callable[[str], None]) -> None:
    import torch

    from clipexport.models import load_reference
    from clipexport.models.towers import image_tower, text_tower
    from clipexport.verify import compare, trim_to_eot

    gemm = results.gemm[-1]["best_gflops"]
    ref = load_reference(name, "none")
    image, text = image_tower(ref.model), text_tower(ref.model)
    prompts = [f"a photo of a {c}." for c in CLASSES]
    ids = ref.tokenizer()(prompts)
    trimmed = trim_to_eot(ids.numpy())
    pixels = {b: torch.randn(b, 3, ref.image_size, ref.image_size, generator=torch.Generator().manual_seed(b))
              for b in (1, 8)}
    image_flops = flops(image, pixels[1])
    text_flops_full = flops(text, ids[:1])
    from clipexport.models.towers import TrimmableTextTower

    text_flops_trim = flops(TrimmableTextTower(ref.model), torch.from_numpy(trimmed[:1]))
    log(f"{name}: image {image_flops / 1e9:.2f} GFLOP/item, text {text_flops_full / 1e9:.2f} GFLOP/item at 77 "
        f"tokens, {text_flops_trim / 1e9:.2f} at {trimmed.shape[1]} (trimmed)")

    def add(tower: str, variant: str, batch: int, tokens: int | None, seconds: float, eager: float | None,
            work_flops: float, mib: float | None, cosine: float | None, note: str = "") -> None:
        gflops = work_flops / seconds / 1e9
        row = Row(name, tower, variant, batch, tokens, seconds, (eager / seconds) if eager else None, gflops,
                  gflops / gemm, mib, cosine, note)
        results.rows.append(row)
        log(f"  {tower} {variant:14s} batch {batch:2d}{'' if tokens is None else f' {tokens:2d} tok'}: "
            f"{seconds * 1e3:8.1f} ms  x{row.ratio_vs_eager or 1:.2f} eager  {gflops:6.1f} GFLOP/s "
            f"({row.gemm_fraction:.0%} of GEMM)")

    torch.set_num_threads(os.cpu_count() or 1)
    with torch.no_grad():
        want_image = {b: image(x).numpy() for b, x in pixels.items()}
        want_text = text(ids).numpy()

    vision = ref.model_cfg["vision_cfg"]
    if isinstance(vision.get("layers"), int):  # a ViT: its blocks' attention shape
        width, head_width = vision["width"], vision.get("head_width", 64)
        grid = ref.image_size // vision["patch_size"]
        results.attention[name] = attention_ops(8, width // head_width, grid * grid + 1, head_width, repeat)

    # Every measurement: (tower, variant, batch, tokens, run, FLOPs of the work, weight MiB, cosine).
    # run: a callable, or (ONNX path, feed) for a session opened per round.
    cases: list[tuple[str, str, int, int | None, Any, float, float | None, float | None]] = []

    def torch_run(module: Any, x: Any) -> Callable[[], Any]:
        def run() -> Any:
            with torch.no_grad():
                return module(x)
        return run

    # The ceiling is measured inside the rounds too, so it sees the same load as the towers.
    n = 2048
    a, w = torch.randn(n, n), torch.randn(n, n)
    cases.append(("gemm", "torch fp32 GEMM 2048^3", 1, None, lambda: a @ w, 2.0 * n**3, None, None))
    cases.append(("gemm", "onnxruntime fp32 GEMM 2048^3", 1, None, (gemm_model(n), {"a": a.numpy(), "b": w.numpy()}),
                  2.0 * n**3, None, None))
    for b, x in pixels.items():
        cases.append(("image", "PyTorch eager", b, None, torch_run(image, x), image_flops * b, None, None))
    cases.append(("text", "PyTorch eager", 32, 77, torch_run(text, ids), text_flops_full * 32, None, None))

    for label, precision, disabled in VARIANTS:
        out = work / f"{name}-{label.replace(' ', '-')}"
        start = time.perf_counter()
        # Each build runs in a child process (clipexport's own CLI): a ViT-L/14 export peaks at
        # ~6.4 GB and its memory is not all returned; the timings below all run in this process.
        command = [sys.executable, "-m", "clipexport", "build", name, "--pretrained", "none", "--precision",
                   precision, "--out", str(out), "-q"]
        if "fuse_attention" in disabled:
            command.append("--no-fuse-attention")
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:  # a failed gate (or a kill) is a result too: record it, go on
            reason = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
            results.builds[f"{name} {label}"] = {"failed": reason}
            log(f"  {label}: build failed: {reason}")
            continue
        manifest = json.loads((out / "manifest.json").read_text())
        results.builds[f"{name} {label}"] = {
            "seconds": round(time.perf_counter() - start, 1),
            **{t: {"parity": {k: manifest["towers"][t]["parity"][k] for k in
                              ("cosine_min", "max_abs_err", "max_rel_err", "top1_agreement", "top1_gated",
                               "passed", "note")},
                   "attention": manifest["towers"][t].get("attention"),
                   "passes": [(r["name"], r["status"], r["nodes_before"], r["nodes_after"], round(r["seconds"], 2),
                               r.get("detail", "")) for r in manifest["towers"][t]["passes"]]}
               for t in ("image", "text")},
        }
        log(f"  built {label} in {time.perf_counter() - start:.0f}s")
        # Sessions are opened per round (below), not held: eight ViT-L/14 sessions at once do
        # not fit next to the PyTorch model on a 24 GB machine shared with others.
        image_path = out / manifest["towers"]["image"]["onnx"]
        img = session(image_path)
        for b, x in pixels.items():
            feed = {"pixel_values": x.numpy()}
            cosine = compare(want_image[b], img.run(None, feed)[0], b).cosine_min
            cases.append(("image", label, b, None, (image_path, feed), image_flops * b,
                          weight_mib(out, "image", manifest), cosine))
        img = None
        text_path = out / manifest["towers"]["text"]["onnx"]
        txt = session(text_path)
        for tokens, feed_ids, work_flops in ((77, ids.numpy(), text_flops_full),
                                             (trimmed.shape[1], trimmed, text_flops_trim)):
            feed = {"input_ids": feed_ids}
            cosine = compare(want_text, txt.run(None, feed)[0], 32).cosine_min
            cases.append(("text", label + (" trimmed" if tokens < 77 else ""), 32, tokens, (text_path, feed),
                          work_flops * 32, weight_mib(out, "text", manifest), cosine))
        txt = None

    # Interleaved rounds: each round times every case once, after one warm-up each; the best
    # of the rounds is kept. A burst of load from other processes then hits all cases alike
    # instead of whichever case happened to run during it.
    best = [float("inf")] * len(cases)
    for round_ in range(repeat):
        opened: dict[Path, Any] = {}  # cases of one graph run back to back on one session
        for k, case in enumerate(cases):
            run = case[4]
            if isinstance(run, tuple):
                path, feed = run
                if path not in opened:
                    opened.clear()
                    opened[path] = session(path)
                sess = opened[path]

                def run(sess: Any = sess, feed: Any = feed) -> Any:
                    return sess.run(None, feed)
            run()  # warm-up: first call after (re)opening allocates
            t0 = time.perf_counter()
            run()
            best[k] = min(best[k], time.perf_counter() - t0)
        opened.clear()
        log(f"  round {round_ + 1}/{repeat} done (load {os.getloadavg()[0]:.2f})")
    for k, case in enumerate(cases):
        if case[0] == "gemm":
            results.gemm.append({"when": f"in the {name} rounds: {case[1]}", "best_gflops": case[5] / best[k] / 1e9})
    eager = {(c[0], c[2]): best[k] for k, c in enumerate(cases) if c[1] == "PyTorch eager"}
    for k, (tower, variant, batch, tokens, _, work_flops, mib, cosine) in enumerate(cases):
        if tower == "gemm":
            continue
        ref_time = eager.get((tower, batch)) if variant != "PyTorch eager" else None
        add(tower, variant, batch, tokens, best[k], ref_time, work_flops, mib, cosine)


def gemm_model(n: int) -> Path:
    """An ONNX file of one n x n x n fp32 MatMul (written once per run, opened like the towers)."""
    from onnx import TensorProto, helper, save

    path = Path(tempfile.gettempdir()) / f"cpu-passes-gemm-{n}-{os.getpid()}.onnx"
    if not path.exists():
        graph = helper.make_graph(
            [helper.make_node("MatMul", ["a", "b"], ["c"])], "gemm",
            [helper.make_tensor_value_info(x, TensorProto.FLOAT, [n, n]) for x in "ab"],
            [helper.make_tensor_value_info("c", TensorProto.FLOAT, [n, n])])
        save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def int8_gemm_gops(n: int = 2048, repeat: int = 4) -> float:
    """Best GOP/s (2 per multiply-add) of onnxruntime's MatMulInteger on n x n x n uint8 x int8:
    the integer ceiling an int8 graph's GEMMs run against (VNNI/AMX where the CPU has them)."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["a", "b"], ["c"])], "gemm_int8",
        [helper.make_tensor_value_info("a", TensorProto.UINT8, [n, n]),
         helper.make_tensor_value_info("b", TensorProto.INT8, [n, n])],
        [helper.make_tensor_value_info("c", TensorProto.INT32, [n, n])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    import onnxruntime as ort

    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feeds = {"a": rng.integers(0, 255, (n, n), dtype=np.uint8), "b": rng.integers(-127, 127, (n, n), dtype=np.int8)}
    return 2 * n**3 / best_of(lambda: sess.run(None, feeds), repeat) / 1e9


def attention_ops(batch: int, heads: int, seq: int, head_dim: int, repeat: int) -> dict[str, float]:
    """One attention block's core on ORT CPU: ONNX Attention (opset 23) vs com.microsoft.MultiHeadAttention.

    Non-causal, the shape of an image block; the numbers that would justify lowering to the
    contrib op on ONNX Runtime.
    """
    from onnx import TensorProto, helper

    def make(node: Any, shape: list[int], opsets: list[Any]) -> Any:
        graph = helper.make_graph([node], "attention", [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape)
                                                          for n in "qkv"],
                                  [helper.make_tensor_value_info("o", TensorProto.FLOAT, None)])
        model = helper.make_model(graph, opset_imports=opsets)
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])

    rng = np.random.default_rng(0)
    q4 = rng.standard_normal((batch, heads, seq, head_dim), dtype=np.float32)
    q3 = np.ascontiguousarray(q4.transpose(0, 2, 1, 3).reshape(batch, seq, heads * head_dim))
    onnx_op = make(helper.make_node("Attention", ["q", "k", "v"], ["o"]), list(q4.shape),
                   [helper.make_opsetid("", 23)])
    mha = make(helper.make_node("MultiHeadAttention", ["q", "k", "v"], ["o"], domain="com.microsoft", num_heads=heads),
               list(q3.shape), [helper.make_opsetid("", 23), helper.make_opsetid("com.microsoft", 1)])
    a = best_of(lambda: onnx_op.run(None, {"q": q4, "k": q4, "v": q4}), repeat)
    m = best_of(lambda: mha.run(None, {"q": q3, "k": q3, "v": q3}), repeat)
    return {"batch": batch, "heads": heads, "seq": seq, "head_dim": head_dim, "onnx_attention_ms": a * 1e3,
            "com_microsoft_mha_ms": m * 1e3}


def render(results: Results) -> str:
    env = results.environment
    lines = [
        "# CPU: graph passes pass by pass (PyTorch eager vs ONNX Runtime)",
        "",
        f"Written by `benchmarks/cpu_passes.py` on {env.get('date')}: {env.get('cpu')}, {env.get('cpu_count')} cores, "
        f"torch {env['versions'].get('torch')}, onnxruntime {env['versions'].get('onnxruntime')}. "
        f"Best of {env.get('repeat')} interleaved rounds (each round times every case once, after one "
        "untimed warm-up call), one process, random weights (`--pretrained none`).",
        f"Vector/matrix ISA: {' '.join(env.get('isa', [])) or 'unknown'}.",
        f"Load average during the run (1 min): {', '.join(f'{x:.2f}' for x in results.load)}.",
        "",
        "Large fp32 GEMM (2048^3) measured in the same run, the ceiling for the GFLOP/s columns:",
        "",
        "| when | torch fp32 GFLOP/s | onnxruntime fp32 GFLOP/s | best fp32 | onnxruntime int8 GOP/s (MatMulInteger) |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for g in results.gemm:
        lines.append(f"| {g['when']} | {g.get('torch_gflops', float('nan')):.1f} | "
                     f"{g.get('onnxruntime_gflops', float('nan')):.1f} | {g['best_gflops']:.1f} | "
                     f"{g.get('int8_gops', float('nan')):.1f} |")
    ceiling = max(g["best_gflops"] for g in results.gemm)
    lines += ["", f"Ceiling used below: **{ceiling:.1f} GFLOP/s**, the best fp32 GEMM measured anywhere in this run "
              "(other processes shared the machine: a GEMM sample taken during their bursts is low)."]
    lines += [
        "",
        "GFLOP/s counts the work actually done (a trimmed text batch does fewer FLOPs); "
        "'of GEMM' divides by that ceiling (int8 rows "
        "run their GEMMs on integer units, so they can exceed 100% of the fp32 ceiling). "
        "cosine: worst row against the PyTorch fp32 reference on the same input (text: the full 77 tokens).",
        "",
        "| model | tower | variant | batch | tokens | ms | x eager | GFLOP/s | of GEMM | weights MiB | cosine |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results.rows:
        lines.append(
            f"| {r.model} | {r.tower} | {r.variant} | {r.batch} | {r.tokens or ''} | {r.seconds * 1e3:.1f} | "
            f"{'' if r.ratio_vs_eager is None else f'{r.ratio_vs_eager:.2f}'} | {r.gflops:.1f} | "
            f"{r.gflops / ceiling:.0%} | {'' if r.weight_mib is None else f'{r.weight_mib:.1f}'} | "
            f"{'' if r.cosine_min is None else f'{r.cosine_min:.6f}'} |")
    if results.attention:
        lines += ["", "One image attention block's core alone (non-causal), ONNX `Attention` vs "
                  "`com.microsoft.MultiHeadAttention`, best of N:", "",
                  "| model | batch x heads x seq x head_dim | ONNX Attention ms | com.microsoft.MultiHeadAttention ms |",
                  "| --- | --- | ---: | ---: |"]
        for model, a in results.attention.items():
            lines.append(f"| {model} | {a['batch']} x {a['heads']} x {a['seq']} x {a['head_dim']} | "
                         f"{a['onnx_attention_ms']:.2f} | {a['com_microsoft_mha_ms']:.2f} |")
    lines += ["", "## Builds (each passed its parity gate; passes with node counts and seconds)", ""]
    for key, b in results.builds.items():
        if "failed" in b:
            lines.append(f"- **{key}**: build FAILED: {b['failed']}")
            continue
        lines.append(f"- **{key}** ({b['seconds']} s)")
        for tower in ("image", "text"):
            p = b[tower]["parity"]
            top1 = "" if p["top1_agreement"] is None else (
                f", zero-shot top-1 agreement {p['top1_agreement']:.3f}" + ("" if p["top1_gated"] else " (not gated)"))
            passes = "; ".join(f"{n} {s} {a}->{z} ({sec}s{', ' + d if d else ''})" for n, s, a, z, sec, d in
                               b[tower]["passes"] if s != "skipped")
            lines.append(f"  - {tower}: parity cosine_min {p['cosine_min']:.6f}, max_abs_err {p['max_abs_err']:.3g}"
                         f"{top1}; {passes}")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["ViT-B-32", "ViT-L-14"])
    parser.add_argument("--repeat", type=int, default=4, help="timed runs per measurement (best is reported)")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "cpu_passes.md")
    parser.add_argument("--render", type=Path, metavar="JSON",
                        help="only re-render the Markdown of a finished run from its JSON")
    args = parser.parse_args()
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    if args.render:
        data = json.loads(args.render.read_text())
        done = Results(environment=data["environment"], gemm=data["gemm"], rows=[Row(**r) for r in data["rows"]],
                       builds=data["builds"], load=data["load"], attention=data.get("attention", {}))
        print(write(done, args.out))
        return

    from clipexport.bench import environment, gemm_gflops

    results = Results()
    flags: list[str] = []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = sorted(f for f in line.split(":", 1)[1].split() if f.startswith(("avx", "amx")) or "vnni" in f)
                break
    except OSError:
        pass
    results.environment = {**environment("cpu"), "repeat": args.repeat, "isa": flags,
                           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}

    def log(msg: str) -> None:
        print(msg, flush=True)

    with tempfile.TemporaryDirectory(prefix="cpu-passes-") as tmp:
        for name in args.models:
            results.load.append(os.getloadavg()[0])
            results.gemm.append({"when": f"before {name}", **gemm_gflops("cpu", iters=max(args.repeat, 3)),
                                 "int8_gops": int8_gemm_gops(repeat=max(args.repeat, 3))})
            log(f"GEMM before {name}: {results.gemm[-1]['best_gflops']:.1f} GFLOP/s")
            bench_model(name, args.repeat, results, Path(tmp), log)
            write(results, args.out)  # after each model: a later out-of-memory kill keeps what was measured
        results.gemm.append({"when": "after all", **gemm_gflops("cpu", iters=max(args.repeat, 3)),
                             "int8_gops": int8_gemm_gops(repeat=max(args.repeat, 3))})
        results.load.append(os.getloadavg()[0])
    print(write(results, args.out))
    print(f"wrote {args.out}")


def write(results: Results, out: Path) -> str:
    """Write the Markdown report and its JSON next to it; return the Markdown."""
    text = render(results)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    out.with_suffix(".json").write_text(json.dumps(
        {"environment": results.environment, "gemm": results.gemm, "load": results.load,
         "rows": [asdict(r) for r in results.rows], "builds": results.builds, "attention": results.attention},
        indent=2, default=str))
    return text


if __name__ == "__main__":
    main()
