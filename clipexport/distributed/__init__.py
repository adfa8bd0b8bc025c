"""Embed large datasets with Ray Data: `clipexport embed-dataset` and `embed_dataset()`.

Importing this package does not import Ray or pyarrow (the `ray` extra); they are imported
when a job starts, with an error naming `pip install 'clipexport[ray]'` when missing.
"""

from __future__ import annotations

from clipexport.distributed.job import EmbedDatasetOptions, EmbedDatasetResult, embed_dataset, manifest_sha256

__all__ = ["EmbedDatasetOptions", "EmbedDatasetResult", "embed_dataset", "manifest_sha256"]
