"""`clipexport build / info / verify / list` from the command line, on tiny twins."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from clipexport.cli import cli
from clipexport.hashing import file_sha256
from clipexport.recipes import Tolerance


def run(*args: str):
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    return result


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir()) if parent.exists() else []


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One tiny ViT artifact built through the CLI, shared by the read-only tests below."""
    from twins import write_twin

    model = write_twin("vit", tmp_path_factory.mktemp("twin"))
    out = tmp_path_factory.mktemp("art") / "vit-tiny"
    result = run("build", model, "--pretrained", "none", "--out", str(out), "--seed", "5")
    assert result.exit_code == 0, result.output
    return model, out, result


def test_build_writes_artifact_and_manifest(built):
    model, out, result = built
    assert result.output.strip().splitlines()[-1] == str(out)
    for stage in ("load reference model", "export image tower", "optimize image tower", "verify text tower (batches [1, 3, 8, 64])"):
        assert f"{stage}: done in" in result.output  # progress per stage with timings
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"] == model.replace("local-dir:", "local-dir:")
    assert manifest["pretrained"] == "none" and manifest["precision"] == "fp32"
    assert manifest["weights"] == {"kind": "random", "value": "none", "seed": 5, "sha256": None}
    for lib in ("torch", "open_clip_torch", "onnx", "onnxruntime", "onnxslim", "clipexport"):
        assert manifest["versions"][lib] not in ("", "not installed")
    image, text = manifest["towers"]["image"], manifest["towers"]["text"]
    assert image["inputs"] == [{"name": "pixel_values", "dtype": "float32", "shape": ["batch", 3, 32, 32]}]
    assert image["outputs"] == [{"name": "image_embeds", "dtype": "float32", "shape": ["batch", 24]}]
    # the text tower takes a dynamic sequence axis (exact EOT trimming, issue #7)
    assert text["inputs"] == [{"name": "input_ids", "dtype": "int64", "shape": ["batch", "sequence"]}]
    for tower in (image, text):
        assert tower["sha256"] == file_sha256(out / tower["onnx"]) == manifest["files"][tower["onnx"]]
        record = next(r for r in tower["passes"] if r["name"] == "simplify")
        assert record["status"] == "applied"
        assert record["nodes_after"] < record["nodes_before"]
        parity = tower["parity"]
        assert parity["passed"] is True and parity["cosine_min"] >= 0.99999 and parity["max_rel_err"] <= 1e-4
        assert 0 <= parity["max_abs_err"] < 1e-4
        assert [b["batch_size"] for b in parity["batches"]] == [1, 3, 8, 64]  # the range's max too
    assert manifest["tokenizer"]["context_length"] == 77
    assert manifest["preprocess"]["size"] == [32, 32]
    assert sorted(p.name for p in out.iterdir()) == ["image.onnx", "manifest.json", "text.onnx", "tokenizer"]


def test_info_summarizes(built):
    _, out, _ = built
    result = run("info", str(out))
    assert result.exit_code == 0
    assert "pixel_values float32[batch, 3, 32, 32] -> image_embeds float32[batch, 24]" in result.output
    assert "simplify " in result.output and "passed" in result.output and "batch 1:8:64" in result.output
    assert json.loads(run("info", str(out), "--json").output)["precision"] == "fp32"


def test_verify_passes_then_catches_tampering(built, tmp_path):
    import shutil

    _, out, _ = built
    result = run("verify", str(out))
    assert result.exit_code == 0 and "ok: 3 files match their sha256" in result.output
    assert result.output.rstrip().endswith(": image, text")
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    with open(copy / "text.onnx", "r+b") as fh:  # truncate
        fh.truncate(1000)
    result = run("verify", str(copy), "--files-only")
    assert result.exit_code == 1
    assert "text.onnx does not match its sha256" in result.output
    (copy / "image.onnx").unlink()
    assert "image.onnx is missing" in run("verify", str(copy)).output


def test_default_out_dir_and_force(twin, tmp_path, monkeypatch):
    model = twin("modified_resnet")
    monkeypatch.chdir(tmp_path)
    name = Path(model.split(":", 1)[1]).name
    result = run("build", model, "--pretrained", "none", "--towers", "image", "-q")
    out = tmp_path / "engines" / f"{name}-none-fp32"
    assert result.exit_code == 0, result.output
    assert Path(result.output.strip()).resolve() == out.resolve()
    assert list(json.loads((out / "manifest.json").read_text())["towers"]) == ["image"]
    assert not (out / "text.onnx").exists()

    again = run("build", model, "--pretrained", "none", "--towers", "image")
    assert again.exit_code == 1 and "already exists; pass --force" in again.output
    assert json.loads((out / "manifest.json").read_text())["weights"]["seed"] == 0

    forced = run("build", model, "--pretrained", "none", "--towers", "image", "--force", "--seed", "9", "-q")
    assert forced.exit_code == 0, forced.output
    assert json.loads((out / "manifest.json").read_text())["weights"]["seed"] == 9
    assert leftovers(out.parent) == [out.name]  # no staging or replaced directories left


def _bad(tmp_path: Path, *args: str) -> str:
    out = tmp_path / "parent" / "out"
    result = run("build", *args, "--out", str(out))
    assert result.exit_code == 1
    # progress lines may come first; then exactly one error line (parity adds one line per tower after it)
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1
    assert "Traceback" not in result.output
    assert leftovers(tmp_path / "parent") == [], "a failed build must write nothing"
    return result.output


def test_unknown_model_suggests_close_matches(tmp_path):
    out = _bad(tmp_path, "ViT-B-23", "--pretrained", "none")
    assert "unknown model 'ViT-B-23'" in out and "ViT-B-32" in out


def test_unsupported_model_says_why_in_one_line(tmp_path):
    """Every open_clip config has a recipe now; a local-dir CoCa on a ModifiedResNet has none."""
    import json

    from twins import TWINS

    directory = tmp_path / "coca-resnet"
    directory.mkdir()
    cfg = {**TWINS["coca"], "vision_cfg": {**TWINS["modified_resnet"]["vision_cfg"], "output_tokens": True}}
    (directory / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}))
    out = _bad(tmp_path, f"local-dir:{directory}", "--pretrained", "none")
    last = out.strip().splitlines()[-1]
    assert "unsupported" in last and "CoCa with a modified-resnet image tower" in last
    assert "Traceback" not in out


def test_missing_checkpoint(twin, tmp_path):
    assert "checkpoint not found" in _bad(tmp_path, twin("vit"), "--pretrained", str(tmp_path / "nope.pt"))


@pytest.mark.parametrize("suffix", [".pt", ".safetensors", ".bin"])
def test_corrupt_checkpoint(twin, tmp_path, suffix):
    path = tmp_path / f"corrupt{suffix}"
    path.write_bytes(b"\x00not a checkpoint" * 100)
    assert "cannot read checkpoint" in _bad(tmp_path, twin("vit"), "--pretrained", str(path))


def test_checkpoint_of_another_architecture(twin, tmp_path):
    from clipexport.models import load_reference

    path = tmp_path / "rn.pt"
    torch.save(load_reference(twin("modified_resnet"), "none").model.state_dict(), path)
    out = _bad(tmp_path, twin("vit"), "--pretrained", str(path))
    assert "does not fit" in out and "missing keys" in out and "another architecture" in out


class _Payload:
    """A class a weights_only load must refuse to unpickle."""


def test_checkpoint_with_pickled_code_is_refused(twin, tmp_path):
    from clipexport.models import load_reference

    path = tmp_path / "pickled.pt"
    torch.save({"state_dict": load_reference(twin("vit"), "none").model.state_dict(), "x": _Payload()}, path)
    out = _bad(tmp_path, twin("vit"), "--pretrained", str(path))
    assert "pickled objects" in out and "weights_only" not in out and "add_safe_globals" not in out


class _Exploit:
    """Unpickling this runs a shell command (the classic malicious checkpoint)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _EvalCall:
    """Unpickling this calls builtins.eval."""

    def __reduce__(self):
        return (eval, ("1 + 1",))


def _malicious_checkpoints(tmp_path: Path, state: dict) -> dict[str, Path]:
    """Checkpoints torch 2.14 refuses with each of its wordings (blocked module, reduce, global)."""
    files = {}
    for name, payload in {"blocked-module": _Exploit(tmp_path / "pwned"),
                          "unknown-global": _Payload(),
                          "builtin-call": _EvalCall()}.items():
        files[name] = tmp_path / f"{name}.pt"
        torch.save({"state_dict": state, "x": payload}, files[name])
    return files


def test_malicious_checkpoint_gets_our_message_not_torchs_advice(twin, tmp_path):
    from clipexport.models import load_reference

    state = load_reference(twin("vit"), "none").model.state_dict()
    for name, path in _malicious_checkpoints(tmp_path, state).items():
        out = _bad(tmp_path, twin("vit"), "--pretrained", str(path))
        assert "holds pickled objects beyond tensors" in out, (name, out)
        assert "weights_only" not in out and "arbitrary code" not in out, (name, out)
    assert not (tmp_path / "pwned").exists(), "the payload ran"


def test_malicious_checkpoint_read_tower_by_tower_gets_our_message(twin, tmp_path):
    """The per-tower reader (large models) words it the same way."""
    from clipexport.errors import WeightsError
    from clipexport.models import load_reference
    from clipexport.models.per_tower import _checkpoint_tensors

    state = load_reference(twin("vit"), "none").model.state_dict()
    for name, path in _malicious_checkpoints(tmp_path, state).items():
        with pytest.raises(WeightsError) as err:
            _checkpoint_tensors(path, lambda key: True)
        assert "holds pickled objects beyond tensors" in str(err.value), name
        assert "weights_only" not in str(err.value), name
    assert not (tmp_path / "pwned").exists(), "the payload ran"


def test_corrupt_checkpoint_error_leaves_out_torchs_advice(twin, tmp_path):
    path = tmp_path / "broken.pt"
    path.write_bytes(b"\x80\x02not a pickle at all" * 10)
    out = _bad(tmp_path, twin("vit"), "--pretrained", str(path))
    assert "cannot read checkpoint" in out and "weights_only" not in out and "pickled objects" not in out


def test_unknown_tag_lists_known_tags(tmp_path):
    out = _bad(tmp_path, "ViT-B-32", "--pretrained", "laion9000")
    assert "Known tags: openai, laion400m_e31" in out and "--pretrained none" in out


def test_tag_offline_names_the_offline_alternatives(tmp_path):
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    start = time.perf_counter()
    out = _bad(tmp_path, "RN50", "--pretrained", "openai")
    assert "must be downloaded" in out and "--pretrained none" in out and "--pretrained PATH" in out
    assert time.perf_counter() - start < 60


@pytest.mark.parametrize("batch", ["0:1:1", "8:4:2", "1:2", "x:y:z"])
def test_bad_batch_range(twin, tmp_path, batch):
    assert "batch" in _bad(tmp_path, twin("vit"), "--pretrained", "none", "--batch", batch)


def test_bad_tower_name(twin, tmp_path):
    assert "unknown tower audio" in _bad(tmp_path, twin("vit"), "--pretrained", "none", "--towers", "image,audio")


def test_parity_failure_writes_nothing_unless_accepted(twin, tmp_path, monkeypatch):
    import clipexport.build as build_module

    real = build_module.recipe_for

    def impossible(families, model, directory=None):
        recipe = real(families, model, directory)
        return dataclasses.replace(recipe, tolerances={"fp32": Tolerance(cosine_min=1.0, max_rel_err=1e-15)})

    monkeypatch.setattr(build_module, "recipe_for", impossible)
    model = twin("vit")
    out = _bad(tmp_path, model, "--pretrained", "none", "--towers", "image")
    assert "parity outside the recipe's tolerance" in out and "cosine_min" in out

    accepted = tmp_path / "accepted"
    result = run("build", model, "--pretrained", "none", "--towers", "image", "--out", str(accepted),
                 "--accept-parity-failure")
    assert result.exit_code == 0, result.output
    manifest = json.loads((accepted / "manifest.json").read_text())
    assert manifest["parity_accepted_by_user"] is True
    assert manifest["towers"]["image"]["parity"]["passed"] is False
    assert "warning: built with --accept-parity-failure" in run("info", str(accepted)).output


def test_sigterm_during_export_leaves_nothing(twin, tmp_path):
    out = tmp_path / "parent" / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "clipexport", "build", twin("vit"), "--pretrained", "none", "--out", str(out)],
        stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    assert proc.stderr is not None
    for line in proc.stderr:
        if "export image tower ..." in line:
            break
    time.sleep(0.5)  # inside the export, after the staging directory exists
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    # 130, or killed by SIGINT (a shell shows that as 130 too): Python ends that way when an
    # interrupt is still pending at exit (seen once in CI, after the message below was printed)
    assert proc.returncode in (130, -signal.SIGINT), err
    assert "interrupted: nothing was written" in err
    assert leftovers(tmp_path / "parent") == []


def test_list_shows_recipes_and_models():
    result = run("list")
    assert result.exit_code == 0
    assert "vit:" in result.output and "RN50x64" in result.output and "ViT-L-14-336" in result.output
    everything = run("list", "--all").output
    assert "ViT-B-16-SigLIP" in everything and "mt5-base-ViT-B-32" in everything  # covered now
    # every open_clip config has a recipe: CoCa's contrastive towers too
    assert "coca_ViT-B-32" in everything and "coca_roberta-ViT-B-32" in everything
    assert "unsupported: 0 models" in everything


def test_help_teaches():
    text = run("build", "--help").output
    for needle in ("--pretrained", "MIN:OPT:MAX", "--force", "Examples:", "clipexport build ViT-B-32 --pretrained none"):
        assert needle in text


def test_an_interrupt_a_library_swallows_still_stops_the_build_at_the_next_stage_boundary():
    from clipexport.progress import STOP, Progress

    progress = Progress(quiet=True)
    try:
        with pytest.raises(KeyboardInterrupt), progress.stage("export image tower"):
            STOP.set()  # what the CLI's SIGTERM handler does before raising
            try:
                raise KeyboardInterrupt
            except KeyboardInterrupt:  # a library catching it mid-stage
                pass
        with pytest.raises(KeyboardInterrupt), progress.stage("simplify image tower"):
            pass
    finally:
        STOP.clear()
    with progress.stage("after"):
        pass
    assert set(progress.timings) == {"export image tower", "after"}  # the stopped stage never began
