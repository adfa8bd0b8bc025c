"""config.pbtxt for Triton models: one tower graph, one Python-backend model, one ensemble.

Each config is built as tritonclient's `model_config_pb2.ModelConfig` message and printed
with protobuf's text format, so what we write is exactly what Triton's parser reads (a
misspelled field is an error here, not at server start). tritonclient is imported on first
use: `pip install clipexport[triton]`.

Shapes follow Triton's convention for batching models (max_batch_size > 0): `dims` leave out
the batch axis, and a dynamic axis (the text tower's token axis) is -1.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from clipexport.errors import ArtifactError, UsageError

#: manifest dtype name -> Triton DataType name ("string": Triton's variable-length bytes).
TRITON_DTYPES = {
    "float32": "TYPE_FP32",
    "float16": "TYPE_FP16",
    "bfloat16": "TYPE_BF16",
    "int64": "TYPE_INT64",
    "int32": "TYPE_INT32",
    "string": "TYPE_STRING",
}
PLATFORM_ONNX = "onnxruntime_onnx"
PLATFORM_PLAN = "tensorrt_plan"
KINDS = ("gpu", "cpu")


@dataclass(frozen=True)
class TensorSpec:
    """One model input or output as Triton sees it: dims without the batch axis, -1 where dynamic."""

    name: str
    dtype: str  # a manifest dtype name (float32, int64, ...) or "string"
    dims: tuple[int, ...]

    @classmethod
    def from_manifest(cls, entry: Mapping[str, Any], where: str) -> TensorSpec:
        """A manifest tensor entry {"name", "dtype", "shape": ["batch", 3, 224, 224]} -> spec.

        The first axis must be the symbolic batch axis: Triton batches along it.
        """
        try:
            name, dtype, shape = str(entry["name"]), str(entry["dtype"]), list(entry["shape"])
        except (KeyError, TypeError) as exc:
            raise ArtifactError(f"manifest {where}: malformed tensor entry {entry!r} ({exc!r})") from None
        if dtype not in TRITON_DTYPES or dtype == "string":
            raise ArtifactError(f"manifest {where} {name!r}: dtype {dtype!r} has no Triton type here "
                                f"(expected one of {', '.join(d for d in TRITON_DTYPES if d != 'string')})")
        if not shape or isinstance(shape[0], int):
            raise ArtifactError(f"manifest {where} {name!r}: shape {shape} has no dynamic batch axis first; "
                                "Triton's batching needs one (rebuild with `clipexport build`)")
        # Symbolic (str) or unknown (0) sizes are dynamic for Triton.
        dims = tuple(d if isinstance(d, int) and d > 0 else -1 for d in shape[1:])
        return cls(name, dtype, dims)


@dataclass(frozen=True)
class Batching:
    """max_batch_size and the dynamic batcher's settings, from the artifact's batch profile."""

    max_batch_size: int
    preferred: tuple[int, ...]  # preferred batch sizes, ascending, each <= max_batch_size
    max_queue_delay_us: int

    @classmethod
    def from_manifest(cls, batch: Mapping[str, Any] | None, max_queue_delay_us: int) -> Batching:
        """From manifest["batch"] = {"min", "opt", "max"}: batches up to max, preferring opt and max."""
        try:
            opt, high = int((batch or {})["opt"]), int((batch or {})["max"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ArtifactError(f"manifest batch {batch!r}: expected {{'min', 'opt', 'max'}} ({exc!r})") from None
        if not 1 <= opt <= high:
            raise ArtifactError(f"manifest batch {batch!r}: expected 1 <= opt <= max")
        if max_queue_delay_us < 0:
            raise UsageError(f"--max-queue-delay {max_queue_delay_us}: expected microseconds >= 0")
        return cls(high, tuple(sorted({opt, high})), max_queue_delay_us)


@dataclass(frozen=True)
class Instances:
    """instance_group: `count` copies on GPU or CPU."""

    count: int = 1
    kind: str = "gpu"

    def __post_init__(self) -> None:
        if isinstance(self.count, bool) or not isinstance(self.count, int) or self.count < 1:
            raise UsageError(f"--instances {self.count!r}: expected a positive integer")
        if self.kind not in KINDS:
            raise UsageError(f"--kind {self.kind!r}: expected one of {', '.join(KINDS)}")


@dataclass(frozen=True)
class Step:
    """One ensemble step: the model's own tensor names -> the ensemble's tensor names."""

    model_name: str
    input_map: Mapping[str, str] = field(default_factory=dict)
    output_map: Mapping[str, str] = field(default_factory=dict)


def model_config_pb2() -> Any:
    """tritonclient's ModelConfig protobuf module, or a UsageError that says how to get it."""
    try:
        from tritonclient.grpc import model_config_pb2 as pb2
    except ImportError as exc:
        raise UsageError(f"`clipexport triton` needs tritonclient's model-config protobuf ({exc}); "
                         "install it with `pip install 'clipexport[triton]'`") from None
    return pb2


def tower_config(name: str, platform: str, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec],
                 batching: Batching, instances: Instances) -> Any:
    """The tower graph itself: ONNX Runtime (`onnxruntime_onnx`) or a TensorRT plan (`tensorrt_plan`)."""
    if platform not in (PLATFORM_ONNX, PLATFORM_PLAN):
        raise UsageError(f"platform {platform!r}: expected {PLATFORM_ONNX} or {PLATFORM_PLAN}")
    pb2 = model_config_pb2()
    config = pb2.ModelConfig(name=name, platform=platform, max_batch_size=batching.max_batch_size)
    config.default_model_filename = "model.plan" if platform == PLATFORM_PLAN else "model.onnx"
    _add_tensors(config.input, inputs, pb2)
    _add_tensors(config.output, outputs, pb2)
    kind = pb2.ModelInstanceGroup.KIND_GPU if instances.kind == "gpu" else pb2.ModelInstanceGroup.KIND_CPU
    config.instance_group.add(count=instances.count, kind=kind)
    _set_batching(config, batching)
    return config


def python_config(name: str, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec], batching: Batching,
                  instances: Instances) -> Any:
    """A Python-backend model (model.py). It decodes and tokenizes on the CPU whatever --kind says."""
    pb2 = model_config_pb2()
    config = pb2.ModelConfig(name=name, backend="python", max_batch_size=batching.max_batch_size)
    _add_tensors(config.input, inputs, pb2)
    _add_tensors(config.output, outputs, pb2)
    config.instance_group.add(count=instances.count, kind=pb2.ModelInstanceGroup.KIND_CPU)
    _set_batching(config, batching)
    return config


def ensemble_config(name: str, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec], batching: Batching,
                    steps: Sequence[Step]) -> Any:
    """An ensemble chaining `steps`; it has no instances or batcher of its own (its models do)."""
    pb2 = model_config_pb2()
    config = pb2.ModelConfig(name=name, platform="ensemble", max_batch_size=batching.max_batch_size)
    _add_tensors(config.input, inputs, pb2)
    _add_tensors(config.output, outputs, pb2)
    for step in steps:
        entry = config.ensemble_scheduling.step.add(model_name=step.model_name, model_version=-1)
        for key, value in step.input_map.items():
            entry.input_map[key] = value
        for key, value in step.output_map.items():
            entry.output_map[key] = value
    return config


def to_pbtxt(config: Any, header: Sequence[str] = ()) -> str:
    """The config in protobuf text format, after `# ` comment lines (Triton's parser skips them)."""
    from google.protobuf import text_format

    comments = "".join("# " + " ".join(line.splitlines()) + "\n" for line in header)
    return comments + text_format.MessageToString(config)


def _add_tensors(field_: Any, specs: Sequence[TensorSpec], pb2: Any) -> None:
    for spec in specs:
        field_.add(name=spec.name, data_type=pb2.DataType.Value(TRITON_DTYPES[spec.dtype]), dims=list(spec.dims))


def _set_batching(config: Any, batching: Batching) -> None:
    config.dynamic_batching.preferred_batch_size.extend(batching.preferred)
    config.dynamic_batching.max_queue_delay_microseconds = batching.max_queue_delay_us


__all__ = [
    "PLATFORM_ONNX",
    "PLATFORM_PLAN",
    "TRITON_DTYPES",
    "Batching",
    "Instances",
    "Step",
    "TensorSpec",
    "ensemble_config",
    "model_config_pb2",
    "python_config",
    "to_pbtxt",
    "tower_config",
]
