"""One tower -> one ONNX graph with a dynamic batch axis (and, for a trimmable text tower,
a dynamic sequence axis). Nothing else.

Attention: torch's exporter lowers scaled_dot_product_attention, which nn.MultiheadAttention
and F.multi_head_attention_forward call, to one ONNX `Attention` node from opset 23 on.
`fuse_attention=False` swaps in an explicit MatMul/Softmax/MatMul form while exporting.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import warnings
from collections.abc import Iterator
from pathlib import Path

import onnx
import torch
import torch.nn.functional as F
from torch import nn

from clipexport.errors import ExportError
from clipexport.manifest import MIN_SEQUENCE
from clipexport.recipes import BatchRange, TowerSpec


@contextlib.contextmanager
def export_patches() -> Iterator[None]:
    """Patches that hold only while exporting, restored afterwards.

    nn.MultiheadAttention's eval fast path lowers to aten::_native_multi_head_attention,
    a fused op the exporters cannot always translate; the plain path exports cleanly.
    """
    previous = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(previous)


def _unfused_sdpa(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v in plain ops: what `--no-fuse-attention` exports."""
    if dropout_p or enable_gqa:
        raise ExportError("unfused attention export supports neither dropout nor grouped-query attention")
    scale = scale if scale is not None else 1.0 / math.sqrt(query.shape[-1])
    scores = (query * scale) @ key.transpose(-2, -1)  # scale on Q first: TensorRT fuses that form
    if is_causal:
        n, m = query.shape[-2], key.shape[-2]
        scores = scores.masked_fill(torch.ones(n, m, dtype=torch.bool, device=query.device).triu(1), float("-inf"))
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
    return torch.softmax(scores, dim=-1) @ value


@contextlib.contextmanager
def unfused_attention() -> Iterator[None]:
    """While active, F.scaled_dot_product_attention (also inside nn.MultiheadAttention) is plain math."""
    original = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = _unfused_sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[io.StringIO]:
    """The dynamo exporter prints progress lines and logs optimizer notes; we report stages ourselves."""
    sink = io.StringIO()
    loggers = [logging.getLogger(n) for n in ("onnxscript", "torch.onnx", "torch.export", "torch._dynamo")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(sink), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield sink
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def export_tower(
    tower: nn.Module,
    example: torch.Tensor,
    spec: TowerSpec,
    batch: BatchRange,
    opset: int,
    max_sequence: int | None = None,
    fuse_attention: bool = True,
) -> onnx.ModelProto:
    """Trace `tower` on `example` with torch.export and translate it to ONNX.

    The batch axis (axis 0 of the one input and the one output) is dynamic within
    [batch.min, batch.max]. With `max_sequence`, axis 1 of the input (token ids) is
    dynamic too, named "sequence", within [2, max_sequence]; every other axis keeps the
    example's size. Token ids keep the example's integer dtype.
    """
    program = _trace(tower, example, spec, batch, opset, max_sequence, fuse_attention, optimize=True)
    model = program.model_proto
    _name_dynamic_axes(model, sequence=max_sequence is not None)
    return model


def export_tower_to_file(
    tower: nn.Module,
    example: torch.Tensor,
    spec: TowerSpec,
    batch: BatchRange,
    opset: int,
    path: Path,
    max_sequence: int | None = None,
    fuse_attention: bool = True,
) -> list[str]:
    """export_tower for towers over protobuf's 2 GB: the graph goes to `path`, every weight to
    `<path>.data` (ONNX external data), streamed from the torch tensors. Not optimized: see
    optimize_external, which runs once the torch tower is freed.

    The weights are never copied into one protobuf: the exporter's graph refers to the torch
    tensors until `save` writes them out one by one. (Running the exporter's optimizer here
    would pin a second reference to every weight for the life of the process: measured on
    ViT-L-14, the tower's 1.1 GB stayed resident after the tower was freed.)
    Returns the file names written.
    """
    program = _trace(tower, example, spec, batch, opset, max_sequence, fuse_attention, optimize=False)
    try:
        with _quiet_exporter():
            program.save(str(path), external_data=True)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ExportError(f"could not write the {spec.input_name} tower with external data: {first[:400]}") from exc
    del program
    return external_files(path)


def optimize_external(source: Path, target: Path, sequence: bool) -> tuple[int, int]:
    """Fold constants and drop dead nodes (onnxscript's optimizer) of an external-data graph,
    reading its weights memory-mapped from the data file; write `target` + `<target>.data`
    and delete `source` and its data. Returns the node counts before and after.

    It runs in a child process: the optimizer's folded tensors keep views of the mapped data
    file alive (measured: ViT-L-14's 1.1 GB stayed resident in the caller after the model was
    deleted), and a child's exit returns every page.
    """
    import json
    import subprocess
    import sys

    # A fresh interpreter (not multiprocessing's spawn, which re-imports the caller's __main__).
    code = ("import json, sys; from clipexport.export import _optimize_external_here as run; "
            "print(json.dumps(run(sys.argv[1], sys.argv[2], sys.argv[3] == '1')))")
    done = subprocess.run([sys.executable, "-c", code, str(source), str(target), "1" if sequence else "0"],
                          capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1][:300]
        raise ExportError(f"simplifying {source.name} over its external data failed: {tail}")
    before, after = json.loads(done.stdout.strip().splitlines()[-1])
    return int(before), int(after)


def _optimize_external_here(source: str, target: str, sequence: bool) -> tuple[int, int]:
    import onnx_ir as ir
    import onnxscript.optimizer

    model = ir.load(source)  # initializers stay lazy: memory-mapped external tensors
    before = len(model.graph)
    with _quiet_exporter():
        onnxscript.optimizer.optimize(model)
    after = len(model.graph)
    target_path = Path(target)
    ir.save(model, target, external_data=f"{target_path.name}.data")
    del model
    for name in external_files(Path(source)):
        (Path(source).parent / name).unlink(missing_ok=True)
    graph = onnx.load(target, load_external_data=False)
    _name_dynamic_axes(graph, sequence=sequence)
    onnx.save_model(graph, target)  # the graph alone; the weights stay in the data file
    return before, after


def external_files(path: Path) -> list[str]:
    """The graph file and the data files its initializers point to (names relative to its folder)."""
    from clipexport.passes.external_precision import data_files

    return [path.name, *data_files(onnx.load(str(path), load_external_data=False))]


def _trace(
    tower: nn.Module,
    example: torch.Tensor,
    spec: TowerSpec,
    batch: BatchRange,
    opset: int,
    max_sequence: int | None,
    fuse_attention: bool,
    optimize: bool,
) -> torch.onnx.ONNXProgram:
    if fuse_attention and opset < 23:
        raise ExportError(f"fused attention needs opset >= 23 (ONNX Attention); the recipe says {opset}")
    axes: dict[int, torch.export.Dim] = {}
    if batch.min == batch.max:
        # A fixed batch (static engines): the graph takes exactly that many rows.
        rows = batch.min
    else:
        # torch.export specializes a dimension whose example size is 1; the example must lie in the range.
        rows = min(max(2, batch.min), batch.max)
        axes[0] = torch.export.Dim("batch", min=batch.min, max=batch.max)
    if example.shape[0] != rows:
        example = example[:1].expand(rows, *example.shape[1:]).contiguous()
    if max_sequence is not None:
        if example.shape[1] != max_sequence:
            raise ExportError(f"trimmable text export needs a full-length example ({max_sequence} columns)")
        # SOT + EOT is the shortest tokenized text; 1 would be specialized away anyway.
        axes[1] = torch.export.Dim("sequence", min=MIN_SEQUENCE, max=max_sequence)
    dynamic_shapes = (axes,) if axes else None
    tower.eval()
    attention = contextlib.nullcontext() if fuse_attention else unfused_attention()
    try:
        with torch.no_grad(), export_patches(), attention, _quiet_exporter():
            program = torch.onnx.export(
                tower,
                (example,),
                dynamo=True,
                input_names=[spec.input_name],
                output_names=[spec.output_name],
                dynamic_shapes=dynamic_shapes,
                opset_version=opset,
                optimize=optimize,
                verbose=False,
            )
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ExportError(f"torch.onnx could not export the {spec.input_name} tower: {first[:400]}") from exc
    if program is None:
        raise ExportError("torch.onnx returned no program")
    return program


def _name_dynamic_axes(model: onnx.ModelProto, sequence: bool) -> None:
    """Call the dynamic axes 'batch' (axis 0) and 'sequence' (axis 1 of the token ids),
    whatever the exporter named them: the runtime keys trimming on these names."""
    for value in list(model.graph.input) + list(model.graph.output):
        dims = value.type.tensor_type.shape.dim
        if dims and not dims[0].HasField("dim_value"):
            dims[0].dim_param = "batch"
    if sequence:
        dims = model.graph.input[0].type.tensor_type.shape.dim
        if len(dims) != 2 or dims[1].HasField("dim_value"):
            raise ExportError("the trimmable text tower exported without a dynamic sequence axis")
        old = dims[1].dim_param
        dims[1].dim_param = "sequence"
        # Intermediate shapes carry the exporter's symbol (e.g. 's1'); keep them consistent.
        for value in model.graph.value_info:
            for dim in value.type.tensor_type.shape.dim:
                if old and dim.dim_param == old:
                    dim.dim_param = "sequence"
