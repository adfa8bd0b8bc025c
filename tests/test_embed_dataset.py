"""`clipexport embed-dataset` on a local Ray cluster: exactly-once rows, errors table, parity with the
single-process Runtime, manifest hash, Parquet text input, --resume, float16, the CLI, bad input."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from twins import write_twin

from clipexport.errors import BackendUnavailableError, ClipExportError, UsageError

ray = pytest.importorskip("ray")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

from clipexport.distributed import EmbedDatasetOptions, embed_dataset  # noqa: E402
from clipexport.distributed import writer  # noqa: E402
from clipexport.distributed.inputs import plan_inputs  # noqa: E402
from clipexport.distributed.job import _flush  # noqa: E402
from clipexport.progress import Progress  # noqa: E402
from clipexport.runtime import load  # noqa: E402

N_IMAGES = 300
SHARD = 64  # 301 inputs -> 5 shards, the last one short


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from clipexport.build import BuildOptions, build

    model = write_twin("vit", tmp_path_factory.mktemp("twin"))
    return build(BuildOptions(model=model, pretrained="none", out=tmp_path_factory.mktemp("a") / "vit")).out_dir


@pytest.fixture(scope="module")
def cluster():
    """One local Ray for the module: starting one takes seconds. embed_dataset uses it as it is."""
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")  # if pytest runs under `uv run`
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str], str]:
    """N_IMAGES small PNG/JPEG files of varied sizes and modes, plus one corrupt .jpg."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    paths = []
    for i in range(N_IMAGES):
        h, w = 8 + (i * 7) % 57, 8 + (i * 11) % 61
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        img = Image.fromarray(pixels).convert("L" if i % 10 == 0 else "RGB")
        path = root / ("sub" if i % 3 == 0 else "") / f"img{i:04d}.{'png' if i % 2 else 'jpg'}"
        path.parent.mkdir(exist_ok=True)
        img.save(path)
        paths.append(str(path.absolute()))
    corrupt = root / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 this is not really a JPEG")
    return root, sorted(paths), str(corrupt.absolute())


def _opts(artifact: Path, input: str, out: Path, **kw) -> EmbedDatasetOptions:
    kw.setdefault("shard_size", SHARD)
    kw.setdefault("actors", 2)
    kw.setdefault("cpus_per_actor", 0.5)  # leave Ray room on a 2-core machine
    return EmbedDatasetOptions(artifact=artifact, input=input, out_dir=out, **kw)


def _read(out: Path) -> tuple[pa.Table, pa.Table | None]:
    shards = sorted(out.glob("part-*.parquet"))
    table = pa.concat_tables([pq.read_table(p) for p in shards])
    errs = sorted((out / "errors").glob("part-*.parquet"))
    return table, (pa.concat_tables([pq.read_table(p) for p in errs]) if errs else None)


@pytest.fixture(scope="module")
def image_run(cluster, artifact, images, tmp_path_factory):
    root, _, _ = images
    out = tmp_path_factory.mktemp("run") / "emb"
    result = embed_dataset(_opts(artifact, str(root), out), Progress(quiet=True))
    return out, result


def test_images_exactly_once_errors_and_parity(artifact, images, image_run):
    _, paths, corrupt = images
    out, result = image_run
    assert (result.rows, result.embedded, result.errors, result.shards) == (N_IMAGES + 1, N_IMAGES, 1, 5)
    table, errs = _read(out)
    ids = table.column("id").to_pylist()
    assert len(ids) == N_IMAGES and len(set(ids)) == N_IMAGES
    assert set(ids) == set(paths)
    assert ids == sorted(ids)  # input order kept across shards
    assert errs is not None and errs.column("id").to_pylist() == [corrupt]
    reason = errs.column("reason")[0].as_py()
    assert "corrupt.jpg" in reason and "cannot read" in reason  # the runtime's InputError, verbatim

    emb = np.stack(table.column("embedding").to_numpy(zero_copy_only=False)).astype(np.float32)
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), emb.shape[1])
    expected = load(artifact).encode_image(ids, batch_size=32)
    assert emb.shape == expected.shape == (N_IMAGES, 24)
    assert float(np.abs(emb - expected).max()) < 1e-5
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)

    manifest_hash = hashlib.sha256((artifact / "manifest.json").read_bytes()).hexdigest()
    for shard in sorted(out.glob("part-*.parquet")):
        meta = pq.read_metadata(shard).metadata
        assert meta[b"clipexport.manifest_sha256"].decode() == manifest_hash
    success = json.loads((out / "_SUCCESS").read_text())
    assert (success["rows"], success["embedded"], success["errors"]) == (N_IMAGES + 1, N_IMAGES, 1)
    assert success["manifest_sha256"] == manifest_hash


def test_resume_rewrites_only_the_missing_shard(cluster, artifact, images, image_run, tmp_path):
    root, paths, _ = images
    out = tmp_path / "emb"
    shutil.copytree(image_run[0], out)
    old = 1_000_000_000
    for p in out.rglob("part-*.parquet"):
        os.utime(p, ns=(old, old))  # a rewrite cannot then hide inside the clock's resolution
    (out / "part-00002.parquet").unlink()
    with pytest.raises(UsageError, match="--resume"):
        embed_dataset(_opts(artifact, str(root), out), Progress(quiet=True))

    result = embed_dataset(_opts(artifact, str(root), out, resume=True), Progress(quiet=True))
    assert (result.shards_written, result.shards_skipped) == (1, 4)
    assert (result.embedded, result.errors) == (N_IMAGES, 1)
    mtimes = {p.relative_to(out).as_posix(): p.stat().st_mtime_ns for p in out.rglob("part-*.parquet")}
    assert mtimes.pop("part-00002.parquet") != old
    assert set(mtimes.values()) == {old}  # untouched, the errors file of shard 0 included
    table, _ = _read(out)
    assert sorted(table.column("id").to_pylist()) == paths

    # a shard made with other settings does not count as done
    meta = writer.read_shard_metadata(out / "part-00000.parquet")
    assert meta["dtype"] == "float32"
    again = embed_dataset(_opts(artifact, str(root), out, resume=True), Progress(quiet=True))
    assert (again.shards_written, again.shards_skipped) == (0, 5)


def test_text_parquet_ids_and_nulls(cluster, artifact, tmp_path, monkeypatch):
    from clipexport.distributed import job

    monkeypatch.setattr(job, "PARQUET_CHUNK_ROWS", 16)  # work items of 16 rows: some cross the file boundary
    texts = [f"a photo of {i} red cars" if i % 5 else f"a drawing {i}" for i in range(150)]
    texts[17] = None
    # two files, so shards straddle a file boundary; ids are ints and not in sorted order
    ids = [1000 - 3 * i for i in range(150)]
    pq.write_table(pa.table({"id": ids[:70], "caption": texts[:70]}), tmp_path / "a.parquet", row_group_size=16)
    pq.write_table(pa.table({"id": ids[70:], "caption": texts[70:]}), tmp_path / "b.parquet", row_group_size=16)
    out = tmp_path / "emb"
    result = embed_dataset(_opts(artifact, str(tmp_path / "*.parquet"), out, tower="text", text_column="caption",
                                 shard_size=50, batch_size=8), Progress(quiet=True))
    assert (result.rows, result.embedded, result.errors, result.shards) == (150, 149, 1, 3)
    table, errs = _read(out)
    assert table.column("id").to_pylist() == [x for i, x in enumerate(ids) if i != 17]
    assert errs is not None and errs.column("id").to_pylist() == [ids[17]]
    emb = np.stack(table.column("embedding").to_numpy(zero_copy_only=False))
    expected = load(artifact).encode_text([t for t in texts if t is not None])
    assert float(np.abs(emb - expected).max()) < 1e-5


def test_cli_parquet_image_bytes_float16(cluster, artifact, images, tmp_path):
    from clipexport.cli import cli

    _, paths, corrupt = images
    chosen = paths[:40] + [corrupt]
    data = [Path(p).read_bytes() for p in chosen]
    # the Hugging Face datasets layout: an image struct {bytes, path}
    images_col = pa.array([{"bytes": b, "path": None} for b in data],
                          pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    pq.write_table(pa.table({"key": [f"k{i}" for i in range(len(chosen))], "jpg": images_col}), tmp_path / "in.parquet")
    out = tmp_path / "emb"
    result = CliRunner().invoke(cli, ["embed-dataset", str(artifact), "--input", str(tmp_path / "in.parquet"),
                                      "--output", str(out), "--image-column", "jpg", "--id-column", "key",
                                      "--dtype", "float16", "--actors", "1", "--shard-size", "16"])
    assert result.exit_code == 0, result.output
    assert "40 embeddings, 1 errors, 3 shards" in result.output
    table, errs = _read(out)
    assert table.schema.field("embedding").type == pa.list_(pa.float16(), 24)
    assert table.column("id").to_pylist() == [f"k{i}" for i in range(40)]
    assert errs is not None and errs.column("id").to_pylist() == ["k40"]
    emb = np.stack(table.column("embedding").to_numpy(zero_copy_only=False))
    assert emb.dtype == np.float16
    expected = load(artifact).encode_image(data[:40])
    assert float(np.abs(emb.astype(np.float32) - expected).max()) < 2e-3  # float16 rounding of unit vectors


def test_bad_input_is_a_clear_error(artifact, images, tmp_path, monkeypatch):
    root, _, _ = images
    with pytest.raises(UsageError, match="no files match"):
        embed_dataset(_opts(artifact, str(tmp_path / "nothing-*.jpg"), tmp_path / "o"))
    pq.write_table(pa.table({"id": [1], "txt": ["x"]}), tmp_path / "t.parquet")
    with pytest.raises(UsageError, match="no column 'text'.*--text-column"):
        embed_dataset(_opts(artifact, str(tmp_path / "t.parquet"), tmp_path / "o", tower="text"))
    with pytest.raises(UsageError, match="no column 'image'"):
        embed_dataset(_opts(artifact, str(tmp_path / "t.parquet"), tmp_path / "o"))
    with pytest.raises(UsageError, match="image files can only go through the image tower"):
        embed_dataset(_opts(artifact, str(root), tmp_path / "o", tower="text"))
    with pytest.raises(UsageError, match="batches up to"):
        embed_dataset(_opts(artifact, str(root), tmp_path / "o", batch_size=10_000))

    image_only = tmp_path / "image-only"
    shutil.copytree(artifact, image_only)
    manifest = json.loads((image_only / "manifest.json").read_text())
    del manifest["towers"]["text"]
    (image_only / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UsageError, match="has no text tower"):
        embed_dataset(_opts(image_only, str(tmp_path / "t.parquet"), tmp_path / "o", tower="text",
                            text_column="txt"))

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    with pytest.raises(BackendUnavailableError, match=r"pip install 'clipexport\[ray\]'"):
        embed_dataset(_opts(artifact, str(root), tmp_path / "o"))
    result = CliRunner().invoke(__import__("clipexport.cli").cli.cli,
                                ["embed-dataset", str(artifact), "--input", str(tmp_path / "none*.png"),
                                 "--output", str(tmp_path / "o")])
    assert result.exit_code == 1 and "error: --input" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "o").exists()  # nothing written before the checks pass


def test_shards_are_deterministic(images, tmp_path):
    root, paths, corrupt = images
    a = plan_inputs(str(root), "image", SHARD)
    b = plan_inputs(str(root / "**" / "*.*"), "image", SHARD)
    assert [s.fingerprint for s in a.shards] == [s.fingerprint for s in b.shards]
    assert [s.rows for s in a.shards] == [64, 64, 64, 64, 45]
    assert [p for s in a.shards for p in s.paths] == sorted(paths + [corrupt])
    # one more file at the end changes only the last shard
    extra = root / "zzz.png"
    Image.new("RGB", (9, 9)).save(extra)
    try:
        c = plan_inputs(str(root), "image", SHARD)
    finally:
        extra.unlink()
    assert [s.fingerprint for s in c.shards[:4]] == [s.fingerprint for s in a.shards[:4]]
    assert c.shards[4].fingerprint != a.shards[4].fingerprint and c.shards[4].rows == 46


def test_duplicate_rows_are_written_once(tmp_path):
    """A retried Ray task may deliver rows twice: the shard keeps one row per position."""
    emb = np.eye(4, 3, dtype=np.float32)
    part = {"pos": np.array([0, 1, 2, 3]), "id": np.array(["a", "b", "c", "d"], dtype=object), "embedding": emb,
            "error": np.array(["", "", "bad", ""], dtype=object)}
    dup = {k: v[[1, 3]] for k, v in part.items()}
    identity = {"manifest_sha256": "h", "tower": "image", "dtype": "float32", "normalize": True,
                "inputs_sha256": "f", "shard": 0, "rows": 4}
    assert _flush(tmp_path, 0, {0: [dup, {k: v[:2] for k, v in part.items()}]}, 4, identity, writer) is None
    path = _flush(tmp_path, 0, {0: [part, dup]}, 4, identity, writer)
    assert path is not None and pq.read_table(path).column("id").to_pylist() == ["a", "b", "d"]
    assert writer.shard_is_complete(tmp_path, 0, identity)
    assert not writer.shard_is_complete(tmp_path, 0, {**identity, "dtype": "float16"})
