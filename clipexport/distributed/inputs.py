"""Inputs of `embed-dataset`: find the files, describe their rows, cut them into fixed shards.

Only the standard library at import time: pyarrow (the `ray` extra) is imported when Parquet
metadata is first read.

Rows are numbered in one global order: files sorted by path, then (Parquet) rows in file
order. Shard k holds global rows [k * shard_size, (k + 1) * shard_size). The same inputs
therefore always give the same shards with the same names, which is what makes `--resume`
safe: a shard on disk is reused only if its recorded fingerprint of the rows it holds
matches the fingerprint planned now.

    sorted files ──► global rows 0 ... N-1 ──► shard 0 [0, S) │ shard 1 [S, 2S) │ ...
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clipexport.errors import UsageError

#: Image suffixes taken from a directory (a glob takes every file it matches).
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm"})
PARQUET_SUFFIXES = frozenset({".parquet", ".parq", ".pq"})
RAY_EXTRA_HINT = "pip install 'clipexport[ray]'"


@dataclass(frozen=True)
class ParquetSlice:
    """Rows [start, stop) of one Parquet file; `offset` is the global number of its row `start`."""

    path: str
    start: int
    stop: int
    offset: int


@dataclass(frozen=True)
class Source:
    """What to read from each row.

    kind:        "files" (image files) or "parquet"
    payload:     "image_file" (payload is a path), "image_bytes" or "text"
    id_column:   Parquet column copied to the output `id`; None: ids are "<file>#<row>"
    data_column: Parquet column that holds the image bytes / paths or the texts
    """

    kind: str
    payload: str
    id_column: str | None = None
    data_column: str | None = None


@dataclass(frozen=True)
class ShardPlan:
    """One shard: its index, the rows it holds, and a fingerprint of exactly those rows."""

    index: int
    rows: int
    fingerprint: str
    paths: tuple[str, ...] = ()  # image files
    slices: tuple[ParquetSlice, ...] = ()  # Parquet rows

    def to_items(self, chunk_rows: int) -> list[dict[str, Any]]:
        """The shard as work items of up to `chunk_rows` rows, for ray.data.from_items (one block each).

        Ray Data hands a whole block to one actor, so blocks of a shard's size would leave
        actors idle on a small job; chunks spread one shard over the pool. Each item says
        where its rows start in the shard (pos0) and lists its paths or its Parquet slices
        (as JSON: one column type for every item).
        """
        items = []
        for pos0 in range(0, self.rows, chunk_rows):
            pos1 = min(pos0 + chunk_rows, self.rows)
            slices = []
            if self.slices:
                base = self.slices[0].offset  # the shard's first global row
                for sl in self.slices:
                    lo, hi = max(sl.offset, base + pos0), min(sl.offset + sl.stop - sl.start, base + pos1)
                    if lo < hi:
                        slices.append({"path": sl.path, "start": sl.start + lo - sl.offset,
                                       "stop": sl.start + hi - sl.offset, "offset": lo})
            items.append({"shard": self.index, "pos0": pos0, "paths": list(self.paths[pos0:pos1]),
                          "slices": json.dumps(slices)})
        return items


@dataclass(frozen=True)
class InputPlan:
    source: Source
    files: tuple[str, ...]
    shards: tuple[ShardPlan, ...]
    total_rows: int
    inputs_fingerprint: str = field(default="")


def find_files(pattern: str) -> list[str]:
    """A file, a directory (image or Parquet files under it, recursively) or a glob -> sorted absolute paths.

    Absolute paths: Ray workers do not share the driver's working directory.
    """
    path = Path(pattern).expanduser()
    if path.is_file():
        return [str(path.absolute())]
    if path.is_dir():
        wanted = IMAGE_SUFFIXES | PARQUET_SUFFIXES
        found = [p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in wanted]
        if not found:
            raise UsageError(f"--input {pattern}: the directory holds no image or Parquet files")
        return sorted(str(p.absolute()) for p in found)
    matches = [m for m in glob.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(m)]
    if not matches:
        raise UsageError(f"--input {pattern}: no files match (give a file, a directory or a glob like "
                         f"'photos/**/*.jpg')")
    return sorted(str(Path(m).absolute()) for m in matches)


def input_kind(files: list[str], pattern: str) -> str:
    """"parquet" when every file is Parquet, "files" when none is; a mix is an error."""
    parquet = [f for f in files if Path(f).suffix.lower() in PARQUET_SUFFIXES]
    if not parquet:
        return "files"
    if len(parquet) == len(files):
        return "parquet"
    other = next(f for f in files if Path(f).suffix.lower() not in PARQUET_SUFFIXES)
    raise UsageError(f"--input {pattern}: matches both Parquet files and other files (e.g. {other}); "
                     "give one kind")


def plan_inputs(pattern: str, tower: str, shard_size: int, id_column: str | None = None,
                image_column: str | None = None, text_column: str | None = None) -> InputPlan:
    """Find and describe the inputs and cut them into shards of `shard_size` rows (the last may be shorter).

    id_column / image_column / text_column: None means the defaults "id" (if present, else
    "<file>#<row>"), "image" and "text"; a column named explicitly must exist.
    """
    if shard_size < 1:
        raise UsageError(f"--shard-size {shard_size}: expected a positive integer")
    files = find_files(pattern)
    kind = input_kind(files, pattern)
    if kind == "files":
        if tower == "text":
            raise UsageError(f"--input {pattern}: image files can only go through the image tower; texts come "
                             "from a Parquet --text-column")
        if id_column or image_column or text_column:
            raise UsageError("--id-column/--image-column/--text-column apply to Parquet input only")
        source = Source(kind="files", payload="image_file")
        shards = tuple(
            ShardPlan(index=k, rows=len(chunk), fingerprint=_digest(["files", *chunk]), paths=tuple(chunk))
            for k, chunk in enumerate(files[i:i + shard_size] for i in range(0, len(files), shard_size))
        )
        return InputPlan(source, tuple(files), shards, len(files), _digest([s.fingerprint for s in shards]))
    source, counts, identities = _parquet_source(files, tower, id_column, image_column, text_column)
    shards = _parquet_shards(files, counts, identities, shard_size, source)
    total = sum(counts)
    return InputPlan(source, tuple(files), shards, total, _digest([s.fingerprint for s in shards]))


def _parquet_source(files: list[str], tower: str, id_column: str | None, image_column: str | None,
                    text_column: str | None) -> tuple[Source, list[int], list[str]]:
    pq = _pyarrow_parquet()
    counts: list[int] = []
    identities: list[str] = []
    schemas = []
    for f in files:
        try:
            meta = pq.read_metadata(f)
            schema = pq.read_schema(f)
        except Exception as exc:  # noqa: BLE001 - pyarrow raises ArrowInvalid/OSError for a bad file
            raise UsageError(f"--input: {f} is not a readable Parquet file ({exc})") from None
        counts.append(meta.num_rows)
        stat = os.stat(f)
        # Size and mtime stand for the content: a rewritten file changes the shards that read it.
        identities.append(f"{f}|{stat.st_size}|{stat.st_mtime_ns}")
        schemas.append(schema)
    payload_types: tuple[str, ...]
    if tower == "image":
        data_column, payload_types = image_column or "image", ("image_bytes", "image_file")
        if text_column:
            raise UsageError("--text-column applies to --tower text")
    else:
        data_column, payload_types = text_column or "text", ("text",)
        if image_column:
            raise UsageError("--image-column applies to --tower image")
    payload = ""
    for f, schema in zip(files, schemas):
        if data_column not in schema.names:
            flag = "--image-column" if tower == "image" else "--text-column"
            raise UsageError(f"{f} has no column {data_column!r} (columns: {', '.join(schema.names)}); "
                             f"name it with {flag}")
        this = _payload_of(schema.field(data_column).type, tower)
        if this is None or this not in payload_types:
            raise UsageError(f"{f}: column {data_column!r} has type {schema.field(data_column).type}; the "
                             f"{tower} tower needs " + ("image bytes (binary, or a struct with a 'bytes' field) "
                                                        "or image paths (string)" if tower == "image" else "strings"))
        if payload and this != payload:
            raise UsageError(f"{f}: column {data_column!r} holds {this} but an earlier file holds {payload}")
        payload = this
    chosen_id: str | None = id_column
    if id_column is not None:
        for f, schema in zip(files, schemas):
            if id_column not in schema.names:
                raise UsageError(f"{f} has no column {id_column!r} (--id-column); columns: {', '.join(schema.names)}")
    elif all("id" in s.names for s in schemas):
        chosen_id = "id"
    return Source("parquet", payload, chosen_id, data_column), counts, identities


def _payload_of(arrow_type: Any, tower: str) -> str | None:
    import pyarrow as pa

    if tower == "text":
        return "text" if pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type) else None
    if pa.types.is_binary(arrow_type) or pa.types.is_large_binary(arrow_type):
        return "image_bytes"
    if pa.types.is_struct(arrow_type) and arrow_type.get_field_index("bytes") >= 0:
        return "image_bytes"  # the Hugging Face datasets Image feature: {bytes, path}
    if pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type):
        return "image_file"
    return None


def _parquet_shards(files: list[str], counts: list[int], identities: list[str], shard_size: int,
                    source: Source) -> tuple[ShardPlan, ...]:
    total = sum(counts)
    shards = []
    starts = [sum(counts[:i]) for i in range(len(counts))]
    identity_of = dict(zip(files, identities))
    for k, lo in enumerate(range(0, total, shard_size)):
        hi = min(lo + shard_size, total)
        slices = []
        for f, first, n in zip(files, starts, counts):
            a, b = max(lo, first), min(hi, first + n)
            if a < b:
                slices.append(ParquetSlice(f, a - first, b - first, a))
        key = [json.dumps(source.__dict__, sort_keys=True)]
        key += [f"{identity_of[s.path]}|{s.start}|{s.stop}" for s in slices]
        shards.append(ShardPlan(index=k, rows=hi - lo, fingerprint=_digest(key), slices=tuple(slices)))
    return tuple(shards)


def _digest(parts: list[str]) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode("utf-8", "surrogateescape"))
        h.update(b"\0")  # a separator, so ["ab", "c"] and ["a", "bc"] differ
    return h.hexdigest()


def _pyarrow_parquet() -> Any:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UsageError(f"reading Parquet needs pyarrow: {RAY_EXTRA_HINT}") from None
    return pq
