"""benchmarks/gpu_ort.py end to end on ONNX Runtime's CPU provider with a tiny twin, so the device time of a
lent GPU goes to measuring: builds of all three precisions, parity against PyTorch fp32, latency rows,
node placement from ONNX Runtime's profiler, and the written report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(tmp_path_factory, precisions: str, batches: str):
    from twins import write_twin

    model = write_twin("vit", tmp_path_factory.mktemp("twin"))
    out = tmp_path_factory.mktemp("gpu-ort")
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_ort.py"), "--provider", "cpu",
                           "--models", model, "--precisions", precisions, "--batches", batches, "--iters", "2",
                           "--no-compile", "--work", str(out / "work"), "--out", str(out)],
                          capture_output=True, text=True, timeout=900, cwd=ROOT, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return model, json.loads((out / "gpu_ort.json").read_text()), (out / "gpu_ort.md").read_text()


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """The fast run: the fp16 graphs (the ones the GPU run exists for), one batch."""
    return _run(tmp_path_factory, "fp16", "2")


def _check_rows(results, model, precisions, batches):
    entry = results["models"][model]
    assert entry["build_errors"] == {} and set(entry["build_s"]) == set(precisions)
    rows = entry["rows"]
    for tower in ("image", "text"):
        for batch in batches:
            got = {r["backend"]: r for r in rows if r["tower"] == tower and r["batch"] == batch}
            assert "torch fp32 (reference, TF32 off)" in got
            for precision in precisions:
                row = got[f"onnxruntime {precision} (CPU)"]
                assert "skipped" not in row, row
                assert row["p50_ms"] > 0 and row["items_per_s"] == pytest.approx(batch / row["p50_ms"] * 1e3)
                assert 0 < row["fraction_of_gemm"] < 10
                assert row["nonfinite"] == 0
    return rows


def test_fp16_graphs_are_measured_against_the_fp32_reference(report):
    model, results, _ = report
    rows = _check_rows(results, model, ["fp16"], [2])
    fp16 = [r for r in rows if r["backend"] == "onnxruntime fp16 (CPU)"]
    # fp16: close to the fp32 reference, not equal to it (an fp32 graph mistaken for it would read 1e-7)
    assert len(fp16) == 2 and all(r["cosine_min"] > 0.999 and 1e-5 < r["max_abs_err"] < 0.05 for r in fp16)


@pytest.mark.slow
def test_every_precision_tower_and_batch_is_measured(tmp_path_factory):
    model, results, markdown = _run(tmp_path_factory, "fp32,fp16,int8", "1,3")
    rows = _check_rows(results, model, ["fp32", "fp16", "int8"], [1, 3])
    fp32 = [r for r in rows if r["backend"] == "onnxruntime fp32 (CPU)"]
    assert len(fp32) == 4 and all(r["cosine_min"] > 0.99999 and r["max_abs_err"] < 1e-4 for r in fp32)
    int8 = [r for r in rows if r["backend"] == "onnxruntime int8 (CPU)"]
    assert int8 and all(0.9 < r["cosine_min"] < 0.99999 for r in int8)  # quantized: close, not exact
    assert "onnxruntime int8 (CPU)" in markdown


def test_node_placement_is_read_from_the_profiler(report):
    model, results, markdown = report
    placement = results["models"][model]["placement"]
    image = placement["fp16/image"]
    # every node ran somewhere; on the CPU provider, nothing counts as a fallback
    assert image["nodes"].get("CPUExecutionProvider", 0) > 10 and image["cpu_op_types"] == {}
    assert "| fp16/image | CPU " in markdown


def test_report_names_environment_and_same_run_gemm(report):
    _, results, markdown = report
    env = results["environment"]
    assert env["provider"] == "CPUExecutionProvider" and env["gemm"]["float32"] > 1
    assert markdown.startswith("# ONNX Runtime on CPUExecutionProvider vs PyTorch (cpu)")
    assert "onnxruntime fp16 (CPU)" in markdown
