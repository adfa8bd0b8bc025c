"""Artifacts nobody can trick: every command reads a manifest through one validating reader.

Each case edits a real artifact (a tiny ViT twin built once) the way an attacker or a broken
disk would, re-hashes what it must so only the case under test is wrong, and runs load,
verify, info and triton on it: one line naming the problem, exit status 1, no traceback,
nothing written.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from twins import write_twin

import clipexport
from clipexport.cli import cli
from clipexport.errors import ArtifactError, InputError
from clipexport.hashing import file_sha256


def run(*args: str) -> Any:
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from clipexport.build import BuildOptions, build

    model = write_twin("vit", tmp_path_factory.mktemp("twin"))
    out = tmp_path_factory.mktemp("art") / "vit"
    return build(BuildOptions(model=model, pretrained="none", out=out)).out_dir


def _copy(artifact: Path, tmp_path: Path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(artifact, target)
    return target


def _edit(directory: Path, change: Callable[[dict[str, Any]], None], rehash: bool = True) -> None:
    manifest = json.loads((directory / "manifest.json").read_text())
    change(manifest)
    if rehash and isinstance(manifest.get("files"), dict):
        for name in manifest["files"]:
            path = directory / name
            if path.is_file() and not path.is_symlink():
                manifest["files"][name] = file_sha256(path)
    (directory / "manifest.json").write_text(json.dumps(manifest))


def _refused_everywhere(directory: Path, needle: str, tmp_path: Path) -> None:
    """load(), and the verify, info and triton commands, refuse with one line holding `needle`."""
    with pytest.raises(ArtifactError, match=re.escape(needle)):
        clipexport.load(directory)
    commands = [("verify", str(directory)), ("info", str(directory)),
                ("triton", str(directory), "--out", str(tmp_path / "repo"))]
    for args in commands:
        result = run(*args)
        assert result.exit_code == 1, (args, result.output)
        # progress lines (indented, on stderr) may come before it; the refusal itself is one line
        lines = [line for line in result.output.splitlines() if line.strip() and not line.startswith("  ")]
        assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], (args, result.output)
        assert "Traceback" not in result.output
    assert not (tmp_path / "repo").exists()


ESCAPES: dict[str, Callable[[dict[str, Any]], None]] = {
    "onnx path with ..": lambda m: m["towers"]["image"].__setitem__("onnx", "../../x/image.onnx"),
    "absolute onnx path": lambda m: m["towers"]["image"].__setitem__("onnx", "/etc/passwd"),
    "absolute vocab": lambda m: m["tokenizer"].__setitem__("vocab", "/etc/passwd"),
    "files with ..": lambda m: m["files"].__setitem__("../outside.onnx", "0" * 64),
}


@pytest.mark.parametrize("case", list(ESCAPES))
def test_paths_outside_the_artifact_are_refused(artifact: Path, tmp_path: Path, case: str) -> None:
    directory = _copy(artifact, tmp_path)
    _edit(directory, ESCAPES[case])
    _refused_everywhere(directory, "outside the artifact", tmp_path)


def test_a_link_out_of_the_artifact_is_refused_even_when_rehashed(artifact: Path, tmp_path: Path) -> None:
    directory = _copy(artifact, tmp_path)
    outside = tmp_path / "elsewhere.onnx"
    shutil.copy(directory / "image.onnx", outside)
    (directory / "image.onnx").unlink()
    (directory / "image.onnx").symlink_to(outside)  # same bytes, so the recorded sha256 still matches
    _refused_everywhere(directory, "leads outside the artifact", tmp_path)


def test_files_not_listed_with_a_sha256_are_refused(artifact: Path, tmp_path: Path) -> None:
    directory = _copy(artifact, tmp_path)
    _edit(directory, lambda m: m.__setitem__("files", {}))
    onnx_model = onnx.load(str(directory / "image.onnx"))
    onnx_model.graph.initializer[0].raw_data = b"\x00" * len(onnx_model.graph.initializer[0].raw_data)
    onnx.save(onnx_model, str(directory / "image.onnx"))  # corrupted, and nothing would notice unhashed
    _refused_everywhere(directory, "every file read needs a sha256", tmp_path)


MALFORMED: dict[str, tuple[Callable[[dict[str, Any]], None], str]] = {
    "files null": (lambda m: m.__setitem__("files", None), "files is NoneType"),
    "towers a list": (lambda m: m.__setitem__("towers", ["image"]), "towers is list"),
    "batch min a string": (lambda m: m["batch"].__setitem__("min", "x"), "batch.min is str"),
    "batch min huge": (lambda m: m["batch"].update(min=100000, opt=100000, max=100000), "batch.min is 100000"),
    "batch min > max": (lambda m: m["batch"].update(min=9, opt=9, max=8), "expected min <= opt <= max"),
    "unknown tower": (lambda m: m["towers"].__setitem__("audio", m["towers"]["image"]), "expected image and/or text"),
    "sha256 not hex": (lambda m: m["files"].__setitem__("image.onnx", "zz"), "expected a sha256"),
    "precision unknown": (lambda m: m.__setitem__("precision", "fp4"), "precision is 'fp4'"),
    "shape holds null": (lambda m: m["towers"]["image"]["inputs"][0].__setitem__("shape", [None, 3]),
                         "expected positive sizes"),
    "logit scale text": (lambda m: m.__setitem__("logit_scale", "big"), "logit_scale is str"),
    "tensorrt blockers": (lambda m: m["towers"]["text"].__setitem__("tensorrt", {"blockers": [{"op": "X"}]}),
                          "blockers[0].count is missing"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_manifests_are_one_line_errors(artifact: Path, tmp_path: Path, case: str) -> None:
    change, needle = MALFORMED[case]
    directory = _copy(artifact, tmp_path)
    _edit(directory, change, rehash=False)
    _refused_everywhere(directory, needle, tmp_path)


def test_a_tower_pointed_at_the_other_graph_is_refused_before_it_runs(artifact: Path, tmp_path: Path) -> None:
    directory = _copy(artifact, tmp_path)
    _edit(directory, lambda m: m["towers"]["image"].update(onnx="text.onnx", files=["text.onnx"]))
    _refused_everywhere(directory, "not this tower's graph", tmp_path)


def test_verify_gates_on_the_recipe_tolerance_not_the_manifests(artifact: Path, tmp_path: Path) -> None:
    directory = _copy(artifact, tmp_path)
    graph = onnx.load(str(directory / "image.onnx"))
    from onnx import numpy_helper

    # Damage the image tower a little: one weight matrix scaled, the graph still runs.
    index, weight = max(((i, numpy_helper.to_array(t)) for i, t in enumerate(graph.graph.initializer)
                         if t.data_type == onnx.TensorProto.FLOAT), key=lambda it: it[1].size)
    graph.graph.initializer[index].CopyFrom(numpy_helper.from_array(weight * 1.5, graph.graph.initializer[index].name))
    onnx.save(graph, str(directory / "image.onnx"))

    def lenient(m: dict[str, Any]) -> None:
        for tower in m["towers"].values():
            tower["parity"]["tolerance"].update(cosine_min=-1.0, max_rel_err=1e9)

    _edit(directory, lenient)  # re-hashed: the files check passes, only the numbers can catch it
    result = run("verify", str(directory))
    assert result.exit_code == 1, result.output
    assert "image tower" in result.output and "FAILED" in result.output and "need >= 0.99999" in result.output


def test_nan_pixels_are_refused(artifact: Path) -> None:
    rt = clipexport.load(artifact)
    pixels = np.zeros((3, 3, 32, 32), np.float32)
    pixels[1, 0, 0, 0] = np.nan
    pixels[2, 1, 2, 3] = np.inf
    with pytest.raises(InputError, match=r"rows \[1, 2\] hold NaN or infinite"):
        rt.encode_pixels(pixels)
    assert np.isfinite(rt.encode_pixels(pixels[:1])).all()


def test_info_reads_as_a_person_reads_it(artifact: Path) -> None:
    result = run("info", str(artifact))
    assert result.exit_code == 0, result.output
    text = result.output
    assert "batch 1:8:64" in text and "{'min'" not in text
    assert "weights random (seed 0)" in text and "random none" not in text
    image_passes = next(line for line in text.splitlines() if line.strip().startswith("passes:"))
    assert "trim_text" not in image_passes and "simplify" in image_passes
    size = (artifact / "text.onnx").stat().st_size / 1e6
    assert f"text.onnx ({size:.1f} MB)" in text
    assert "top1_agreement: the share of zero-shot queries" in text


# -- the output directory: --force, --out ., unwritable places ------------------------------------

def test_force_never_deletes_a_users_other_files(twin: Callable[[str], str], tmp_path: Path) -> None:
    out = tmp_path / "notes"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    result = run("build", twin("vit"), "--pretrained", "none", "--out", str(out), "--force")
    assert result.exit_code == 1
    assert "--force replaces only an earlier output of clipexport or an empty directory" in result.output
    assert (out / "notes.txt").read_text() == "mine" and sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes"]


def test_force_replaces_an_earlier_artifact(artifact: Path, tmp_path: Path) -> None:
    from clipexport.artifacts import check_out_dir

    directory = _copy(artifact, tmp_path)
    check_out_dir(directory, force=True)  # ours: allowed
    (tmp_path / "empty").mkdir()
    check_out_dir(tmp_path / "empty", force=True)  # empty: allowed


def _refuse_without_torch(args: list[str], cwd: Path) -> tuple[int, str, bool]:
    """Run the CLI in a fresh interpreter; return (exit code, stderr, whether torch got imported)."""
    code = ("import sys\nfrom clipexport.cli import cli\n"
            "try:\n    cli(args=sys.argv[1:], prog_name='clipexport')\n"
            "except SystemExit as e:\n    print('torch' in sys.modules, file=sys.stdout); raise\n")
    proc = subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, capture_output=True, text=True, timeout=120)
    return proc.returncode, proc.stderr, proc.stdout.strip() == "True"


@pytest.mark.parametrize("case", ["unknown model", "unknown tag", "existing out", "out is cwd", "out under a file",
                                  "tensorrt missing"])
def test_bad_input_is_refused_before_torch_loads(case: str, tmp_path: Path) -> None:
    (tmp_path / "exists").mkdir()
    (tmp_path / "afile").write_text("x")
    args = {
        "unknown model": ["build", "ViT-B-33", "--pretrained", "none"],
        "unknown tag": ["build", "ViT-B-32", "--pretrained", "laion9000"],
        "existing out": ["build", "ViT-B-32", "--pretrained", "none", "--out", "exists"],
        "out is cwd": ["build", "ViT-B-32", "--pretrained", "none", "--out", "."],
        "out under a file": ["build", "ViT-B-32", "--pretrained", "none", "--out", "afile/sub"],
        "tensorrt missing": ["build", "ViT-B-32", "--pretrained", "none", "--backend", "tensorrt"],
    }[case]
    try:
        import tensorrt  # noqa: F401

        if case == "tensorrt missing" and hasattr(tensorrt, "Runtime"):
            pytest.skip("TensorRT is installed here: nothing to refuse")
    except ImportError:
        pass
    code, err, torch_loaded = _refuse_without_torch(args, tmp_path)
    assert code == 1, err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err
    assert not torch_loaded, f"torch was imported before refusing: {err}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "exists"]


def test_unwritable_outputs_are_refused_up_front(artifact: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    for args in (["triton", str(artifact), "--out", str(blocker / "repo")],
                 ["embed", str(artifact), "-t", "a cat", "--out", str(blocker / "t.npy")]):
        result = run(*args)
        assert result.exit_code == 1 and "Traceback" not in result.output, result.output
        assert "is a file, not a directory" in result.output or "does not exist" in result.output


@pytest.fixture
def read_only_dir(tmp_path: Path):
    mount = tmp_path / "ro"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"a read-only file system needs `mount` as root here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


def test_a_read_only_file_system_is_refused_before_any_work(artifact: Path, read_only_dir: Path,
                                                            twin: Callable[[str], str]) -> None:
    for args in (["build", twin("vit"), "--pretrained", "none", "--out", str(read_only_dir / "a")],
                 ["triton", str(artifact), "--out", str(read_only_dir / "repo")],
                 ["embed", str(artifact), "-t", "a cat", "--out", str(read_only_dir / "t.npy")]):
        result = run(*args)
        assert result.exit_code == 1, result.output
        assert "is on a read-only file system" in result.output and "Traceback" not in result.output


# -- batch ranges ---------------------------------------------------------------------------------

def test_a_batch_beyond_the_verified_bound_is_refused() -> None:
    result = run("build", "ViT-B-32", "--pretrained", "none", "--batch", "1:8:100000000")
    assert result.exit_code == 1 and "the largest batch clipexport builds is 1024" in result.output


@pytest.mark.parametrize("batch", ["4:4:4", "1:1:1"])
def test_a_fixed_batch_builds_a_static_graph(twin: Callable[[str], str], tmp_path: Path, artifact: Path,
                                              batch: str) -> None:
    out = tmp_path / "static"
    result = run("build", twin("vit"), "--pretrained", "none", "--out", str(out), "--batch", batch, "-q")
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    rows = int(batch.split(":")[0])
    assert manifest["towers"]["image"]["inputs"][0]["shape"] == [rows, 3, 32, 32]
    assert manifest["parity_batch_sizes"] == [rows]
    static, dynamic = clipexport.load(out), clipexport.load(artifact)
    rng = np.random.default_rng(0)
    pixels = rng.standard_normal((7, 3, 32, 32)).astype(np.float32)  # not a multiple of the batch
    cosine = (static.encode_pixels(pixels) * dynamic.encode_pixels(pixels)).sum(axis=1)
    assert cosine.min() > 0.99999
    texts = ["a cat", "a photo of a dog on a sofa", "x"]
    assert (static.encode_text(texts) * dynamic.encode_text(texts)).sum(axis=1).min() > 0.99999


def test_parity_runs_at_the_largest_batch_of_the_range(artifact: Path) -> None:
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert manifest["parity_batch_sizes"][-1] == manifest["batch"]["max"] == 64
    for tower in manifest["towers"].values():
        assert [b["batch_size"] for b in tower["parity"]["batches"]][-1] == 64


# -- leftovers of a build killed outright ---------------------------------------------------------

def test_a_sigkilled_builds_staging_is_removed_by_the_next_build(twin: Callable[[str], str], tmp_path: Path) -> None:
    import signal
    import time

    model = twin("vit")
    out = tmp_path / "vit"
    old_style = tmp_path / ".vit.partial-k2x9qz0a"  # an older clipexport's name, without a pid
    old_style.mkdir()
    (old_style / "image.onnx").write_bytes(b"x" * 1000)
    unrelated = tmp_path / ".other.partial-1-abc"
    unrelated.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "clipexport", "build", model, "--pretrained", "none",
                             "--out", str(out)], stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    for line in proc.stderr:
        if "export text tower ..." in line:
            break
    time.sleep(0.3)
    staged = [p.name for p in tmp_path.iterdir() if p.name.startswith(f".vit.partial-{proc.pid}-")]
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert staged and (tmp_path / staged[0]).is_dir() and any((tmp_path / staged[0]).iterdir())
    result = run("build", model, "--pretrained", "none", "--out", str(out), "-q")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.partial-1-abc", "vit"]


# -- precision spellings --------------------------------------------------------------------------

def test_precision_shorthands_and_any_case(twin: Callable[[str], str], tmp_path: Path) -> None:
    model = twin("vit")
    out = tmp_path / "fp16"
    result = run("build", model, "--pretrained", "none", "--fp16", "--towers", "text", "--out", str(out), "-q")
    assert result.exit_code == 0, result.output
    assert json.loads((out / "manifest.json").read_text())["precision"] == "fp16"
    clash = run("build", model, "--pretrained", "none", "--fp16", "--precision", "INT8")
    assert clash.exit_code == 1 and "precision given twice: fp16 and int8" in clash.output
    upper = run("build", model, "--pretrained", "none", "--precision", "BF16", "--out", str(out))
    assert upper.exit_code == 1 and "already exists" in upper.output  # BF16 parsed; refused for --out only
