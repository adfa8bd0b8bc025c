"""The model repository `clipexport serve` runs: per tower one Python-backend model (model.py).

    REPO/clip_image/config.pbtxt       "image" TYPE_STRING [1] -> "embedding" FP32 [D], dynamic batching
    REPO/clip_image/1/model.py         clipexport/serve/model.py
    REPO/clip_image/1/clipexport.json  the artifact's absolute path, backend, device, normalize, limits
    (clip_text likewise, input "text")

The models load the artifact where it is (nothing is copied), through clipexport.load.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from clipexport import __version__
from clipexport.errors import UsageError
from clipexport.triton.config import Batching, Instances, TensorSpec, python_config, to_pbtxt

MODEL_FILE = Path(__file__).with_name("model.py")
#: Model name and input tensor per tower: those of `clipexport triton`'s ensembles.
MODELS = {"image": ("clip_image", "image"), "text": ("clip_text", "text")}
OUTPUT = "embedding"
DEFAULT_MAX_REQUEST_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class ServeOptions:
    """What the served models do; ports and signals belong to the command."""

    backend: str = "auto"
    device: str | None = None
    normalize: bool = False
    max_batch: int | None = None  # None: min(32, the artifact's verified maximum)
    max_queue_delay_us: int = 500
    instances: int = 1
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES


@dataclass(frozen=True)
class ServeRepository:
    path: Path
    models: dict[str, str]  # tower -> model name
    max_batch: int
    embed_dim: int


def write_serve_repository(artifact: Path, out: Path, towers: tuple[str, ...], embed_dim: int, batch_max: int,
                           options: ServeOptions) -> ServeRepository:
    """Write the repository into the empty or new directory `out`.

    towers/embed_dim/batch_max: what the loaded artifact has (the caller has run clipexport.load).
    """
    max_batch = options.max_batch if options.max_batch is not None else min(32, batch_max)
    if max_batch < 1 or max_batch > batch_max:
        raise UsageError(f"--max-batch {max_batch}: this artifact was verified for batches of 1..{batch_max}")
    if options.max_queue_delay_us < 0:
        raise UsageError(f"--max-queue-delay-us {options.max_queue_delay_us}: expected >= 0")
    if options.max_request_bytes < 1:
        raise UsageError(f"--max-request-bytes {options.max_request_bytes}: expected >= 1")
    instances = Instances(options.instances, "cpu")  # the Python process; the runtime picks the device
    batching = Batching(max_batch, (), options.max_queue_delay_us)
    models = {}
    for tower in towers:
        name, input_name = MODELS[tower]
        version = out / name / "1"
        version.mkdir(parents=True)
        shutil.copyfile(MODEL_FILE, version / "model.py")
        cfg = {"clipexport_version": __version__, "artifact": str(Path(artifact).resolve()), "tower": tower,
               "input": input_name, "backend": options.backend, "device": options.device,
               "normalize": options.normalize, "max_request_bytes": options.max_request_bytes}
        (version / "clipexport.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
        config = python_config(name, [TensorSpec(input_name, "string", (1,))],
                               [TensorSpec(OUTPUT, "float32", (embed_dim,))], batching, instances)
        header = [f"written by clipexport {__version__} `clipexport serve` for {artifact}", f"{tower} tower"]
        (out / name / "config.pbtxt").write_text(to_pbtxt(config, header), encoding="utf-8")
        models[tower] = name
    return ServeRepository(out, models, max_batch, embed_dim)


__all__ = ["DEFAULT_MAX_REQUEST_BYTES", "MODELS", "OUTPUT", "ServeOptions", "ServeRepository",
           "write_serve_repository"]
