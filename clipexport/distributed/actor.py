"""The work that runs inside Ray: expand a shard into rows, and embed batches of rows.

Plain Python classes and functions (no Ray import): Ray Data calls them, and the tests can
call them directly.

Rows travel as columns:
    shard int64, pos int64 (row within its shard), id, payload (path | bytes | text)
and come back from the Embedder as
    shard, pos, id, embedding [n, D] float32|float16, error (str, "" when the row embedded)
An unreadable image becomes a row with an error and a zero embedding instead of failing the
batch, so one bad file never stops the job and every input row comes back exactly once.
"""

from __future__ import annotations

import json
import warnings
from typing import Any

import numpy as np

from clipexport.errors import ClipExportError

Batch = dict[str, Any]


def expand_shard(batch: Batch, payload: str, id_column: str | None, data_column: str | None) -> Batch:
    """Work items (ShardPlan.to_items rows) -> their input rows: shard, pos (within the shard), id, payload."""
    shards: list[np.ndarray] = []
    positions: list[np.ndarray] = []
    ids: list[Any] = []
    payloads: list[Any] = []
    for shard, pos0, paths, slices_json in zip(batch["shard"], batch["pos0"], batch["paths"], batch["slices"]):
        slices = json.loads(slices_json)
        if not slices:  # image files: the path is both the id and the payload
            rows = [str(p) for p in paths]
            ids += rows
            payloads += rows
            n = len(rows)
        else:
            n = 0
            for s in slices:
                got_ids, got_payloads = _read_slice(s, payload, id_column, data_column)
                ids += got_ids
                payloads += got_payloads
                n += len(got_payloads)
        shards.append(np.full(n, int(shard), dtype=np.int64))
        positions.append(int(pos0) + np.arange(n, dtype=np.int64))
    return {"shard": np.concatenate(shards), "pos": np.concatenate(positions),
            "id": _object_array(ids), "payload": _object_array(payloads)}


def _read_slice(s: dict[str, Any], payload: str, id_column: str | None,
                data_column: str | None) -> tuple[list[Any], list[Any]]:
    """Rows [start, stop) of one Parquet file, reading only the row groups that hold them."""
    import pyarrow.parquet as pq

    f = pq.ParquetFile(s["path"])
    start, stop = int(s["start"]), int(s["stop"])
    groups, first_row, row = [], None, 0
    for g in range(f.metadata.num_row_groups):
        n = f.metadata.row_group(g).num_rows
        if row < stop and row + n > start:
            groups.append(g)
            first_row = row if first_row is None else first_row
        row += n
    columns = [c for c in (id_column, data_column) if c]
    table = f.read_row_groups(groups, columns=columns).slice(start - (first_row or 0), stop - start)
    data = table.column(data_column).to_pylist()
    if payload == "image_bytes" and data and isinstance(next((d for d in data if d is not None), None), dict):
        data = [d.get("bytes") if d is not None else None for d in data]  # {bytes, path} structs
    if id_column:
        ids = table.column(id_column).to_pylist()
    else:
        ids = [f"{s['path']}#{i}" for i in range(start, stop)]
    return ids, data


class Embedder:
    """Ray Data callable class: loads one Runtime per actor, then embeds batch after batch.

    Loading (sha256 checks, ONNX sessions) happens once in __init__, not per batch; that is
    why this is an actor pool and not tasks.
    """

    def __init__(self, artifact: str, tower: str, payload: str, dtype: str = "float32", normalize: bool = True,
                 backend: str = "auto", device: str | None = None, batch_size: int = 32) -> None:
        from clipexport.runtime import load

        self.runtime = load(artifact, backend=backend, device=device)
        self.tower = tower
        self.payload = payload
        self.dtype = np.dtype(dtype)
        self.normalize = normalize
        self.batch_size = batch_size
        dim = self.runtime.embed_dim
        if dim is None:
            # a symbolic output axis: learn D from one embedding
            probe = (self.runtime.encode_text(["a"]) if tower == "text"
                     else self.runtime.encode_pixels(np.zeros((1, 3, *self.runtime.image_size), np.float32)))
            dim = int(probe.shape[1])
        self.dim = int(dim)

    def __call__(self, batch: Batch) -> Batch:
        payloads = list(batch["payload"])
        n = len(payloads)
        errors = [""] * n
        out = np.zeros((n, self.dim), dtype=np.float32)
        if self.tower == "image":
            good, pixels = [], []
            for i, item in enumerate(payloads):
                if item is None:
                    errors[i] = "no image (null value)"
                    continue
                try:
                    pixels.append(self.runtime.preprocess(item if self.payload == "image_file" else bytes(item)))
                    good.append(i)
                except ClipExportError as exc:  # unreadable, truncated, not an image: record why, go on
                    errors[i] = str(exc)
                except OSError as exc:
                    errors[i] = f"cannot read: {exc}"
            if good:
                out[good] = self.runtime.encode_pixels(np.concatenate(pixels), batch_size=self.batch_size,
                                                       normalize=self.normalize)
        else:
            good = [i for i, t in enumerate(payloads) if isinstance(t, str)]
            for i in set(range(n)) - set(good):
                errors[i] = "no text (null value)"
            if good:
                with warnings.catch_warnings():
                    # open_clip cuts long texts too; one warning per batch in an actor's log is noise
                    warnings.simplefilter("ignore")
                    out[good] = self.runtime.encode_text([payloads[i] for i in good], batch_size=self.batch_size,
                                                         normalize=self.normalize)
        return {"shard": np.asarray(batch["shard"], dtype=np.int64), "pos": np.asarray(batch["pos"], dtype=np.int64),
                "id": batch["id"], "embedding": out.astype(self.dtype, copy=False),
                "error": _object_array(errors)}


def _object_array(values: list[Any]) -> np.ndarray:
    # np.array(list_of_bytes) would make a fixed-width |S array and strip trailing NUL bytes of images
    arr = np.empty(len(values), dtype=object)
    arr[:] = values
    return arr
