"""fp16/bf16 written into the graph: low-precision weights and matmuls, LayerNorm/softmax and the
final projection in fp32, fp32 inputs/outputs, integer ids untouched, no overflow to inf."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from twins import TWINS, fp32_twin_graphs, write_twin

from clipexport.export import export_tower
from clipexport.models import load_reference
from clipexport.models.towers import attention_blocks, image_tower
from clipexport.passes import PassConfig, run_passes
from clipexport.passes.precision import (
    FP16_MAX,
    PrecisionReport,
    batch_broadcast,
    convert_precision,
    emulate_on_fp32,
)
from clipexport.recipes import BatchRange, load_recipes
from clipexport.verify import compare, trim_to_eot

F16, BF16, F32 = onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.FLOAT
LOW = {"fp16": F16, "bf16": BF16}


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = _session(model)
    return session.run(None, {session.get_inputs()[0].name: x})[0]


@pytest.fixture(scope="module", params=sorted(TWINS))
def fp32_graphs(request, tmp_path_factory):
    """(reference, {tower: (module, fp32 graph after fusion, inputs, trimmable)}) per twin."""
    ref, graphs = fp32_twin_graphs(request.param, tmp_path_factory.mktemp(request.param))
    size = ref.image_size
    inputs = {
        "image": torch.randn(5, 3, size, size, generator=torch.Generator().manual_seed(4)),
        "text": ref.tokenizer()(["a photo of a dog.", "an oil painting of a lighthouse on a cliff", "", "x y z"]),
    }
    return ref, {t: (module, graph, inputs[t], trim) for t, (module, graph, trim) in graphs.items()}


def _low_precision(graph: onnx.ModelProto, tower: str, precision: str, inputs: torch.Tensor) -> tuple:
    cfg = PassConfig(tower=tower, precision=precision, calibration=[inputs.numpy()])
    converted, records = run_passes(graph, cfg, disabled=["simplify", "fuse_attention"])
    assert {r.name: r.status for r in records}["precision"] == "applied"
    return converted, cfg


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
@pytest.mark.parametrize("tower", ["image", "text"])
def test_precision_is_written_into_the_graph(fp32_graphs, tower, precision):
    _, graphs = fp32_graphs
    _, graph, inputs, _ = graphs[tower]
    converted, _ = _low_precision(graph, tower, precision, inputs)
    onnx.checker.check_model(converted, full_check=True)
    inferred = onnx.shape_inference.infer_shapes(converted, strict_mode=True)
    types = {v.name: v.type.tensor_type.elem_type for v in
             list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)}
    types.update({i.name: i.data_type for i in converted.graph.initializer})
    low = LOW[precision]
    # interface: fp32 pixels / int64 ids in, fp32 embeddings out
    (inp,), (out,) = converted.graph.input, converted.graph.output
    assert inp.type.tensor_type.elem_type == (F32 if tower == "image" else onnx.TensorProto.INT64)
    assert out.type.tensor_type.elem_type == F32
    ops = collections.Counter(n.op_type for n in converted.graph.node)
    # weights in low precision: most MatMul/Gemm/Conv read a low-precision weight
    # (except the final projection, and batch-broadcast constants: CoCa's query projection stays fp32)
    broadcast = batch_broadcast(converted)
    weighted = [n for n in converted.graph.node if n.op_type in ("MatMul", "Gemm", "Conv")]
    low_weighted = [n for n in weighted if types.get(n.input[1]) == low]
    kept = [n for n in weighted if n not in low_weighted and n.output[0] not in broadcast]
    assert len(kept) <= 1 and low_weighted
    # fused attention runs in low precision; LayerNorm statistics in fp32
    assert all(types[n.input[0]] == low for n in converted.graph.node if n.op_type == "Attention")
    assert ops["Attention"] == sum(n.op_type == "Attention" for n in graph.graph.node)
    for node in converted.graph.node:
        if node.op_type == "LayerNormalization":
            assert all(types[i] == F32 for i in node.input if i), node.name
    # the last projection to the embedding accumulates in fp32
    last = next(n for n in reversed(converted.graph.node) if n.op_type in ("MatMul", "Gemm"))
    assert types[last.output[0]] == F32
    # the token ids are never cast to a float type
    if tower == "text":
        for node in converted.graph.node:
            if "input_ids" in node.input:
                assert not (node.op_type == "Cast" and node.attribute[0].i in (F16, BF16, F32))
    # weights stored low: initializer bytes roughly halve
    before = sum(onnx.numpy_helper.to_array(i).nbytes for i in graph.graph.initializer)
    after = sum(onnx.numpy_helper.to_array(i).nbytes for i in converted.graph.initializer)
    assert after < 0.6 * before


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
@pytest.mark.parametrize("tower", ["image", "text"])
def test_low_precision_parity_against_the_fp32_reference(fp32_graphs, tower, precision):
    _, graphs = fp32_graphs
    module, graph, inputs, trim = graphs[tower]
    converted, _ = _low_precision(graph, tower, precision, inputs)
    # emulated: every low tensor rounded, fp32 arithmetic (ORT CPU has no bf16 kernels and runs
    # most fp16 ops through inserted fp32 casts, which would hide fp16 rounding)
    runnable = emulate_on_fp32(converted, LOW[precision])
    x = trim_to_eot(inputs.numpy()) if trim else inputs.numpy()
    with torch.no_grad():
        want = module(inputs).numpy()
    parity = compare(want, _run(runnable, x), len(x))
    assert parity.finite and parity.cosine_min >= 0.999, parity
    # and it is not secretly fp32: low precision leaves a visible error
    assert parity.max_abs_err > 1e-6


def test_batch_broadcast_constants_are_the_ones_that_ignore_the_input_values(fp32_graphs):
    """Only tensors built from constants and the input's shape: the class token / CoCa's learned
    queries expanded to the batch; nothing computed from pixel values or token ids."""
    ref, graphs = fp32_graphs
    for tower, (_, graph, _, _) in graphs.items():
        broadcast = batch_broadcast(graph)
        producer = {o: n for n in graph.graph.node for o in n.output}
        assert graph.graph.output[0].name not in broadcast
        for name in broadcast:  # walk up: no path reaches a graph input except through Shape
            todo, seen = [name], set()
            while todo:
                node = producer.get(todo.pop())
                if node is None or node.name in seen or node.op_type in ("Shape", "Size"):
                    continue
                seen.add(node.name)
                assert not set(node.input) & {i.name for i in graph.graph.input}, (tower, name)
                todo.extend(i for i in node.input if i)
        has_queries = tower == "image" and getattr(getattr(ref.model, "visual", None), "attn_pool", None) is not None
        if has_queries:  # CoCa: the pooler's query projection (a MatMul) is batch-broadcast
            assert any(producer[n].op_type == "MatMul" for n in broadcast if n in producer)


def _opens_in_a_child(model: onnx.ModelProto, directory) -> tuple[bool, str]:
    """Whether ORT CPU opens the graph, asked in a child process: on some bf16 graphs (CoCa's
    attentional pooler) onnxruntime 1.32 crashes with a segmentation fault instead of raising."""
    import subprocess
    import sys

    path = directory / "graph.onnx"
    onnx.save(model, str(path))
    code = ("import sys, onnxruntime as ort; "
            "ort.InferenceSession(sys.argv[1], providers=['CPUExecutionProvider'])")
    proc = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=300)
    return proc.returncode == 0, f"exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1:] or ''}"


def test_bf16_does_not_run_natively_on_onnxruntime_cpu(fp32_graphs, tmp_path):
    """What the docs say about ORT CPU, checked: bf16 math kernels are missing, fp16 ones are there."""
    _, graphs = fp32_graphs
    _, graph, inputs, _ = graphs["image"]
    bf16, _ = _low_precision(graph, "image", "bf16", inputs)
    opened, detail = _opens_in_a_child(bf16, tmp_path)
    assert not opened
    assert "NOT_IMPLEMENTED" in detail or "implementation" in detail or "exit -11" in detail, detail
    fp16, _ = _low_precision(graph, "image", "fp16", inputs)
    _session(fp16)


def _overflowing_twin(tmp_path):
    """The ViT twin with its first image block's MLP scaled up: fp32 activations beyond 65504."""
    ref = load_reference(write_twin("vit", tmp_path), "none", seed=1)
    block = ref.model.visual.transformer.resblocks[0]
    with torch.no_grad():
        block.mlp.c_fc.weight.mul_(30.0)
        block.mlp.c_proj.weight.mul_(8000.0)
    return ref


def test_fp16_range_guard_keeps_overflowing_activations_finite(tmp_path):
    ref = _overflowing_twin(tmp_path)
    module = image_tower(ref.model)
    recipe = load_recipes()["vit"]
    pixels = torch.randn(4, 3, ref.image_size, ref.image_size, generator=torch.Generator().manual_seed(0))
    peak = []
    hook = ref.model.visual.transformer.resblocks[0].register_forward_hook(
        lambda m, i, o: peak.append(float(o.abs().max())))
    with torch.no_grad():
        want = module(pixels).numpy()
    hook.remove()
    assert peak[0] > 2 * FP16_MAX, "the premise: fp32 activations beyond fp16's range"
    graph = export_tower(module, pixels[:2], recipe.towers["image"], BatchRange(1, 8, 64), recipe.opset)
    graph, _ = run_passes(graph, PassConfig(tower="image", precision="fp32", attention_blocks=attention_blocks(module)))

    naive = convert_precision(graph, "fp16", ranges=None)  # what a range-blind conversion does
    naive_out = _run(emulate_on_fp32(naive, F16), pixels.numpy())
    assert not np.isfinite(naive_out).all()

    guarded, cfg = _low_precision(graph, "image", "fp16", pixels)
    got = _run(emulate_on_fp32(guarded, F16), pixels.numpy())
    assert np.isfinite(_run(guarded, pixels.numpy())).all()  # and natively on onnxruntime
    parity = compare(want, got, 4)
    assert parity.finite and parity.cosine_min >= 0.999, parity
    assert "kept fp32 for fp16 range" in " ".join(cfg.notes)
    report = PrecisionReport()
    convert_precision(graph, "fp16", ranges={}, report=report)
    assert report.kept_for_range == []  # the guard is what kept nodes fp32, not the policy


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_build_low_precision_end_to_end(twin, tmp_path, precision):
    from clipexport.build import BuildOptions, build

    result = build(BuildOptions(model=twin("vit"), pretrained="none", precision=precision, out=tmp_path / precision))
    assert result.manifest["precision"] == precision
    for tower in ("image", "text"):
        t = result.manifest["towers"][tower]
        assert {r["name"]: r["status"] for r in t["passes"]}["precision"] == "applied"
        assert t["parity"]["passed"] and t["parity"]["cosine_min"] >= 0.999
        assert t["parity"]["precision"] == precision
        assert "emulated" in t["parity"]["note"]
        graph = onnx.load(str(result.out_dir / t["onnx"]))
        assert any(i.data_type == LOW[precision] for i in graph.graph.initializer)
