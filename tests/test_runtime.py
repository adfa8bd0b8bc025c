"""clipexport.load(dir) on a built tiny-twin artifact: integrity, backends, embeddings vs open_clip,
EOT trimming, threads, memory, bad input, the `embed` command, and no torch needed."""

from __future__ import annotations

import gc
import json
import os
import shutil
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from twins import write_twin

import clipexport
from clipexport.errors import (
    ArtifactError,
    BackendUnavailableError,
    ClipExportError,
    InputError,
    UsageError,
)
from clipexport.runtime import Runtime, TextTruncatedWarning, load

torch = pytest.importorskip("torch")
open_clip = pytest.importorskip("open_clip")

TEXTS = [
    "a photo of a dog.",
    "a diagram",
    "東京の夜景の写真 🍕",
    "tom &amp; jerry",
    "",
    "a very long caption " * 30,  # truncated to the context, EOT kept
    "A PHOTO OF THE NUMBER 7.",
]


def _images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    sizes = [(40, 30), (32, 32), (17, 64), (100, 7), (1, 1), (64, 48)]
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
            for w, h in (sizes[i % len(sizes)] for i in range(n))]


def _build(tmp_path_factory: pytest.TempPathFactory, name: str, towers=("image", "text")) -> Path:
    from clipexport.build import BuildOptions, build

    model = write_twin("vit", tmp_path_factory.mktemp(f"twin-{name}"))
    out = tmp_path_factory.mktemp(f"artifact-{name}") / "vit"
    return build(BuildOptions(model=model, pretrained="none", towers=towers, out=out)).out_dir


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _build(tmp_path_factory, "both")


@pytest.fixture(scope="module")
def rt(artifact: Path) -> Runtime:
    return load(artifact)


@pytest.fixture(scope="module")
def reference(artifact: Path):
    """The open_clip model the artifact was built from, and its own preprocess_val and tokenizer."""
    from open_clip.transform import PreprocessCfg, image_transform_v2

    from clipexport.models import load_reference

    manifest = json.loads((artifact / "manifest.json").read_text())
    ref = load_reference(manifest["model"], "none", 0)
    preprocess_val = image_transform_v2(PreprocessCfg(**ref.model.visual.preprocess_cfg), is_train=False)
    return ref.model, preprocess_val, open_clip.get_tokenizer(manifest["model"])


def _copy(artifact: Path, tmp_path: Path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(artifact, target)
    return target


def _rewrite_manifest(directory: Path, edit) -> None:
    path = directory / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


def _tolerance(artifact: Path, tower: str) -> dict:
    return json.loads((artifact / "manifest.json").read_text())["towers"][tower]["parity"]["tolerance"]


def _check_parity(got: np.ndarray, expected: np.ndarray, tol: dict) -> tuple[float, float]:
    assert got.shape == expected.shape and got.dtype == np.float32
    cosine = (got * expected).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(expected, axis=1))
    err = float(np.abs(got - expected).max())
    rel = float((np.abs(got - expected).max(1) / np.abs(expected).max(1)).max())
    assert cosine.min() >= tol["cosine_min"] and rel <= tol["max_rel_err"], (cosine.min(), err, rel)
    return float(cosine.min()), err


# -- loading, integrity, backends --------------------------------------------------------------

def test_load_says_what_runs(rt: Runtime, artifact: Path) -> None:
    assert isinstance(rt, Runtime) and clipexport.load is load
    assert rt.backend == "onnxruntime" and rt.device == "cpu"
    assert "backend='onnxruntime'" in repr(rt) and "device='cpu'" in repr(rt)
    assert rt.towers == ("image", "text")
    assert "tensorrt" in rt.skipped_backends and "TensorRT" in rt.skipped_backends["tensorrt"]
    details = rt.details()
    assert details["providers"] == {"image": ["CPUExecutionProvider"], "text": ["CPUExecutionProvider"]}
    assert rt.image_size == (32, 32) and rt.context_length == 77 and rt.embed_dim == 24
    text_shape = json.loads((artifact / "manifest.json").read_text())["towers"]["text"]["inputs"][0]["shape"]
    assert rt.trims_text is isinstance(text_shape[1], str)  # a symbolic sequence axis allows EOT trimming


def test_explicit_backends_and_devices_fail_clearly(artifact: Path) -> None:
    with pytest.raises(BackendUnavailableError, match="TensorRT"):
        load(artifact, backend="tensorrt")
    with pytest.raises(UsageError, match="backend 'onnx'"):
        load(artifact, backend="onnx")
    with pytest.raises(UsageError, match="device 'tpu'"):
        load(artifact, device="tpu")
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA: the no-GPU error cannot happen here")
    with pytest.raises(BackendUnavailableError, match="no CUDA provider"):
        load(artifact, backend="onnxruntime", device="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none visible to torch)")
def test_pytorch_backend_on_cuda(artifact: Path) -> None:
    gpu = load(artifact, backend="pytorch", device="cuda")
    cpu = load(artifact, backend="onnxruntime", device="cpu")
    assert gpu.device == "cuda:0"
    _check_parity(gpu.encode_text(TEXTS[:3]), cpu.encode_text(TEXTS[:3]), _tolerance(artifact, "text"))


def test_pytorch_backend_matches_onnxruntime(artifact: Path, rt: Runtime) -> None:
    pt = load(artifact, backend="pytorch", device="cpu")
    assert pt.backend == "pytorch" and pt.device == "cpu" and "pytorch" in repr(pt)
    images = _images(5)
    _check_parity(pt.encode_image(images), rt.encode_image(images), _tolerance(artifact, "image"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TextTruncatedWarning)
        _check_parity(pt.encode_text(TEXTS), rt.encode_text(TEXTS), _tolerance(artifact, "text"))


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete", "vocab"])
def test_changed_files_are_refused_before_anything_runs(artifact: Path, tmp_path: Path, damage: str) -> None:
    directory = _copy(artifact, tmp_path)
    target = directory / ("tokenizer/bpe_simple_vocab_16e6.txt.gz" if damage == "vocab" else "text.onnx")
    data = bytearray(target.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x01  # still a loadable graph: only the hash can tell
        target.write_bytes(bytes(data))
    elif damage == "truncate":
        target.write_bytes(bytes(data[: len(data) // 3]))  # ORT would fail to parse it; the hash check comes first
    elif damage == "vocab":
        target.write_bytes(bytes(data[:-10]))
    else:
        target.unlink()
    expected = "is missing" if damage == "delete" else "does not match its sha256"
    with pytest.raises(ArtifactError, match=expected):
        load(directory)


def test_not_an_artifact(tmp_path: Path, artifact: Path) -> None:
    with pytest.raises(ArtifactError, match="not a directory"):
        load(tmp_path / "nothing")
    with pytest.raises(ArtifactError, match="no manifest.json"):
        load(tmp_path)
    directory = _copy(artifact, tmp_path)
    _rewrite_manifest(directory, lambda m: m.update(parity_accepted_by_user=True))
    with pytest.warns(RuntimeWarning, match="accept-parity-failure"):
        load(directory)
    _rewrite_manifest(directory, lambda m: m.update(format_version=99))
    with pytest.raises(ArtifactError, match="format_version 99"):
        load(directory)


# -- embeddings vs open_clip -------------------------------------------------------------------

def test_preprocess_and_tokenize_equal_open_clip(rt: Runtime, reference) -> None:
    _, preprocess_val, tokenizer = reference
    images = _images(6, seed=1)
    expected = np.stack([preprocess_val(im).numpy() for im in images])
    assert np.abs(rt.preprocess(images) - expected).max() <= 1e-6
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TextTruncatedWarning)
        assert np.array_equal(rt.tokenize(TEXTS), tokenizer(TEXTS).numpy())


def test_encode_image_and_text_equal_open_clip(rt: Runtime, reference, artifact: Path) -> None:
    model, preprocess_val, tokenizer = reference
    images = _images(7, seed=2)
    with torch.no_grad():
        ref_img = model.encode_image(torch.stack([preprocess_val(im) for im in images]), normalize=True).numpy()
        ref_txt = model.encode_text(tokenizer(TEXTS), normalize=True).numpy()
        raw_txt = model.encode_text(tokenizer(TEXTS), normalize=False).numpy()
    _check_parity(rt.encode_image(images), ref_img, _tolerance(artifact, "image"))
    with pytest.warns(TextTruncatedWarning):
        got = rt.encode_text(TEXTS)
    _check_parity(got, ref_txt, _tolerance(artifact, "text"))
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TextTruncatedWarning)
        _check_parity(rt.encode_text(TEXTS, normalize=False), raw_txt, _tolerance(artifact, "text"))
        # batch size does not change the numbers
        assert np.abs(rt.encode_text(TEXTS, batch_size=2) - got).max() <= 1e-6
    assert np.abs(rt.encode_image(images, batch_size=3) - rt.encode_image(images)).max() <= 1e-6


def test_classify_matches_open_clip_zero_shot(rt: Runtime, reference) -> None:
    from open_clip.zero_shot_classifier import build_zero_shot_classifier

    model, preprocess_val, tokenizer = reference
    labels = ["dog", "cat", "diagram", "pizza"]
    templates = ["a photo of a {}.", "a drawing of a {}.", "itap of my {}."]
    images = _images(4, seed=3)
    with torch.no_grad():
        weights = build_zero_shot_classifier(model, tokenizer, labels, templates)
        feats = model.encode_image(torch.stack([preprocess_val(im) for im in images]), normalize=True)
        # the model's own (exp'd) logit scale, which the build records in the manifest
        scale = model.logit_scale.exp().item()
        expected = (scale * feats @ weights).softmax(dim=-1).numpy()
    assert rt.manifest["logit_scale"] == pytest.approx(scale)
    probs = rt.classify(images, labels, templates)
    assert probs.shape == (4, 4) and probs.dtype == np.float32
    assert np.allclose(probs.sum(1), 1.0, atol=1e-5)
    assert np.abs(probs - expected).max() <= 1e-4
    # default template, callables, and a custom scale
    assert np.abs(rt.classify(images, labels) - rt.classify(images, labels, ["a photo of a {}."])).max() == 0
    assert np.abs(rt.classify(images, labels, [lambda c: f"a photo of a {c}."]) -
                  rt.classify(images, labels)).max() == 0
    flat = rt.classify(images, labels, logit_scale=0.0)
    assert np.allclose(flat, 0.25)
    with pytest.raises(InputError, match="at least one label"):
        rt.classify(images, [])
    with pytest.raises(InputError, match="template"):
        rt.classify(images, labels, ["a {0} and {1}"])


# -- batching, shapes, bad input ---------------------------------------------------------------

def test_empty_inputs_give_empty_outputs(rt: Runtime) -> None:
    assert rt.encode_image([]).shape == (0, 24)
    assert rt.encode_text([]).shape == (0, 24)
    assert rt.preprocess([]).shape == (0, 3, 32, 32)
    assert rt.classify([], ["a", "b"]).shape == (0, 2)


def test_single_items_and_mixed_inputs(rt: Runtime, tmp_path: Path) -> None:
    image = _images(1, seed=4)[0]
    path = tmp_path / "x.png"
    image.save(path)
    one = rt.encode_image(image)
    assert one.shape == (1, 24)
    mixed = rt.encode_image([image, path, str(path), path.read_bytes(), np.asarray(image)])
    assert np.abs(mixed - one).max() <= 1e-6
    assert np.abs(rt.encode_text("a dog") - rt.encode_text(["a dog"])).max() == 0


def test_bad_inputs_raise_clipexport_errors(rt: Runtime, tmp_path: Path) -> None:
    not_image = tmp_path / "a.txt"
    not_image.write_text("hello")
    cases = [
        (lambda: rt.encode_image([not_image]), InputError, "not an image"),
        (lambda: rt.encode_image([np.zeros((8, 8, 3), np.float64)]), InputError, "uint8"),
        (lambda: rt.encode_image(np.zeros((2, 8, 8, 3), np.uint8)), InputError, "shape"),
        (lambda: rt.encode_image(5), InputError, "expected an image"),
        (lambda: rt.encode_text(["ok", 5]), InputError, "text 1"),
        (lambda: rt.encode_text(None), InputError, "texts"),
        (lambda: rt.encode_pixels(np.zeros((1, 3, 32, 32), np.float64)), InputError, "float32"),
        (lambda: rt.encode_pixels(np.zeros((1, 3, 31, 32), np.float32)), InputError, "shape"),
        (lambda: rt.encode_tokens(np.zeros((1, 77), np.float32)), InputError, "integer"),
        (lambda: rt.encode_tokens(np.zeros((1, 76), np.int64)), InputError, "shape"),
        (lambda: rt.encode_tokens(np.full((1, 77), 49408, np.int64)), InputError, "0..49407"),
        (lambda: rt.encode_text(["a"], batch_size=0), UsageError, "batch_size"),
        (lambda: rt.encode_text(["a"], batch_size=65), UsageError, "up to 64"),
        (lambda: rt.encode_text(["a"], batch_size=2.5), UsageError, "batch_size"),
    ]
    for call, error, match in cases:
        with pytest.raises(error, match=match):
            call()
        assert issubclass(error, ClipExportError)


def test_batch_min_pads_small_batches(artifact: Path, tmp_path: Path, rt: Runtime) -> None:
    directory = _copy(artifact, tmp_path)
    _rewrite_manifest(directory, lambda m: m["batch"].update(min=4))  # the manifest is not hashed
    padded = load(directory)
    images = _images(5, seed=5)
    assert np.abs(padded.encode_image(images, batch_size=4) - rt.encode_image(images)).max() <= 1e-6


def test_text_only_artifact(tmp_path_factory: pytest.TempPathFactory) -> None:
    directory = _build(tmp_path_factory, "text-only", towers=("text",))
    text_only = load(directory)
    assert text_only.towers == ("text",)
    assert text_only.encode_text(["a"]).shape == (1, 24)
    with pytest.raises(UsageError, match="no image tower"):
        text_only.encode_image(_images(1))


# -- exact EOT trimming --------------------------------------------------------------------------

class _ShortTextTower(torch.nn.Module):
    """open_clip's encode_text for ids of any length L <= context: positions and causal mask cut to L."""

    def __init__(self, clip) -> None:
        super().__init__()
        self.clip = clip
        self.eval()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        c = self.clip
        length = ids.shape[1]
        x = c.token_embedding(ids) + c.positional_embedding[:length]
        x = c.ln_final(c.transformer(x, attn_mask=c.attn_mask[:length, :length]))
        x = x[torch.arange(x.shape[0]), ids.argmax(dim=-1)]
        return x @ c.text_projection


@pytest.fixture(scope="module")
def trimmable_artifact(artifact: Path, reference, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The twin artifact with text.onnx replaced by an export whose sequence axis is dynamic."""
    from clipexport.hashing import file_sha256

    model, _, tokenizer = reference
    directory = tmp_path_factory.mktemp("trim") / "vit"
    shutil.copytree(artifact, directory)
    example = tokenizer(["a photo of a dog", "a diagram"])
    dims = {0: torch.export.Dim("batch", min=1, max=64), 1: torch.export.Dim("sequence", min=2, max=77)}
    previous = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad():
            program = torch.onnx.export(_ShortTextTower(model), (example,), dynamo=True, verbose=False,
                                        input_names=["input_ids"], output_names=["text_embeds"],
                                        dynamic_shapes=({0: dims[0], 1: dims[1]},))
    finally:
        torch.backends.mha.set_fastpath_enabled(previous)
    program.save(str(directory / "text.onnx"))
    digest = file_sha256(directory / "text.onnx")

    def edit(m: dict) -> None:
        m["towers"]["text"]["inputs"][0]["shape"] = ["batch", "sequence"]
        m["towers"]["text"]["sha256"] = digest
        m["files"]["text.onnx"] = digest

    _rewrite_manifest(directory, edit)
    return directory


def test_trimmed_text_batches_equal_full_context(trimmable_artifact: Path, reference, tmp_path: Path) -> None:
    trim = load(trimmable_artifact)
    assert trim.trims_text is True
    # The same graph, with trimming not allowed by the manifest: the runtime then feeds all 77 columns.
    static_dir = _copy(trimmable_artifact, tmp_path)
    _rewrite_manifest(static_dir, lambda m: m["towers"]["text"].update(
        sequence={"axis": None, "length": 77, "trim": None, "reason": "test"}))
    full_rt = load(static_dir)
    assert full_rt.trims_text is False
    seen: list[tuple[int, int]] = []
    backend = trim._backend
    original_run = backend.run

    def recording_run(tower: str, batch: np.ndarray) -> np.ndarray:
        if tower == "text":
            seen.append(batch.shape)
        return original_run(tower, batch)

    backend.run = recording_run  # type: ignore[method-assign]
    texts = ["a dog", "a photo of a cat on a red sofa in the sun", "x", "a diagram of a cell",
             "tom &amp; jerry", "", "a very long caption " * 30]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TextTruncatedWarning)
        got = trim.encode_text(texts, batch_size=2)
        full = full_rt.encode_text(texts, batch_size=2)
        ids = trim.tokenize(texts)
        model, _, tokenizer = reference
        with torch.no_grad():
            expected = model.encode_text(tokenizer(texts), normalize=True).numpy()
    assert np.abs(got - full).max() <= 1e-5
    assert np.abs(got - expected).max() <= 1e-5
    # Expected widths, from the EOT positions: rows sorted by length, batches of 2, each cut to its longest.
    eot = np.argmax(ids == 49407, axis=1) + 1
    ordered = np.sort(eot, kind="stable")
    expected = [int(ordered[i:i + 2].max()) for i in range(0, len(ordered), 2)]
    assert [w for _, w in seen] == expected
    assert expected[0] < 77 and expected[-1] == 77


# -- threads and memory --------------------------------------------------------------------------

def test_eight_threads_give_the_serial_embeddings(rt: Runtime) -> None:
    work = [(_images(3, seed=10 + i), [f"a photo of thing number {i}", TEXTS[i % 4], f"{i} cats"])
            for i in range(8)]
    serial = [(rt.encode_image(images), rt.encode_text(texts)) for images, texts in work]
    results: list[list[tuple[np.ndarray, np.ndarray]]] = [[] for _ in work]
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(work))

    def worker(i: int) -> None:
        try:
            barrier.wait()
            for _ in range(25):
                images, texts = work[i]
                results[i].append((rt.encode_image(images), rt.encode_text(texts)))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(work))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    worst = max(float(np.abs(a - serial[i][0]).max()) + float(np.abs(b - serial[i][1]).max())
                for i in range(len(work)) for a, b in results[i])
    assert all(len(r) == 25 for r in results)
    print(f"8 threads x 25 rounds: worst max abs diff vs serial {worst:.3g}")
    assert worst <= 1e-6, worst


def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS in /proc/self/status")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc for RSS")
def test_memory_stays_flat_over_many_calls(rt: Runtime) -> None:
    image = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)

    def calls(n: int, offset: int) -> None:
        for i in range(n):
            if i % 2:
                rt.encode_image([image])
            else:
                rt.encode_text([f"a photo of item {offset + i}"])

    calls(200, 0)  # warm up: ONNX Runtime's arenas and caches settle first
    gc.collect()
    before = _rss_kib()
    calls(2000, 1000)
    gc.collect()
    growth_mib = (_rss_kib() - before) / 1024
    print(f"RSS growth over 2000 calls: {growth_mib:.2f} MiB")
    assert growth_mib < 16, f"RSS grew {growth_mib:.1f} MiB over 2000 calls"


# -- the embed command ---------------------------------------------------------------------------

def test_embed_command(artifact: Path, rt: Runtime, tmp_path: Path) -> None:
    from clipexport.cli import cli

    images = _images(3, seed=6)
    folder = tmp_path / "photos"
    folder.mkdir()
    for i, image in enumerate(images):
        image.save(folder / f"{i}.png")
    (folder / "notes.txt").write_text("skipped: not an image suffix")
    runner = CliRunner()

    result = runner.invoke(cli, ["embed", str(artifact), "--images", str(folder), "-t", "a dog", "-t", "a cat",
                                 "--out", str(tmp_path / "both.npz")])
    assert result.exit_code == 0, result.output
    assert "onnxruntime on cpu" in result.output
    data = np.load(tmp_path / "both.npz")
    assert np.abs(data["image"] - rt.encode_image(images)).max() <= 1e-6
    assert np.abs(data["text"] - rt.encode_text(["a dog", "a cat"])).max() <= 1e-6
    assert [Path(p).name for p in data["image_paths"]] == ["0.png", "1.png", "2.png"]
    assert list(data["texts"]) == ["a dog", "a cat"]

    texts_file = tmp_path / "texts.txt"
    texts_file.write_text("a dog\n\na cat\n", encoding="utf-8")
    result = runner.invoke(cli, ["embed", str(artifact), "--texts-file", str(texts_file), "--no-normalize",
                                 "--out", str(tmp_path / "t.npy")])
    assert result.exit_code == 0, result.output
    assert np.abs(np.load(tmp_path / "t.npy") - rt.encode_text(["a dog", "a cat"], normalize=False)).max() <= 1e-6

    for args, message in [
        (["-i", str(folder / "0.png"), "-t", "x", "--out", str(tmp_path / "x.npy")], "written as .npz"),
        (["--out", str(tmp_path / "x.npy")], "nothing to embed"),
        (["-t", "x", "--out", str(tmp_path / "x.csv")], ".npy"),
        (["-i", str(folder / "notes.txt"), "--out", str(tmp_path / "x.npy")], "not an image"),
        (["-t", "x", "--backend", "tensorrt", "--out", str(tmp_path / "x.npy")], "TensorRT"),
    ]:
        result = runner.invoke(cli, ["embed", str(artifact), *args])
        assert result.exit_code == 1 and message in result.output, (args, result.output)
        assert "Traceback" not in result.output
    assert not (tmp_path / "x.npy").exists()


# -- torch-free --------------------------------------------------------------------------------

TORCH_FREE_SCRIPT = """
import sys, importlib.abc
BLOCKED = ('torch', 'torchvision', 'open_clip')
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in BLOCKED:
            raise ImportError(f'{name} is blocked in this test')
# A finder sees only modules not imported yet: the premise is that nothing imported torch before it.
assert not [m for m in sys.modules if m.split('.')[0] in BLOCKED], 'torch was imported before the blocker'
sys.meta_path.insert(0, Block())
try:
    import torch
except ImportError:
    pass
else:
    raise AssertionError('the blocker let torch through')
import numpy as np
from PIL import Image
import clipexport
rt = clipexport.load(sys.argv[1])
rng = np.random.default_rng(0)
images = [Image.fromarray(rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)) for _ in range(3)]
np.save(sys.argv[2], np.concatenate([rt.encode_image(images), rt.encode_text(['a dog', 'a cat'])]))
print(rt.backend, rt.device, sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'open_clip')))
"""


def test_runtime_needs_no_torch(artifact: Path, rt: Runtime, tmp_path: Path) -> None:
    out = tmp_path / "emb.npy"
    env = {**os.environ, "PYTHONPATH": str(Path(clipexport.__file__).parents[1])}
    proc = subprocess.run([sys.executable, "-c", TORCH_FREE_SCRIPT, str(artifact), str(out)],
                          capture_output=True, text=True, env=env, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "onnxruntime cpu []"
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)) for _ in range(3)]
    expected = np.concatenate([rt.encode_image(images), rt.encode_text(["a dog", "a cat"])])
    assert np.abs(np.load(out) - expected).max() <= 1e-6


def test_import_clipexport_stays_light() -> None:
    code = ("import sys, clipexport; heavy = [m for m in ('torch', 'onnxruntime', 'numpy', 'PIL') "
            "if m in sys.modules]; print(heavy)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False,
                          env={**os.environ, "PYTHONPATH": str(Path(clipexport.__file__).parents[1])})
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr
