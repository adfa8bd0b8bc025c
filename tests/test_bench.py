"""`clipexport bench`: real timings of real backends on a tiny artifact; numbers checked for consistency."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from clipexport.bench import BenchConfig, _flops_per_item, render_markdown, run_bench, time_runner, write_report
from clipexport.build import BuildOptions, build
from clipexport.cli import cli
from clipexport.errors import UsageError


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    from twins import write_twin

    model = write_twin("vit", tmp_path_factory.mktemp("twin"))
    return build(BuildOptions(model=model, pretrained="none", out=tmp_path_factory.mktemp("a") / "vit")).out_dir


def test_report_rows_are_consistent(artifact, tmp_path):
    config = BenchConfig(backends=("torch", "onnxruntime", "tensorrt"), batches=(1, 3), warmup=1, iters=5)
    report = run_bench(artifact, config)
    assert len(report.rows) == 2 * 2 * 3  # towers x batches x backends
    trt = [r for r in report.rows if r.backend == "tensorrt"]
    assert all(r.status == "skipped" and "TensorRT" in r.reason for r in trt)
    ok = [r for r in report.rows if r.status == "ok"]
    assert len(ok) == 8
    for r in ok:
        assert 0 < r.p50_ms <= r.p90_ms <= r.p99_ms
        assert r.items_per_s == pytest.approx(r.batch / (r.p50_ms / 1e3))
        assert r.achieved_gflops == pytest.approx(r.gflop_per_item * r.items_per_s)
        assert r.fraction_of_gemm == pytest.approx(r.achieved_gflops / report.gemm["best_gflops"])
    assert report.gemm["onnxruntime_gflops"] > 0 and report.gemm["torch_gflops"] > 0
    assert report.environment["versions"]["onnxruntime"] != "not installed"

    paths = write_report(report, tmp_path / "report")
    data = json.loads(paths["json"].read_text())
    assert data["schema_version"] == 1 and len(data["rows"]) == 12
    assert {"p50_ms", "p90_ms", "p99_ms", "items_per_s", "gflop_per_item", "fraction_of_gemm"} <= set(data["rows"][0])
    md = paths["md"].read_text()
    assert "| onnxruntime | 3 |" in md and "skipped: TensorRT is not installed" in md
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and paths["png"].stat().st_size > 10_000
    assert render_markdown(report).count("## ") == 2


def test_flops_per_item_match_open_clip_profile():
    """open_clip's published profile: ViT-B-32 image 8.82 GFLOPs, text 5.96 GFLOPs per item."""
    import open_clip
    import torch

    from clipexport.models.towers import image_tower, text_tower

    model = open_clip.create_model("ViT-B-32").eval()
    image = _flops_per_item(image_tower(model), torch.randn(1, 3, 224, 224)) / 1e9
    text = _flops_per_item(text_tower(model), open_clip.tokenize(["a photo of a dog."])) / 1e9
    assert image == pytest.approx(8.82, rel=0.02)
    assert text == pytest.approx(5.96, rel=0.03)


def test_time_runner_measures_and_syncs():
    calls = []
    seconds = time_runner(lambda: calls.append(1), warmup=2, iters=4, sync=lambda: calls.append(0))
    assert len(seconds) == 4 and np.all(seconds >= 0)
    assert calls.count(1) == 6 and calls.count(0) == 5  # one sync after warm-up, one per timed run


@pytest.mark.parametrize(
    "kwargs, message",
    [({"backends": ("tensorflow",)}, "unknown backend"), ({"batches": (0,)}, "positive"),
     ({"towers": ("audio",)}, "--tower"), ({"iters": 0}, "--iters")],
)
def test_bad_config(kwargs, message):
    with pytest.raises(UsageError, match=message):
        BenchConfig(**kwargs)


def test_cli_bench_writes_three_files(artifact, tmp_path):
    out = tmp_path / "r"
    result = CliRunner().invoke(cli, ["bench", str(artifact), "--batch", "2", "--tower", "text", "--iters", "2",
                                      "--warmup", "0", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["latency.png", "report.json", "report.md"]
    rows = json.loads((out / "report.json").read_text())["rows"]
    assert {(r["tower"], r["backend"], r["batch"]) for r in rows} == {("text", "torch", 2), ("text", "onnxruntime", 2)}
    bad = CliRunner().invoke(cli, ["bench", str(artifact), "--batch", "x"])
    assert bad.exit_code == 1 and "error: --batch" in bad.output


def test_every_towers_flops_are_counted_before_any_backend_moves_a_model(tmp_path, monkeypatch):
    """A transformers CLIPModel's two towers share one model: once the image tower's torch backend
    moved it to the GPU, counting the text tower's FLOPs on CPU tokens failed (seen on an H200).
    No GPU here, and a 'meta' device does not check devices; so this checks the order of events."""
    from clipexport import bench
    from twins import write_tiny_hf_clip

    model = write_tiny_hf_clip(tmp_path / "cfg")
    directory = build(BuildOptions(model=model, pretrained="none", out=tmp_path / "art")).out_dir
    events: list[str] = []
    real_flops, real_runner = bench._flops_per_item, bench._backend_runner

    def counted(module, example):
        events.append("flops")
        return real_flops(module, example)

    def runner(backend, *args):
        events.append("backend")
        return real_runner(backend, *args)

    monkeypatch.setattr(bench, "_flops_per_item", counted)
    monkeypatch.setattr(bench, "_backend_runner", runner)
    report = run_bench(directory, BenchConfig(backends=("torch",), batches=(1, 2), warmup=0, iters=1))
    assert events == ["flops", "flops"] + ["backend"] * 4
    rows = {r.tower: r for r in report.rows}
    assert set(rows) == {"image", "text"} and all(r.gflop_per_item > 0 for r in rows.values())
    assert rows["image"].gflop_per_item != rows["text"].gflop_per_item


def test_the_onnxruntime_gemm_probe_is_readable_by_older_onnxruntimes():
    """make_model stamps the installed onnx's newest IR (14 with onnx 1.23.1), which onnxruntime 1.30
    refused on the GPU machine; the probe pins IR 8 (opset 17's), and still computes a @ b."""
    import onnxruntime as ort

    from clipexport.bench import matmul_probe

    probe = matmul_probe(4)
    assert probe.ir_version == 8
    a, b = np.arange(16, dtype=np.float32).reshape(4, 4), np.eye(4, dtype=np.float32)[::-1].copy()
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"a": a, "b": b})[0], a @ b)
