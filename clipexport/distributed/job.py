"""`embed_dataset`: plan the shards, run the Ray Data pipeline, write each shard once.

    plan (driver)          Ray Data                                         driver
    sorted inputs ──► pending shards ──► expand (tasks) ──► Embedder (actor pool, ──► collect rows per shard,
    fixed shards      (--resume skips       read rows         one Runtime each)       write when complete
                       complete ones)

The driver writes: it is the one place that knows when a shard has all its rows, so a
shard file can only appear whole, once, with rows deduplicated by position (a retried Ray
task cannot add a duplicate). Output order is preserved, so the driver holds about one
shard in memory at a time.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clipexport.errors import BackendUnavailableError, UsageError
from clipexport.distributed.inputs import RAY_EXTRA_HINT, InputPlan, plan_inputs
from clipexport.hashing import file_sha256
from clipexport.manifest import Manifest
from clipexport.progress import Progress

DTYPES = ("float32", "float16")
DEFAULT_SHARD_SIZE = 1000
PARQUET_CHUNK_ROWS = 256


@dataclass(frozen=True)
class EmbedDatasetOptions:
    """Everything `clipexport embed-dataset` takes.

    artifact:       an artifact directory written by `clipexport build`
    input:          a file, a directory or a glob of image files or Parquet files
    out_dir:        where part-NNNNN.parquet shards, errors/ and _SUCCESS go
    tower:          "image" or "text" (text: Parquet with a text column)
    batch_size:     rows per actor call (and per tower run); at most the artifact's verified batch max
    actors:         size of the actor pool; each actor loads one Runtime
    gpus_per_actor: GPUs Ray reserves per actor (0: CPU); fractions share a GPU
    cpus_per_actor: CPUs Ray reserves per actor
    address:        "local" (start Ray here, `num_cpus` CPUs), "auto" (join the running cluster) or a Ray address
    dtype:          "float32" or "float16" embeddings
    shard_size:     input rows per output shard; keep it fixed across runs for --resume to reuse shards
    resume:         keep shards already complete for these inputs and this artifact; write the rest
    force:          delete this command's earlier outputs in out_dir first
    """

    artifact: Path
    input: str
    out_dir: Path
    tower: str = "image"
    batch_size: int = 32
    actors: int = 1
    gpus_per_actor: float = 0.0
    cpus_per_actor: float = 1.0
    address: str = "local"
    num_cpus: int | None = None
    dtype: str = "float32"
    normalize: bool = True
    shard_size: int = DEFAULT_SHARD_SIZE
    id_column: str | None = None
    image_column: str | None = None
    text_column: str | None = None
    backend: str = "auto"
    device: str | None = None
    resume: bool = False
    force: bool = False


@dataclass
class EmbedDatasetResult:
    out_dir: Path
    rows: int  # input rows
    embedded: int  # rows in the shards
    errors: int  # rows in errors/
    shards: int
    shards_written: int
    shards_skipped: int
    seconds: float
    manifest_sha256: str
    rows_run: int = 0  # input rows of the shards this run wrote
    written: list[Path] = field(default_factory=list)

    @property
    def items_per_s(self) -> float:
        """Input rows this run embedded per second, start-up included (skipped shards not counted)."""
        return self.rows_run / self.seconds if self.seconds > 0 else 0.0


def manifest_sha256(artifact: Path) -> str:
    """The sha256 of the artifact's manifest.json: it names every file's sha256, so it names the artifact."""
    from clipexport.manifest import MANIFEST

    return file_sha256(Path(artifact) / MANIFEST)


def check_options(options: EmbedDatasetOptions) -> Manifest:
    """Validate options against the artifact before Ray starts; returns the manifest."""
    from clipexport.manifest import open_artifact, read_manifest

    if options.tower not in ("image", "text"):
        raise UsageError(f"--tower {options.tower!r}: expected image or text")
    if options.dtype not in DTYPES:
        raise UsageError(f"--dtype {options.dtype!r}: expected one of {', '.join(DTYPES)}")
    for name in ("batch_size", "actors", "shard_size"):
        value = getattr(options, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UsageError(f"--{name.replace('_', '-')} {value!r}: expected a positive integer")
    if options.gpus_per_actor < 0 or options.cpus_per_actor < 0:
        raise UsageError("--gpus-per-actor and --cpus-per-actor cannot be negative")
    if options.resume and options.force:
        raise UsageError("--resume keeps finished shards and --force deletes them: give one")
    manifest = read_manifest(options.artifact)
    if options.tower not in manifest.towers:
        raise UsageError(f"{options.artifact} has no {options.tower} tower (it has: "
                         f"{', '.join(manifest.towers)}); rebuild with --towers image,text")
    manifest = open_artifact(options.artifact)  # files and graphs checked here, not in every actor
    batch_max = manifest.batch.max
    if options.batch_size > batch_max:
        raise UsageError(f"--batch-size {options.batch_size}: {options.artifact} was built and verified for "
                         f"batches up to {batch_max} (rebuild with --batch MIN:OPT:MAX to go higher)")
    return manifest


def import_ray() -> Any:
    try:
        import ray
        import ray.data  # noqa: F401 - the [data] extra
        import pyarrow  # noqa: F401
    except ImportError as exc:
        raise BackendUnavailableError(f"embed-dataset runs on Ray Data, which is not installed ({exc.name}): "
                                      f"{RAY_EXTRA_HINT}") from None
    return ray


def embed_dataset(options: EmbedDatasetOptions, progress: Progress | None = None) -> EmbedDatasetResult:
    """Embed every row of the input into Parquet shards under options.out_dir (see EmbedDatasetOptions).

    Uses the Ray instance this process is already connected to, if any; else connects or
    starts one per options.address and shuts it down at the end.
    """
    progress = progress or Progress()
    start = time.perf_counter()
    check_options(options)
    plan = plan_inputs(options.input, options.tower, options.shard_size, options.id_column,
                       options.image_column, options.text_column)
    ray = import_ray()
    from clipexport.distributed import writer

    digest = manifest_sha256(options.artifact)
    out_dir = Path(options.out_dir)
    _prepare_out_dir(out_dir, options, writer)
    identities = {s.index: _identity(digest, options, s.fingerprint, s.index, s.rows) for s in plan.shards}
    done = {s.index for s in plan.shards if options.resume and writer.shard_is_complete(out_dir, s.index,
                                                                                      identities[s.index])}
    pending = [s for s in plan.shards if s.index not in done]
    if options.resume:
        _drop_stale_shards(out_dir, len(plan.shards), writer, progress)
    progress.say(f"embed-dataset: {plan.total_rows} rows ({plan.source.kind}: {len(plan.files)} files) in "
                 f"{len(plan.shards)} shards of up to {options.shard_size}; {len(done)} complete, "
                 f"{len(pending)} to write; tower {options.tower}, {options.actors} actor(s), {options.dtype}")

    written: list[Path] = []
    started_ray = False
    if pending:
        if not ray.is_initialized():
            _init_ray(ray, options)
            started_ray = True
        try:
            written = _run_pipeline(ray, plan, pending, identities, options, out_dir, writer, progress)
        finally:
            if started_ray:
                ray.shutdown()

    embedded = errors = 0
    for s in plan.shards:
        if not writer.shard_is_complete(out_dir, s.index, identities[s.index]):
            raise BackendUnavailableError(f"shard {s.index} is incomplete after the run; run again with --resume")
        meta = writer.read_shard_metadata(writer.shard_path(out_dir, s.index))
        embedded += int(meta["embedded"])
        errors += int(meta["errors"])
    seconds = time.perf_counter() - start
    result = EmbedDatasetResult(out_dir, plan.total_rows, embedded, errors, len(plan.shards), len(pending),
                                len(done), seconds, digest, sum(s.rows for s in pending), written)
    writer.write_success(out_dir, {"rows": plan.total_rows, "embedded": embedded, "errors": errors,
                                   "shards": len(plan.shards), "manifest_sha256": digest, "tower": options.tower,
                                   "dtype": options.dtype, "normalize": options.normalize,
                                   "inputs_sha256": plan.inputs_fingerprint, "artifact": str(options.artifact),
                                   "input": options.input})
    return result


def _identity(digest: str, options: EmbedDatasetOptions, fingerprint: str, index: int, rows: int) -> dict[str, Any]:
    return {"manifest_sha256": digest, "tower": options.tower, "dtype": options.dtype,
            "normalize": options.normalize, "inputs_sha256": fingerprint, "shard": index, "rows": rows}


def _prepare_out_dir(out_dir: Path, options: EmbedDatasetOptions, writer: Any) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"--output {out_dir} exists and is not a directory")
    existing = writer.existing_outputs(out_dir)
    if existing and not (options.resume or options.force):
        raise UsageError(f"--output {out_dir} already holds {len(existing)} output files; pass --resume to keep "
                         "the complete shards and write the rest, or --force to start over")
    for path in existing:
        # --force deletes everything; --resume only the temporaries and the old _SUCCESS
        if options.force or path.name.startswith(".") or path.name == writer.SUCCESS:
            path.unlink()
    out_dir.mkdir(parents=True, exist_ok=True)


def _drop_stale_shards(out_dir: Path, count: int, writer: Any, progress: Progress) -> None:
    """Shards numbered past the plan (the input shrank) would add rows that are no longer inputs."""
    for path in writer.existing_outputs(out_dir):
        index = writer.shard_index(path)
        if index is not None and index >= count:
            progress.say(f"  removing {path}: shard {index} is past the {count} shards of these inputs")
            path.unlink()


def _init_ray(ray: Any, options: EmbedDatasetOptions) -> None:
    if options.address == "local":
        num_cpus = options.num_cpus or os.cpu_count() or 1
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=True)
        return
    try:
        ray.init(address=options.address)
    except ConnectionError as exc:
        raise BackendUnavailableError(f"--address {options.address}: cannot connect to a Ray cluster ({exc}); "
                                      "start one with `ray start --head`, or use --address local") from None


def _run_pipeline(ray: Any, plan: InputPlan, pending: list[Any], identities: dict[int, dict[str, Any]],
                  options: EmbedDatasetOptions, out_dir: Path, writer: Any, progress: Progress) -> list[Path]:
    import numpy as np

    from clipexport.distributed.actor import Embedder, expand_shard

    source = plan.source
    # Image files: one batch per work item. Parquet: larger items, since each item reads whole row groups.
    chunk = options.batch_size if source.kind == "files" else max(options.batch_size, PARQUET_CHUNK_ROWS)
    items = [item for s in pending for item in s.to_items(chunk)]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    # Reading is light next to embedding. It reserves no CPU: with the actors holding every CPU a
    # reader that asks for any would never be scheduled, and the pool would wait on it forever.
    ds = ds.map_batches(expand_shard, batch_size=1, batch_format="numpy", num_cpus=0, zero_copy_batch=True,
                        compute=ray.data.TaskPoolStrategy(size=min(len(items), max(2, options.actors))),
                        fn_kwargs={"payload": source.payload, "id_column": source.id_column,
                                   "data_column": source.data_column})
    device = options.device or (None if options.gpus_per_actor > 0 else "cpu")
    ds = ds.map_batches(
        Embedder,
        fn_constructor_kwargs={"artifact": str(Path(options.artifact).absolute()), "tower": options.tower,
                               "payload": source.payload, "dtype": options.dtype, "normalize": options.normalize,
                               "backend": options.backend, "device": device, "batch_size": options.batch_size},
        compute=ray.data.ActorPoolStrategy(size=min(options.actors, len(items))),
        batch_size=options.batch_size, batch_format="numpy",
        num_cpus=options.cpus_per_actor, num_gpus=options.gpus_per_actor or None,
    )
    # In order: shards complete one after another, so the driver buffers about one at a time.
    ds.context.execution_options.preserve_order = True

    expected = {s.index: s.rows for s in pending}
    buffers: dict[int, list[dict[str, Any]]] = {}
    counts: dict[int, int] = {}
    written: list[Path] = []
    rows_done = 0
    t0 = time.perf_counter()
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for shard in np.unique(batch["shard"]):
            mask = batch["shard"] == shard
            part = {k: batch[k][mask] for k in ("pos", "id", "embedding", "error")}
            index = int(shard)
            buffers.setdefault(index, []).append(part)
            counts[index] = counts.get(index, 0) + int(mask.sum())
            if counts[index] < expected[index]:
                continue
            path = _flush(out_dir, index, buffers, expected[index], identities[index], writer)
            if path is None:
                continue  # duplicates filled the count: wait for the missing positions
            written.append(path)
            del buffers[index]
            rows_done += expected[index]
            rate = rows_done / max(time.perf_counter() - t0, 1e-9)
            progress.say(f"  shard {len(written)}/{len(pending)} ({writer.shard_name(index)}): "
                         f"{expected[index]} rows, {rows_done}/{sum(expected.values())} done, {rate:.1f} rows/s")
    missing = sorted(set(expected) - {writer.shard_index(p) for p in written})
    if missing:
        raise BackendUnavailableError(f"Ray Data returned too few rows for shards {missing[:10]}; the complete "
                                      "shards are kept: run again with --resume")
    return written


def _flush(out_dir: Path, index: int, buffers: dict[int, list[dict[str, Any]]], rows: int,
           identity: dict[str, Any], writer: Any) -> Path | None:
    """Write shard `index` if every position 0..rows-1 has arrived; None if some are still missing."""
    import numpy as np

    parts = buffers[index]
    pos = np.concatenate([p["pos"] for p in parts])
    unique_pos, first = np.unique(pos, return_index=True)
    if len(unique_pos) < rows:
        return None
    ids = np.concatenate([p["id"] for p in parts])[first]
    emb = np.concatenate([p["embedding"] for p in parts])[first]
    err = np.concatenate([p["error"] for p in parts])[first]
    failed = np.array([bool(e) for e in err], dtype=bool)
    return writer.write_shard(out_dir, index, ids[~failed], emb[~failed], list(ids[failed]),
                              [str(e) for e in err[failed]], identity)

