"""Output of `embed-dataset`: one Parquet file per shard, written atomically, checkable later.

    OUT_DIR/
      part-00000.parquet        id, embedding (fixed_size_list<float32|float16>[D]); one row per readable input
      part-00001.parquet
      errors/part-00001.parquet id, reason; only for shards with unreadable inputs
      _SUCCESS                  JSON totals, written last, only when every shard is complete

A shard's file metadata records what made it (artifact manifest sha256, tower, dtype,
normalize, the fingerprint of its input rows) and how many rows and errors it holds.
The errors file is written before the shard file and each goes to a temporary name first,
then is renamed: so a shard file that exists *and* whose metadata matches the plan is a
complete shard, and `--resume` can skip it by reading only its footer.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

SUCCESS = "_SUCCESS"
ERRORS_DIR = "errors"
KEY_PREFIX = "clipexport."
#: Metadata that must match the plan for a shard on disk to count as done.
IDENTITY_KEYS = ("manifest_sha256", "tower", "dtype", "normalize", "inputs_sha256", "shard", "rows")


def shard_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def shard_path(out_dir: Path, index: int) -> Path:
    return out_dir / shard_name(index)


def errors_path(out_dir: Path, index: int) -> Path:
    return out_dir / ERRORS_DIR / shard_name(index)


def shard_metadata(identity: Mapping[str, Any], embedded: int, errors: int) -> dict[bytes, bytes]:
    """Parquet key-value metadata: the shard's identity plus its counts, all as strings."""
    values = {**identity, "embedded": embedded, "errors": errors}
    return {f"{KEY_PREFIX}{k}".encode(): str(v).encode() for k, v in values.items()}


def read_shard_metadata(path: Path) -> dict[str, str]:
    """The clipexport.* keys of a Parquet file's footer (without reading its data)."""
    meta = pq.read_metadata(path).metadata or {}
    return {k.decode()[len(KEY_PREFIX):]: v.decode() for k, v in meta.items() if k.decode().startswith(KEY_PREFIX)}


def shard_is_complete(out_dir: Path, index: int, identity: Mapping[str, Any]) -> bool:
    """True when the shard file exists, its metadata matches `identity`, and its row counts add up."""
    path = shard_path(out_dir, index)
    if not path.is_file():
        return False
    try:
        meta = read_shard_metadata(path)
        num_rows = pq.read_metadata(path).num_rows
        if any(meta.get(k) != str(identity[k]) for k in IDENTITY_KEYS):
            return False
        embedded, errors = int(meta["embedded"]), int(meta["errors"])
        if num_rows != embedded or embedded + errors != int(identity["rows"]):
            return False
        if errors:
            err = errors_path(out_dir, index)
            return err.is_file() and pq.read_metadata(err).num_rows == errors
        return True
    except (OSError, KeyError, ValueError, pa.ArrowException):
        return False  # truncated or foreign file: write it again


def write_shard(out_dir: Path, index: int, ids: Sequence[Any], embeddings: np.ndarray, error_ids: Sequence[Any],
                reasons: Sequence[str], identity: Mapping[str, Any]) -> Path:
    """Write one shard (and its errors, if any) atomically; returns the shard's path.

    embeddings: [n, D] float32 or float16, row i belongs to ids[i].
    """
    meta = shard_metadata(identity, len(ids), len(error_ids))
    err_path = errors_path(out_dir, index)
    if error_ids:
        err_table = pa.table({"id": _ids_array(error_ids), "reason": pa.array(list(reasons), pa.string())})
        _atomic_write(err_table.replace_schema_metadata(meta), err_path)
    elif err_path.exists():
        err_path.unlink()  # left by an earlier run of this shard on other inputs
    n, dim = embeddings.shape if embeddings.ndim == 2 else (0, 0)
    value_type = pa.float16() if embeddings.dtype == np.float16 else pa.float32()
    flat = pa.array(np.ascontiguousarray(embeddings).reshape(-1), type=value_type)
    column = pa.FixedSizeListArray.from_arrays(flat, dim) if dim else pa.array([], pa.list_(value_type, 0))
    table = pa.table({"id": _ids_array(ids), "embedding": column})
    path = shard_path(out_dir, index)
    _atomic_write(table.replace_schema_metadata(meta), path)
    return path


def _ids_array(ids: Sequence[Any]) -> pa.Array:
    values = list(ids.tolist() if isinstance(ids, np.ndarray) else ids)
    return pa.array(values)


def _atomic_write(table: pa.Table, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)  # readers see the old file or the whole new one, never half
    finally:
        if tmp.exists():
            tmp.unlink()


def existing_outputs(out_dir: Path) -> list[Path]:
    """Files this command writes that are already in out_dir (shards, errors, _SUCCESS, temporaries)."""
    if not out_dir.is_dir():
        return []
    found = [p for p in out_dir.glob("part-*.parquet")] + [p for p in out_dir.glob(".part-*.parquet.tmp-*")]
    err = out_dir / ERRORS_DIR
    if err.is_dir():
        found += list(err.glob("part-*.parquet")) + list(err.glob(".part-*.parquet.tmp-*"))
    if (out_dir / SUCCESS).exists():
        found.append(out_dir / SUCCESS)
    return sorted(found)


def shard_index(path: Path) -> int | None:
    """part-00012.parquet -> 12; None for any other name."""
    stem = path.name
    if not (stem.startswith("part-") and stem.endswith(".parquet")):
        return None
    digits = stem[len("part-"):-len(".parquet")]
    return int(digits) if digits.isdigit() else None


def write_success(out_dir: Path, summary: Mapping[str, Any]) -> Path:
    path = out_dir / SUCCESS
    tmp = path.with_name(f".{SUCCESS}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path
