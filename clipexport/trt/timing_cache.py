"""Where TensorRT's timing cache lives (Polygraphy loads, merges and saves it under a file lock).

TensorRT times candidate kernels while building; the timing cache remembers the winners,
so the second build of a tower (or of its other precision) takes a fraction of the time.
A cache is only meaningful for one TensorRT version on one GPU model, so the file name
carries both; TensorRT also checks and refuses a foreign cache (the build then starts an empty one).
"""

from __future__ import annotations

import os
import re
from pathlib import Path


def cache_root() -> Path:
    """$CLIPEXPORT_CACHE, else $XDG_CACHE_HOME/clipexport, else ~/.cache/clipexport."""
    if os.environ.get("CLIPEXPORT_CACHE"):
        return Path(os.environ["CLIPEXPORT_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "clipexport"


def default_timing_cache_path(tensorrt_version: str, gpu_name: str, compute_capability: tuple[int, int]) -> Path:
    """e.g. ~/.cache/clipexport/timing/trt-10.14.1.48-NVIDIA_H100_80GB_HBM3-sm90.cache"""
    gpu = re.sub(r"[^A-Za-z0-9._-]+", "_", gpu_name).strip("_") or "gpu"
    sm = f"sm{compute_capability[0]}{compute_capability[1]}"
    return cache_root() / "timing" / f"trt-{tensorrt_version}-{gpu}-{sm}.cache"
