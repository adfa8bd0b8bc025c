"""The gates at their own level: hand-made TowerParity values and arrays, hand-made ONNX graphs,
exact expected scales and dims. Each test here was seen to fail with the gate broken the way
its docstring says (benchmarks/results/mutation.md); they are also the fast selection that
benchmarks/mutation.sh runs against mutants of the gate modules.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from clipexport.errors import ArtifactError, PassError
from clipexport.passes import PassConfig
from clipexport.passes.fuse_attention import attention_nodes, check_unfused, fuse_attention
from clipexport.passes.precision import (
    FP16_MAX,
    PrecisionPolicy,
    PrecisionReport,
    apply_precision,
    convert_precision,
)
from clipexport.passes.quantize import QuantPolicy, QuantReport, quantize, quantize_graph
from clipexport.recipes import Tolerance
from clipexport.verify import BatchParity, TowerParity, check_tower, compare, top1_agreement

F32, F16 = TensorProto.FLOAT, TensorProto.FLOAT16


# -- parity ------------------------------------------------------------------------------------

def _parity(cosine: float, rel: float, tol: Tolerance, **kw: object) -> TowerParity:
    return TowerParity("image", "test", "fp32", tol, [BatchParity(2, cosine, rel, rel, True)], **kw)  # type: ignore[arg-type]


def test_cosine_gate_fails_a_candidate_within_the_relative_error_limit():
    """Broken by: the cosine comparison dropped, or made against max_rel_err / top1_agreement_min."""
    ref = np.ones((2, 400))
    cand = ref + 0.04 * np.where(np.arange(400) % 2, 1.0, -1.0)  # every entry off by 4 % of the row's scale
    measured = compare(ref, cand, 2)
    assert measured.max_rel_err == pytest.approx(0.04)
    assert measured.cosine_min == pytest.approx(1 / np.sqrt(1 + 0.04**2), abs=1e-12)  # 0.99920
    tol = Tolerance(cosine_min=0.99999, max_rel_err=0.05, top1_agreement_min=0.5)
    parity = TowerParity("image", "test", "fp16", tol, [measured], top1_agreement=1.0)
    assert parity.max_rel_err <= tol.max_rel_err  # the premise: only cosine is out of bounds
    assert not parity.passed and "FAILED" in parity.summary()
    assert TowerParity("image", "test", "fp16", Tolerance(0.999, 0.05, 0.5), [measured], top1_agreement=1.0).passed


def test_parity_bounds_are_inclusive_and_exact():
    """Broken by: >= / <= turned strict or inverted, or a bound read from the wrong field."""
    tol = Tolerance(cosine_min=0.999, max_rel_err=0.01, top1_agreement_min=0.9)
    assert _parity(0.999, 0.01, tol, top1_agreement=0.9).passed
    assert not _parity(0.998999, 0.01, tol, top1_agreement=0.9).passed
    assert not _parity(0.999, 0.010001, tol, top1_agreement=0.9).passed
    assert not _parity(0.999, 0.01, tol, top1_agreement=0.899).passed
    assert not _parity(0.999, 0.01, tol, top1_agreement=None).passed  # gated but never measured
    assert _parity(0.999, 0.01, tol, top1_agreement=None, top1_gated=False).passed
    assert _parity(0.999, 0.01, Tolerance(0.999, 0.01), top1_agreement=0.0).passed  # no top-1 bound
    unfinite = TowerParity("image", "t", "fp16", tol, [BatchParity(2, 1.0, 0.0, 0.0, False)], top1_agreement=1.0)
    assert not unfinite.passed
    # the worst batch decides each bound
    two = TowerParity("image", "t", "fp16", tol, [BatchParity(1, 0.9995, 0.001, 0.002, True),
                                                  BatchParity(4, 0.9991, 0.0005, 0.009, True)], top1_agreement=1.0)
    assert (two.cosine_min, two.max_abs_err, two.max_rel_err) == (0.9991, 0.001, 0.009) and two.passed


def test_parity_report_says_what_failed():
    tol = Tolerance(cosine_min=0.999, max_rel_err=0.01, top1_agreement_min=0.9)
    parity = _parity(0.5, 0.25, tol, top1_agreement=0.75)
    assert parity.summary() == (
        "image tower on test (fp32): cosine_min 0.5000000 (need >= 0.999), max_abs_err 0.25, "
        "max_rel_err 0.25 (need <= 0.01), top1_agreement 0.750 (need >= 0.9), batches [2]: FAILED")
    record = parity.to_json()
    assert record["passed"] is False and record["cosine_min"] == 0.5 and record["top1_agreement"] == 0.75
    assert record["tolerance"] == {"cosine_min": 0.999, "max_rel_err": 0.01, "top1_agreement_min": 0.9}
    assert record["batches"] == [{"batch_size": 2, "cosine_min": 0.5, "max_abs_err": 0.25, "max_rel_err": 0.25,
                                  "finite": True}]


def test_parity_report_of_a_pass_and_its_json_record():
    tol = Tolerance(cosine_min=0.99, max_rel_err=0.1)
    parity = TowerParity("text", "onnxruntime-cpu", "int8", tol, [BatchParity(4, 0.995, 0.02, 0.05, True)],
                         top1_agreement=0.25, top1_gated=False, trimmed_lengths=[9], note="emulated")
    assert parity.summary() == (
        "text tower on onnxruntime-cpu (int8): cosine_min 0.9950000 (need >= 0.99), max_abs_err 0.02, "
        "max_rel_err 0.05 (need <= 0.1), top1_agreement 0.250, trimmed to [9] tokens, batches [4]: passed")
    gated = TowerParity("text", "b", "int8", Tolerance(0.99, 0.1, 0.2), parity.batches, top1_agreement=0.25,
                        top1_gated=False)
    assert "top1_agreement 0.250 (not gated: random weights), batches [4]: passed" in gated.summary()
    assert parity.to_json() == {
        "backend": "onnxruntime-cpu", "precision": "int8", "cosine_min": 0.995, "max_abs_err": 0.02,
        "max_rel_err": 0.05, "passed": True, "tolerance": {"cosine_min": 0.99, "max_rel_err": 0.1,
                                                          "top1_agreement_min": None},
        "top1_agreement": 0.25, "top1_gated": False, "trimmed_lengths": [9], "note": "emulated",
        "batches": [{"batch_size": 4, "cosine_min": 0.995, "max_abs_err": 0.02, "max_rel_err": 0.05, "finite": True}]}


def test_parity_report_without_top1():
    parity = TowerParity("image", "b", "fp32", Tolerance(0.99, 0.1), [BatchParity(1, 1.0, 0.0, 0.0, True)])
    assert parity.summary().endswith("max_rel_err 0 (need <= 0.1), batches [1]: passed")


def test_non_finite_candidate_is_recorded_as_such():
    got = compare(np.ones((2, 3)), np.array([[1.0, np.nan, 1.0], [1.0, 1.0, 1.0]]), 2)
    assert got.batch_size == 2 and got.finite is False and np.isnan(got.cosine_min)
    assert got.max_abs_err == got.max_rel_err == float("inf")


# Two embeddings, three anchors. Each row picks the same anchor in reference and candidate;
# anchor 2 picks row 1 in the reference but row 0 in the candidate.
TOP1_ANCHORS = np.eye(3)
TOP1_REF = np.array([[1.0, 0.1, 0.0], [0.0, 1.0, 0.2]])
TOP1_CAND = np.array([[1.0, 0.1, 0.3], [0.0, 1.0, 0.2]])


def test_top1_agreement_direction_is_exact():
    """Broken by: the axis of the argmax flipped (anchors choosing rows instead of rows choosing anchors)."""
    assert top1_agreement(TOP1_REF, TOP1_CAND, TOP1_ANCHORS, rows_are_queries=True) == 1.0
    assert top1_agreement(TOP1_REF, TOP1_CAND, TOP1_ANCHORS, rows_are_queries=False) == pytest.approx(2 / 3)
    # scale does not matter (cosine scores), only direction
    assert top1_agreement(5 * TOP1_REF, TOP1_CAND, 3 * TOP1_ANCHORS, rows_are_queries=False) == pytest.approx(2 / 3)
    # ... per row: unnormalized, anchor 0 would pick the long row 1 in the candidate (it picks row 0 in both)
    ref = np.array([[1.0, 0.0], [0.8, 0.8]])
    cand = np.array([[1.0, 0.0], [10.0, 10.0]])
    assert top1_agreement(ref, cand, np.eye(2), rows_are_queries=False) == 1.0


@pytest.mark.parametrize(("tower", "expected"), [("image", 1.0), ("text", 2 / 3)])
def test_check_tower_uses_each_towers_direction(tower, expected):
    """Broken by: image rows_are_queries flipped in check_tower (images pick class texts; texts are picked by images)."""
    torch = pytest.importorskip("torch")
    parity = check_tower(tower, lambda batch: torch.from_numpy(TOP1_REF), lambda ids: TOP1_CAND,
                         [torch.zeros(2, 3)], Tolerance(0.9, 0.5, 0.5), "test", anchors=TOP1_ANCHORS)
    assert parity.top1_agreement == pytest.approx(expected)
    assert [b.batch_size for b in parity.batches] == [2]
    assert parity.cosine_min == pytest.approx(compare(TOP1_REF, TOP1_CAND, 2).cosine_min)
    non_finite = check_tower(tower, lambda batch: torch.from_numpy(TOP1_REF), lambda ids: TOP1_CAND * np.nan,
                             [torch.zeros(2, 3)], Tolerance(0.9, 0.5, 0.5), "test", anchors=TOP1_ANCHORS)
    assert non_finite.top1_agreement is None and not non_finite.passed


def test_check_tower_trims_only_the_candidates_ids():
    """The reference gets the full context, the candidate max EOT + 1 columns (pad id 0 by default)."""
    torch = pytest.importorskip("torch")
    ids = torch.tensor([[49406, 7, 49407, 0, 0, 0], [49406, 49407, 0, 0, 0, 0]])
    seen: dict[str, list[tuple[int, ...]]] = {"ref": [], "cand": []}

    def embed(x: np.ndarray) -> np.ndarray:  # a deterministic function of the ids' first three columns
        return np.asarray(x[:, :3], np.float64) + 1.0

    def reference(batch):
        seen["ref"].append(tuple(batch.shape))
        return torch.from_numpy(embed(batch.numpy()))

    def candidate(batch):
        seen["cand"].append(batch.shape)
        return embed(batch)

    parity = check_tower("text", reference, candidate, [ids], Tolerance(0.9, 0.1), "onnxruntime-cpu", trim=True)
    assert seen == {"ref": [(2, 6)], "cand": [(2, 3)]}
    assert parity.trimmed_lengths == [3] and parity.max_abs_err == 0.0 and parity.passed
    assert (parity.tower, parity.backend, parity.precision) == ("text", "onnxruntime-cpu", "fp32")
    check_tower("text", reference, candidate, [ids], Tolerance(0.9, 0.1), "b", precision="fp16")
    assert seen["cand"][-1] == (2, 6)  # no trim unless asked
    padded_with_one = check_tower("text", reference, candidate, [ids + (ids == 0)], Tolerance(0.9, 0.1), "b",
                                  trim=True, pad_id=1)
    assert padded_with_one.trimmed_lengths == [3]


def test_compare_measures_each_row_against_its_own_scale():
    ref = np.array([[3.0, 4.0, 0.0], [0.0, 0.5, 0.0]])
    cand = np.array([[3.0, 4.0, 0.3], [0.0, 0.5, 0.05]])
    got = compare(ref, cand, 2)
    assert got.batch_size == 2 and got.finite
    assert got.max_abs_err == pytest.approx(0.3)
    assert got.max_rel_err == pytest.approx(0.1)  # 0.3 / 4 = 0.075 and 0.05 / 0.5 = 0.1
    assert got.cosine_min == pytest.approx(min(25 / (5 * np.sqrt(25.09)), 0.25 / (0.5 * np.sqrt(0.2525))), abs=1e-12)


# -- attention fusion --------------------------------------------------------------------------

def _attention_graph(attention: int, softmax: int = 0, extra: list[onnx.NodeProto] | None = None) -> onnx.ModelProto:
    """q -> `attention` Attention nodes in a chain, then `softmax` Softmax nodes: counts only, never run."""
    nodes, last = [], "q"
    for i in range(attention):
        nodes.append(helper.make_node("Attention", [last, "k", "v"], [f"a{i}"], name=f"attn{i}"))
        last = f"a{i}"
    for i in range(softmax):
        nodes.append(helper.make_node("Softmax", [last], [f"s{i}"], name=f"softmax{i}", axis=-1))
        last = f"s{i}"
    nodes += extra or []
    value = [helper.make_tensor_value_info(n, F32, [1, 2, 4, 8]) for n in ("q", "k", "v")]
    graph = helper.make_graph(nodes, "g", value, [helper.make_tensor_value_info(last, F32, [1, 2, 4, 8])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])


def test_fusion_gate_accepts_exactly_one_fused_node_per_block():
    cfg = PassConfig(tower="text", precision="fp32", attention_blocks=3)
    model = _attention_graph(3)
    assert fuse_attention(model, cfg) is model
    assert cfg.details["attention"] == {"lowering": "onnx", "fused_nodes": 3, "blocks": 3, "ops": ["Attention"]}
    assert cfg.notes == ["3 fused attention nodes (Attention) for 3 blocks"]


@pytest.mark.parametrize(("attention", "softmax", "message"), [
    (2, 1, r"2 fused attention nodes for 2 attention blocks \(1 unfused Softmax left\)"),  # a stray Softmax
    (3, 0, r"3 fused attention nodes for 2 attention blocks \(0 unfused"),  # one fused node too many
    (1, 0, r"1 fused attention nodes for 2 attention blocks"),  # one too few
    (1, 1, r"1 fused attention nodes for 2 attention blocks \(1 unfused"),  # the classic half-fused graph
])
def test_fusion_gate_refuses_a_wrong_count_or_a_stray_softmax(attention, softmax, message):
    """Broken by: the Softmax count ignored, or the count compared with < / <= instead of !=."""
    cfg = PassConfig(tower="image", precision="fp32", attention_blocks=2)
    with pytest.raises(PassError, match=message) as caught:
        fuse_attention(_attention_graph(attention, softmax), cfg)
    assert str(caught.value).startswith("attention fusion on the image tower: ")
    assert str(caught.value).endswith("Build with --no-fuse-attention to export attention as plain MatMul/Softmax.")
    assert "attention" not in cfg.details and cfg.notes == []


def test_fusion_gate_counts_only_the_fused_ops():
    mha = helper.make_node("MultiHeadAttention", ["q", "k", "v"], ["m"], domain="com.microsoft", name="mha")
    foreign = [helper.make_node("Attention", ["q", "k", "v"], ["x"], domain="com.example", name="x"),
               helper.make_node("MultiHeadAttention", ["q", "k", "v"], ["y"], name="y")]  # default domain: not MHA
    onnx_domain = helper.make_node("Attention", ["q", "k", "v"], ["o"], domain="ai.onnx", name="explicit")
    model = _attention_graph(1, extra=[mha, *foreign, onnx_domain])
    assert [n.name for n in attention_nodes(model)] == ["attn0", "mha", "explicit"]
    cfg = PassConfig(tower="image", precision="fp32", attention_blocks=3)
    fuse_attention(model, cfg)
    assert cfg.details["attention"]["ops"] == ["Attention", "ai.onnx.Attention", "com.microsoft.MultiHeadAttention"]
    assert cfg.notes == [("3 fused attention nodes (Attention, ai.onnx.Attention, com.microsoft.MultiHeadAttention) "
                          "for 3 blocks")]
    none = PassConfig(tower="image", precision="fp32", attention_blocks=0)
    fuse_attention(_attention_graph(0), none)
    assert none.notes == ["0 fused attention nodes (none) for 0 blocks"]
    with pytest.raises(PassError, match="attention block count"):
        fuse_attention(model, PassConfig(tower="image", precision="fp32"))


def test_check_unfused_refuses_any_fused_node_and_counts_softmax():
    """Broken by: check_unfused never raising, or counting the wrong op."""
    cfg = PassConfig(tower="text", precision="fp32", attention_blocks=2)
    assert check_unfused(_attention_graph(0, softmax=3), cfg) == 3
    with pytest.raises(PassError, match="text tower: fusion is off but the graph has 1 fused attention nodes"):
        check_unfused(_attention_graph(1, softmax=1), cfg)


# -- fp16 range guard --------------------------------------------------------------------------

def _scaled_graph(scale: float, weight_peak: float | None = None) -> onnx.ModelProto:
    """x[1, 4] -> Mul(x, scale) -> m -> Relu -> r -> Mul(r, w) -> y: no final projection, nothing the policy keeps."""
    w = np.full((1, 4), 0.5, np.float32)
    if weight_peak is not None:
        w[0, 1] = weight_peak
        w[0, 2] = -np.inf  # a mask value is not a range: every float type holds inf
    nodes = [helper.make_node("Mul", ["x", "s"], ["m"], name="scale"),
             helper.make_node("Relu", ["m"], ["r"], name="relu"),
             helper.make_node("Mul", ["r", "w"], ["y"], name="weigh")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", F32, [1, 4])],
                              [helper.make_tensor_value_info("y", F32, [1, 4])],
                              [numpy_helper.from_array(np.array(scale, np.float32), "s"),
                               numpy_helper.from_array(w, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _node_types(model: onnx.ModelProto) -> dict[str, int]:
    """Compute type of each named node: the type of its first input in the converted graph."""
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    types = {v.name: v.type.tensor_type.elem_type for v in list(inferred.graph.value_info) + list(inferred.graph.input)}
    types.update({i.name: i.data_type for i in model.graph.initializer})
    return {n.name: types[n.input[0]] for n in model.graph.node if n.op_type != "Cast"}


LIMIT = FP16_MAX / PrecisionPolicy().fp16_headroom  # 16376 with the default headroom of 4


@pytest.mark.parametrize(("peak", "kept"), [
    (30000.0, True),  # inside fp16's range, but beyond 65504 / headroom: kept fp32
    (LIMIT * 1.001, True),
    (LIMIT, False),  # the bound itself fits
    (16000.0, False),  # just below: converted
])
def test_fp16_range_guard_applies_the_headroom(peak, kept):
    """Broken by: headroom ignored (limit 65504), applied the wrong way (65504 * 4), or > made >=."""
    model = _scaled_graph(1.0)
    report = PrecisionReport()
    out = convert_precision(model, "fp16", ranges={"m": peak}, report=report)
    onnx.checker.check_model(out)
    types = _node_types(out)
    # Relu reads m: kept fp32 when m is out of range, as is Mul "scale" that writes it
    assert report.kept_for_range == (["scale", "relu"] if kept else [])
    assert types["relu"] == (F32 if kept else F16) and types["weigh"] == F16
    assert (report.low_nodes, report.fp32_nodes) == ((1, 2) if kept else (3, 0))


def test_fp16_range_guard_follows_the_policys_headroom_and_ignores_bf16():
    report = PrecisionReport()
    convert_precision(_scaled_graph(1.0), "fp16", PrecisionPolicy(fp16_headroom=2.0), {"m": 30000.0}, report)
    assert report.kept_for_range == []  # 30000 < 65504 / 2
    convert_precision(_scaled_graph(1.0), "fp16", PrecisionPolicy(fp16_headroom=1.0), {"m": 70000.0}, report)
    assert report.kept_for_range == ["scale", "relu"]
    bf16 = PrecisionReport()
    convert_precision(_scaled_graph(1.0), "bf16", ranges={"m": 1e30}, report=bf16)
    assert bf16.kept_for_range == [] and bf16.low_nodes == 3


@pytest.mark.parametrize(("weight_peak", "kept"), [(20000.0, True), (LIMIT, False), (16000.0, False)])
def test_fp16_range_guard_reads_weight_peaks(weight_peak, kept):
    report = PrecisionReport()
    out = convert_precision(_scaled_graph(1.0, weight_peak), "fp16", ranges={}, report=report)
    assert report.kept_for_range == (["weigh"] if kept else [])
    weight = next(i for i in out.graph.initializer if i.name.startswith("w"))
    assert weight.data_type == (F32 if kept else F16)


def test_fp16_pass_calibrates_and_keeps_what_would_overflow():
    """The pipeline pass end to end on a hand-made graph: calibration -> ranges -> guard -> a graph that stays finite."""
    ort = pytest.importorskip("onnxruntime")
    x = np.array([[1.0, -2.0, 3.0, 2.0]], np.float32)
    # peaks of m and r: 24000 (> 16376: the three nodes touching them stay fp32) and 15000 (all fp16)
    for scale, note in ((8000.0, "0 nodes low precision, 3 fp32, 0 casts, 3 kept fp32 for fp16 range"),
                        (5000.0, "3 nodes low precision, 0 fp32, 2 casts")):
        cfg = PassConfig(tower="image", precision="fp16", calibration=[x])
        out = apply_precision(_scaled_graph(scale), cfg)
        assert cfg.notes == [f"precision fp16: {note}"]
        (got,) = ort.InferenceSession(out.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
        np.testing.assert_allclose(got, np.maximum(x * scale, 0) * 0.5, rtol=1e-3)
    with pytest.raises(PassError, match="calibration"):
        apply_precision(_scaled_graph(1.0), PassConfig(tower="image", precision="fp16"))


# -- int8 / fp8 scales -------------------------------------------------------------------------

# Columns (output channels) peak at 1.27 and 2.54: per-channel scales 1.27 / 127 and 2.54 / 127.
WEIGHT = np.array([[1.0, -0.5], [0.25, 2.54], [-1.27, 0.1]], np.float32)


def _matmul_graph(weight: np.ndarray = WEIGHT, op: str = "MatMul") -> onnx.ModelProto:
    """x -> Relu -> a -> MatMul|Gemm(a, W) -> h -> Relu -> y (the matmul is not the final projection)."""
    k, n = weight.shape if op == "MatMul" else weight.shape[::-1]
    attrs = {"transB": 1} if op == "Gemm" else {}
    nodes = [helper.make_node("Relu", ["x"], ["a"], name="in"),
             helper.make_node(op, ["a", "W"], ["h"], name="mm", **attrs),
             helper.make_node("Relu", ["h"], ["y"], name="out")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", F32, [1, k])],
                              [helper.make_tensor_value_info("y", F32, [1, n])],
                              [numpy_helper.from_array(weight, "W")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def _init(model: onnx.ModelProto, name: str) -> np.ndarray:
    return numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == name))


@pytest.mark.parametrize(("precision", "qmax"), [("int8", 127.0), ("fp8", 448.0)])
def test_activation_scale_is_the_calibrated_bound_over_qmax(precision, qmax):
    """Broken by: the activation scale doubled, or computed from qmax the wrong way round."""
    out = quantize_graph(_matmul_graph(), precision, {"a": 2.54})
    assert _init(out, "a/act_scale") == np.float32(2.54 / qmax)
    q, dq = (n for n in out.graph.node if n.output[0] in ("a/q", "a/dq"))
    assert (q.op_type, dq.op_type) == ("QuantizeLinear", "DequantizeLinear") and list(q.input) == ["a", "a/act_scale",
                                                                                                    "a/act_zero_point"]
    assert _init(out, "a/act_zero_point").item() == 0  # symmetric: TensorRT takes zero points of 0 only
    # a bound of 0 (a dead activation) must not divide by zero
    assert _init(quantize_graph(_matmul_graph(), precision, {"a": 0.0}), "a/act_scale") == 1.0
    with pytest.raises(PassError, match="no calibration range for activation 'a'"):
        quantize_graph(_matmul_graph(), precision, {})


def test_int8_weight_scale_is_per_output_channel_max_over_127():
    """Broken by: a per-channel scale doubled, taken over the wrong axis, or the rounding/clipping changed."""
    report = QuantReport()
    out = quantize_graph(_matmul_graph(), "int8", {"a": 1.0}, report=report)
    scale, q = _init(out, "W/scale"), _init(out, "W/q")
    np.testing.assert_array_equal(scale, np.array([1.27, 2.54], np.float32) / np.float32(127))
    assert q.dtype == np.int8
    np.testing.assert_array_equal(np.abs(q).max(axis=0), [127, 127])  # each channel's peak uses the full range
    np.testing.assert_array_equal(q, np.rint(WEIGHT / scale).astype(np.int8))
    (dq,) = (n for n in out.graph.node if n.output[0] == "W/dq")
    assert [a.i for a in dq.attribute if a.name == "axis"] == [1]  # MatMul B is [K, N]: channels on axis 1
    assert np.abs(q * scale - WEIGHT).max() <= scale.max() / 2
    assert "W" not in {i.name for i in out.graph.initializer}  # the fp32 copy is gone
    assert report.quantized_ops == {"MatMul": 1} and report.activation_tensors == 1
    assert report.weight_bytes_before == WEIGHT.nbytes and report.weight_bytes_after < report.weight_bytes_before


def test_gemm_with_transposed_weight_scales_rows_and_zero_columns_get_scale_one():
    weight = np.array([[0.0, 0.0, 0.0], [0.5, -2.54, 1.0]], np.float32)  # Gemm transB: [N, K], channel 0 all zero
    out = quantize_graph(_matmul_graph(weight, "Gemm"), "int8", {"a": 1.0})
    np.testing.assert_array_equal(_init(out, "W/scale"), np.array([1.0, 2.54 / 127], np.float32))
    np.testing.assert_array_equal(_init(out, "W/q")[0], [0, 0, 0])
    plain = _matmul_graph(WEIGHT, "Gemm")  # the same Gemm without transB: W is [K, N], channels on axis 1
    plain.graph.node[1].ClearField("attribute")
    plain.graph.input[0].type.tensor_type.shape.dim[1].dim_value = 3
    plain.graph.output[0].type.tensor_type.shape.dim[1].dim_value = 2
    plain_out = quantize_graph(plain, "int8", {"a": 1.0})
    np.testing.assert_array_equal(_init(plain_out, "W/scale"), np.array([1.27, 2.54], np.float32) / np.float32(127))
    (plain_dq,) = (n for n in plain_out.graph.node if n.output[0] == "W/dq")
    assert [a.i for a in plain_dq.attribute if a.name == "axis"] == [1]
    (dq,) = (n for n in out.graph.node if n.output[0] == "W/dq")
    assert [a.i for a in dq.attribute if a.name == "axis"] == [0]


def test_quantize_pass_takes_int8_scales_from_the_quantile_and_fp8_from_the_peak():
    """The pipeline pass on a hand-made graph: calibration -> bound -> scale = bound / qmax."""
    pytest.importorskip("onnxruntime")
    # a = relu(x) = [2, 2, 10]: its median (the policy's quantile here) is 2, its peak 10
    x = np.array([[2.0, 2.0, 10.0]], np.float32)
    policy = QuantPolicy(activation_quantile=0.5)
    cfg = PassConfig(tower="image", precision="int8", calibration=[x], quant_policy=policy)
    out = quantize(_matmul_graph(), cfg)
    assert _init(out, "a/act_scale") == np.float32(2.0 / 127)  # the median of |a| = 2, not the peak 10
    assert cfg.details["quantize"]["quantized_ops"] == {"MatMul": 1}
    fp8 = quantize(_matmul_graph(), PassConfig(tower="image", precision="fp8", calibration=[x], quant_policy=policy))
    assert _init(fp8, "a/act_scale") == np.float32(10.0 / 448)
    assert quantize(_matmul_graph(), PassConfig(tower="image", precision="fp16")).graph.node[1].op_type == "MatMul"
    with pytest.raises(PassError, match="int8 quantization needs calibration"):
        quantize(_matmul_graph(), PassConfig(tower="image", precision="int8"))


def _mixed_graph() -> onnx.ModelProto:
    """Every kind of MatMul the pass meets, in one graph:

        x ─Relu─► a ─┬─ MatMul(W) ─► h ──┐                  (quantized; `a` feeds two MatMuls with W:
                     └─ MatMul(W) ─► h2 ─┴─ Add ─► s          one Q/DQ pair, one weight DQ)
        Shape(x) ─► Expand(c) ─► e ─ MatMul(V) ─► b ─► Add(s, b) ─► t      (batch-broadcast: skipped)
        Transpose(t) ─► tT ─ MatMul(tT, t) ─► p ─Relu─► r                   (activation x activation: skipped)
        r ─ MatMul(P) ─► y                                                   (final projection: skipped)
    """
    rng = np.random.default_rng(0)
    inits = {"W": rng.standard_normal((3, 2)), "V": rng.standard_normal((3, 2)), "P": rng.standard_normal((2, 2)),
             "c": rng.standard_normal((1, 3))}
    nodes = [helper.make_node("Relu", ["x"], ["a"]),
             helper.make_node("MatMul", ["a", "W"], ["h"]), helper.make_node("MatMul", ["a", "W"], ["h2"]),
             helper.make_node("Add", ["h", "h2"], ["s"]),
             helper.make_node("Shape", ["x"], ["sh"]), helper.make_node("Expand", ["c", "sh"], ["e"]),
             helper.make_node("MatMul", ["e", "V"], ["b"]), helper.make_node("Add", ["s", "b"], ["t"]),
             helper.make_node("Transpose", ["t"], ["tT"]), helper.make_node("MatMul", ["tT", "t"], ["p"]),
             helper.make_node("MatMul", ["p", "p"], ["pp"]), helper.make_node("Relu", ["pp"], ["r"]), helper.make_node("MatMul", ["r", "P"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", F32, [1, 3])],
                              [helper.make_tensor_value_info("y", F32, [2, 2])],
                              [numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def test_quantize_skips_what_it_must_and_says_why():
    """Broken by: a skip reason or count mixed up, a shared activation or weight quantized twice."""
    from clipexport.passes.quantize import activation_inputs

    model = _mixed_graph()
    assert activation_inputs(model, QuantPolicy()) == ["a", "r"]  # not e (broadcast), not tT (no weight)
    report = QuantReport()
    out = quantize_graph(model, "int8", {"a": 1.27, "r": 2.54}, report=report)
    onnx.checker.check_model(out, full_check=True)
    assert report.quantized_ops == {"MatMul": 2} and report.activation_tensors == 1
    assert report.skipped_ops == {"MatMul (batch-broadcast constant)": 1, "MatMul (no weight (activation x activation))": 2,
                                  "MatMul (final projection)": 1}
    ops = [n.op_type for n in out.graph.node]
    assert ops.count("QuantizeLinear") == 1 and ops.count("DequantizeLinear") == 2  # a's pair + W's
    assert {n.name for n in out.graph.node if n.op_type == "DequantizeLinear"} == {"DQ_a", "DQ_W"}
    matmuls = [list(n.input) for n in out.graph.node if n.op_type == "MatMul"]
    assert matmuls == [["a/dq", "W/dq"], ["a/dq", "W/dq"], ["e", "V"], ["tT", "t"], ["p", "p"], ["r", "P"]]
    assert {"V", "P", "c"} <= {i.name for i in out.graph.initializer} and "W" not in {i.name for i in out.graph.initializer}
    assert report.describe() == (f"int8 Q/DQ on MatMul 2; 1 activation scales; weights "
                                 f"{report.weight_bytes_before / 2**20:.1f} -> {report.weight_bytes_after / 2**20:.1f} MiB "
                                 f"({report.weight_bytes_before / report.weight_bytes_after:.2f}x smaller)")
    assert report.weight_bytes_before == 4 * (6 + 6 + 4 + 3)
    assert report.weight_bytes_after == 4 * (6 + 4 + 3) + 6 + 4 * 2 + 2 + 4 + 1  # V P c, W q/scale/zp, a scale/zp
    everything = QuantReport()
    quantize_graph(model, "int8", {"a": 1.0, "r": 1.0}, QuantPolicy(keep_final_projection=False), everything)
    assert everything.quantized_ops == {"MatMul": 3} and everything.activation_tensors == 2 and "MatMul (final projection)" not in everything.skipped_ops
    ort = pytest.importorskip("onnxruntime")
    x = np.array([[0.5, -1.0, 1.2]], np.float32)
    run = lambda m: ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(run(out), run(model), rtol=0.05, atol=0.05)


def test_quantize_pass_records_what_it_did():
    pytest.importorskip("onnxruntime")
    x = np.array([[2.0, 2.0, 10.0]], np.float32)
    cfg = PassConfig(tower="image", precision="int8", calibration=[x, x], quant_policy=QuantPolicy(activation_quantile=0.5))
    quantize(_matmul_graph(), cfg)
    details = cfg.details["quantize"]
    assert details["precision"] == "int8" and details["policy"]["activation_quantile"] == 0.5
    assert details["quantized_ops"] == {"MatMul": 1} and details["not_quantized"] == {}
    assert details["activation_scales"] == 1 and details["calibration_items"] == 2
    assert details["weight_bytes"]["before"] == WEIGHT.nbytes and 0 < details["weight_bytes"]["after"] < WEIGHT.nbytes
    assert cfg.notes and cfg.notes[0].startswith("int8 Q/DQ on MatMul 1; 1 activation scales")


def _embedding_graph(consumers: int = 1) -> onnx.ModelProto:
    table = np.array([[0.5, -2.54], [1.27, 0.1], [-0.2, 1.0], [0.0, 2.0]], np.float32)
    nodes = [helper.make_node("Gather", ["E", "ids"], ["g"], name="embed"), helper.make_node("Relu", ["g"], ["y"])]
    outputs = [helper.make_tensor_value_info("y", F32, [1, 3, 2])]
    if consumers == 2:
        nodes.append(helper.make_node("Gather", ["E", "ids"], ["g2"], name="again"))
        outputs.append(helper.make_tensor_value_info("g2", F32, [1, 3, 2]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 3])], outputs,
                              [numpy_helper.from_array(table, "E")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def test_token_embedding_is_gathered_as_int8_and_dequantized_per_column():
    report = QuantReport()
    out = quantize_graph(_embedding_graph(), "int8", {}, report=report)
    assert report.quantized_ops == {"Gather": 1} and report.activation_tensors == 0
    np.testing.assert_array_equal(_init(out, "E/scale"), np.array([1.27, 2.54], np.float32) / np.float32(127))
    assert _init(out, "E/q").dtype == np.int8 and "E" not in {i.name for i in out.graph.initializer}
    gather, dq = out.graph.node[0], out.graph.node[1]
    assert (list(gather.input), list(gather.output)) == (["E/q", "ids"], ["g/q"])
    assert (dq.op_type, list(dq.input), list(dq.output)) == ("DequantizeLinear", ["g/q", "E/scale", "E/zero_point"], ["g"])
    assert [a.i for a in dq.attribute if a.name == "axis"] == [-1]
    onnx.checker.check_model(out, full_check=True)
    ort = pytest.importorskip("onnxruntime")
    ids = np.array([[3, 0, 1]], np.int64)
    (got,) = ort.InferenceSession(out.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"ids": ids})
    table = _init(_embedding_graph(), "E")
    np.testing.assert_allclose(got, np.maximum(table[ids], 0), atol=2.54 / 127 / 2 + 1e-7)
    # not for fp8 (no fp8 Gather on onnxruntime), not when the policy says so, not for a table read twice
    for model, precision, policy in [(_embedding_graph(), "fp8", QuantPolicy()),
                                     (_embedding_graph(), "int8", QuantPolicy(quantize_embedding=False)),
                                     (_embedding_graph(2), "int8", QuantPolicy())]:
        untouched = QuantReport()
        kept = quantize_graph(model, precision, {}, policy, untouched)
        assert untouched.quantized_ops == {} and kept.graph.node[0].op_type == "Gather"
        assert "E" in {i.name for i in kept.graph.initializer}


def test_fp8_weights_and_conv_channels():
    """fp8: E4M3 values and zero points, each channel's peak at 448; Conv: output channels on axis 0."""
    weight = np.array([[[[1.0, -4.48], [0.5, 0.0]]], [[[0.1, 0.2], [-0.3, 0.05]]]], np.float32)  # [2, 1, 2, 2]
    nodes = [helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Conv", ["a", "W"], ["c"]),
             helper.make_node("Relu", ["c"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", F32, [1, 1, 3, 3])],
                              [helper.make_tensor_value_info("y", F32, [1, 2, 2, 2])], [numpy_helper.from_array(weight, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    out = quantize_graph(model, "fp8", {"a": 1.0})
    np.testing.assert_array_equal(_init(out, "W/scale"), np.array([4.48, 0.3], np.float32) / np.float32(448))
    inits = {i.name: i for i in out.graph.initializer}
    for name in ("W/q", "W/zero_point", "a/act_zero_point"):
        assert inits[name].data_type == TensorProto.FLOAT8E4M3FN
    q = _init(out, "W/q").astype(np.float32)
    np.testing.assert_array_equal(np.abs(q).reshape(2, -1).max(axis=1), [448, 448])
    (dq,) = (n for n in out.graph.node if n.output[0] == "W/dq")
    assert [a.i for a in dq.attribute if a.name == "axis"] == [0]
    int8 = quantize_graph(model, "int8", {"a": 0.5})
    assert _init(int8, "a/act_scale") == np.float32(0.5 / 127)  # a bound under 1 is still a bound
    assert inits["W/zero_point"].dims == [2]
    with pytest.raises(PassError, match="unknown precision 'int4'"):
        quantize_graph(model, "int4", {})


# -- Triton dims -------------------------------------------------------------------------------

def test_tensor_spec_keeps_each_axis_in_place():
    """Broken by: dims reordered or the batch axis kept; symbolic and unknown sizes become -1."""
    from clipexport.triton.config import TensorSpec

    spec = TensorSpec.from_manifest({"name": "pixel_values", "dtype": "float32", "shape": ["batch", 3, 224, 336]}, "t")
    assert spec == TensorSpec("pixel_values", "float32", (3, 224, 336))
    ids = TensorSpec.from_manifest({"name": "input_ids", "dtype": "int64", "shape": ["batch", "sequence"]}, "t")
    assert ids.dims == (-1,)
    assert TensorSpec.from_manifest({"name": "x", "dtype": "float16", "shape": ["b", 0, 77]}, "t").dims == (-1, 77)
    assert TensorSpec.from_manifest({"name": "x", "dtype": "float32", "shape": ["b", 1, 77]}, "t").dims == (1, 77)
    for bad, message in [({"name": "x", "dtype": "float32", "shape": [1, 3]}, "no dynamic batch axis"),
                         ({"name": "x", "dtype": "string", "shape": ["b"]}, "no Triton type"),
                         ({"name": "x", "shape": ["b"]}, "malformed")]:
        with pytest.raises(ArtifactError, match=message):
            TensorSpec.from_manifest(bad, "t")


@pytest.mark.parametrize(("graph", "expected", "fits"), [
    ((3, 224, 336), (3, 224, 336), True),
    ((3, -1, -1), (3, 224, 336), True),  # a graph with dynamic spatial axes takes any size
    ((3, 336, 224), (3, 224, 336), False),  # transposed: a non-square size must not pass
    ((3, 224), (3, 224, 336), False),
    ((77,), (77,), True),
    ((-1,), (76,), True),  # the trimmed text graph: any length
    ((77,), (76,), False),  # a graph for 77 tokens, a tokenizer making 76
])
def test_dims_check_compares_every_axis(graph, expected, fits):
    """Broken by: only the rank compared, or a fixed axis accepted for any size."""
    from clipexport.triton.config import TensorSpec
    from clipexport.triton.repository import _check_dims

    spec = TensorSpec("x", "float32", graph)
    if fits:
        _check_dims(spec, expected, "{}")
    else:
        with pytest.raises(ArtifactError, match=r"manifest \[" + ", ".join(str(d) for d in graph)):
            _check_dims(spec, expected, "{}")


# -- Triton configs ----------------------------------------------------------------------------

def _pb2():
    return pytest.importorskip("tritonclient.grpc.model_config_pb2")


def test_batching_from_the_manifests_batch_profile():
    from clipexport.errors import UsageError
    from clipexport.triton.config import Batching

    assert Batching.from_manifest({"min": 1, "opt": 8, "max": 32}, 100) == Batching(32, (8, 32), 100)
    assert Batching.from_manifest({"min": 1, "opt": 4, "max": 4}, 0) == Batching(4, (4,), 0)
    assert Batching.from_manifest({"opt": 1, "max": 1}, 5).preferred == (1,)
    for bad in ({"min": 1, "opt": 0, "max": 4}, {"min": 1, "opt": 8, "max": 4}, {"opt": 2}, None, {"opt": "x", "max": 2}):
        with pytest.raises(ArtifactError, match="manifest batch"):
            Batching.from_manifest(bad, 100)
    with pytest.raises(UsageError, match="--max-queue-delay -1"):
        Batching.from_manifest({"opt": 1, "max": 2}, -1)


def test_instances_are_checked():
    from clipexport.errors import UsageError
    from clipexport.triton.config import Instances

    assert Instances(3, "cpu") == Instances(count=3, kind="cpu") and Instances() == Instances(1, "gpu")
    Instances(1, "gpu")
    for count, kind, message in [(0, "gpu", "--instances 0"), (True, "gpu", "--instances True"),
                                 (1.5, "gpu", "--instances 1.5"), (1, "tpu", "--kind 'tpu'")]:
        with pytest.raises(UsageError, match=message):
            Instances(count, kind)  # type: ignore[arg-type]


def test_tower_config_is_the_graph_with_its_dims_and_batching():
    from clipexport.errors import UsageError
    from clipexport.triton.config import Batching, Instances, TensorSpec, to_pbtxt, tower_config

    pb2 = _pb2()
    inputs = [TensorSpec("pixel_values", "float16", (3, 224, 336))]
    outputs = [TensorSpec("image_embeds", "float32", (512,)), TensorSpec("ids", "int64", (-1,))]
    batching = Batching(16, (4, 16), 250)
    config = tower_config("enc", "onnxruntime_onnx", inputs, outputs, batching, Instances(2, "cpu"))
    assert (config.name, config.platform, config.max_batch_size, config.default_model_filename) == (
        "enc", "onnxruntime_onnx", 16, "model.onnx")
    assert [(t.name, pb2.DataType.Name(t.data_type), list(t.dims)) for t in config.input] == [
        ("pixel_values", "TYPE_FP16", [3, 224, 336])]
    assert [(t.name, pb2.DataType.Name(t.data_type), list(t.dims)) for t in config.output] == [
        ("image_embeds", "TYPE_FP32", [512]), ("ids", "TYPE_INT64", [-1])]
    assert [(g.count, g.kind) for g in config.instance_group] == [(2, pb2.ModelInstanceGroup.KIND_CPU)]
    assert list(config.dynamic_batching.preferred_batch_size) == [4, 16]
    assert config.dynamic_batching.max_queue_delay_microseconds == 250
    plan = tower_config("enc", "tensorrt_plan", inputs, outputs, batching, Instances())
    assert plan.default_model_filename == "model.plan"
    assert [(g.count, g.kind) for g in plan.instance_group] == [(1, pb2.ModelInstanceGroup.KIND_GPU)]
    with pytest.raises(UsageError, match="platform 'tensorflow_savedmodel'"):
        tower_config("enc", "tensorflow_savedmodel", inputs, outputs, batching, Instances())
    text = to_pbtxt(plan, ["written by a test", "two\nlines"])
    assert text.startswith("# written by a test\n# two lines\nname: \"enc\"\nplatform: \"tensorrt_plan\"\n")
    from google.protobuf import text_format

    assert text_format.Parse(text, pb2.ModelConfig()) == plan


def test_python_and_ensemble_configs():
    from clipexport.triton.config import Batching, Instances, Step, TensorSpec, ensemble_config, python_config

    pb2 = _pb2()
    raw, ids = TensorSpec("text", "string", (1,)), TensorSpec("input_ids", "int32", (77,))
    batching = Batching(8, (8,), 100)
    py = python_config("tok", [raw], [ids], batching, Instances(3, "gpu"))
    assert (py.name, py.backend, py.platform, py.max_batch_size) == ("tok", "python", "", 8)
    assert [(t.name, pb2.DataType.Name(t.data_type), list(t.dims)) for t in py.input] == [("text", "TYPE_STRING", [1])]
    assert [(t.name, pb2.DataType.Name(t.data_type), list(t.dims)) for t in py.output] == [
        ("input_ids", "TYPE_INT32", [77])]
    assert [(g.count, g.kind) for g in py.instance_group] == [(3, pb2.ModelInstanceGroup.KIND_CPU)]  # always CPU
    assert list(py.dynamic_batching.preferred_batch_size) == [8]
    embedding = TensorSpec("embedding", "bfloat16", (512,))
    steps = [Step("tok", {"text": "text"}, {"input_ids": "input_ids"}),
             Step("enc", {"input_ids": "input_ids"}, {"text_embeds": "embedding"})]
    ens = ensemble_config("clip_text", [raw], [embedding], batching, steps)
    assert (ens.name, ens.platform, ens.max_batch_size, len(ens.instance_group)) == ("clip_text", "ensemble", 8, 0)
    assert not ens.HasField("dynamic_batching")
    assert [(t.name, pb2.DataType.Name(t.data_type)) for t in ens.output] == [("embedding", "TYPE_BF16")]
    assert [(s.model_name, s.model_version, dict(s.input_map), dict(s.output_map))
            for s in ens.ensemble_scheduling.step] == [
        ("tok", -1, {"text": "text"}, {"input_ids": "input_ids"}),
        ("enc", -1, {"input_ids": "input_ids"}, {"text_embeds": "embedding"})]


def test_configs_without_tritonclient_say_how_to_get_it(monkeypatch):
    import sys

    from clipexport.errors import UsageError
    from clipexport.triton.config import model_config_pb2

    assert model_config_pb2() is _pb2()
    monkeypatch.setitem(sys.modules, "tritonclient.grpc", None)  # as if tritonclient were not installed
    with pytest.raises(UsageError, match=r"pip install 'clipexport\[triton\]'"):
        model_config_pb2()


# -- calibration -------------------------------------------------------------------------------

def _mask_graph() -> onnx.ModelProto:
    """x[N, 4] -> Mul(x, 3) -> m -> Add(m, mask) -> y, mask = [0, 0, 0, -inf] (as attention masks hold)."""
    mask = np.array([[0.0, 0.0, 0.0, -np.inf]], np.float32)
    nodes = [helper.make_node("Mul", ["x", "three"], ["m"]), helper.make_node("Add", ["m", "mask"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", F32, ["n", 4])],
                              [helper.make_tensor_value_info("y", F32, ["n", 4])],
                              [numpy_helper.from_array(np.array(3.0, np.float32), "three"),
                               numpy_helper.from_array(mask, "mask")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_calibration_keeps_each_tensors_peak_and_largest_quantile_over_items():
    """Broken by: a peak or quantile kept from one item instead of the largest, -inf taken as a range, items batched."""
    pytest.importorskip("onnxruntime")
    from clipexport.passes.calibrate import collect_stats

    first = np.array([[1.0, -1.0, 1.0, 1.0], [0.5, 0.5, -4.0, 0.5]], np.float32)  # two items
    second = np.array([[-2.0, 2.0, 2.0, -2.0]], np.float32)
    stats = collect_stats(_mask_graph(), [first, second], quantile=0.5)
    assert stats.runs == 3
    assert stats.max_abs == {"m": 12.0, "y": 12.0}  # y's -inf column is a mask, not a range
    assert stats.quantile_abs == {"m": 6.0, "y": 6.0}  # medians per item: 3, 1.5, 6 -> the largest
    small = collect_stats(_mask_graph(), [np.full((1, 4), 0.1, np.float32)], quantile=0.5)
    assert small.max_abs["m"] == pytest.approx(0.3) and small.quantile_abs["m"] == pytest.approx(0.3)  # not floored at 1
    only = collect_stats(_mask_graph(), [second], tensors=["m"])
    assert only.max_abs == {"m": 6.0} and only.quantile_abs == {} and only.runs == 1
    with pytest.raises(PassError, match="at least one sample"):
        collect_stats(_mask_graph(), [])
