"""The TensorRT-compatibility gate: which TensorRT releases can parse a graph, and what blocks the others.

Runs on every build, without TensorRT: the graph's operators, opset, data types, attributes and
optimization profile are checked against support_matrix.toml (per targeted release, with the
source each rule came from). The verdict goes into the manifest per tower (`tensorrt`):

    graph ─► findings (node, op, reason, parses_from: release | None = never)
          ─► min_release: the oldest targeted release no finding blocks
          ─► min_release_with_plugin: the same once our attention-plugin pass replaced
             the ONNX Attention nodes (TensorRT < 10.14 has no Attention import)

and the engine step uses it (choose_attention): refuse up front when the installed TensorRT
is below what the graph needs even with the plugin; pick the plugin pass when only that makes
the graph parse.
"""

from __future__ import annotations

import functools
import shlex
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import tomllib

from clipexport.errors import EngineError

if TYPE_CHECKING:
    import onnx

    from clipexport.recipes import BatchRange
    from clipexport.trt.profiles import InputProfile

MATRIX_PATH = Path(__file__).with_name("support_matrix.toml")
ONNX_DOMAINS = ("", "ai.onnx")
RULE_KINDS = ("zero_input", "input_not_dtype", "rank_inputs", "absent_inputs", "absent_outputs", "attr_absent",
              "attr_equals", "const_input", "max_outputs")
NODES_SHOWN = 3  # node names kept per finding; the count says how many there are


def release_tuple(text: str) -> tuple[int, ...]:
    """`10.14` / `10.14.1.48` -> (10, 14) / (10, 14, 1, 48)."""
    from clipexport.trt.env import version_tuple

    parsed = version_tuple(text)
    if not parsed:
        raise EngineError(f"not a TensorRT release: {text!r}")
    return parsed


@dataclass(frozen=True)
class SupportMatrix:
    """support_matrix.toml, validated."""

    schema: int
    targets: tuple[str, ...]
    sources: dict[str, str]
    baseline: frozenset[str]
    unsupported: frozenset[str]
    since: dict[str, tuple[str, str]]  # op (or domain::op) -> (release, source)
    opset_documented: dict[str, tuple[int, str, bool]]  # release -> (max opset, source, assumed)
    dtypes_supported: frozenset[str]
    dtypes_io_only: frozenset[str]
    dtypes_cast_down: frozenset[str]
    dtypes_since: dict[str, str]
    rules: tuple[dict[str, Any], ...]
    max_dim: int

    def label(self) -> str:
        return f"clipexport/trt/{MATRIX_PATH.name} (schema {self.schema})"


@functools.lru_cache(maxsize=4)
def load_matrix(path: Path = MATRIX_PATH) -> SupportMatrix:
    """Load and check the matrix: an unknown key, rule kind or source name is an error naming it."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
        sources = {str(k): str(v) for k, v in data["sources"].items()}
        targets = tuple(str(t) for t in data["targets"])
        if [release_tuple(t) for t in targets] != sorted(release_tuple(t) for t in targets):
            raise EngineError(f"{path.name}: targets must be oldest first")

        def known(source: str, where: str) -> str:
            for part in source.split(";"):
                name = part.strip().split(" ")[0]
                if name not in sources:
                    raise EngineError(f"{path.name}: {where} names an unknown source {name!r}")
            return source

        rules = tuple(dict(r) for r in data.get("rules", []))
        for rule in rules:
            if rule.get("kind") not in RULE_KINDS:
                raise EngineError(f"{path.name}: rule for {rule.get('op')!r} has unknown kind {rule.get('kind')!r}")
            known(str(rule["source"]), f"rule {rule['op']}/{rule['kind']}")
        since = {str(op): (str(v["release"]), known(str(v["source"]), f"since.{op}")) for op, v in data["since"].items()}
        opsets = {str(r): (int(v["max"]), known(str(v["source"]), f"opset_documented.{r}"), bool(v.get("assumed", False)))
                  for r, v in data["opset_documented"].items()}
        dtypes = data["dtypes"]
        return SupportMatrix(
            schema=int(data["schema"]), targets=targets, sources=sources,
            baseline=frozenset(data["baseline"]["ops"]), unsupported=frozenset(data["baseline"]["unsupported"]),
            since=since, opset_documented=opsets,
            dtypes_supported=frozenset(dtypes["supported"]), dtypes_io_only=frozenset(dtypes["io_only"]),
            dtypes_cast_down=frozenset(dtypes["cast_down"]), dtypes_since=dict(dtypes.get("since", {})),
            rules=rules, max_dim=int(data["profile"]["max_dim"]),
        )
    except (KeyError, TypeError, ValueError, tomllib.TOMLDecodeError) as exc:
        raise EngineError(f"{path}: malformed TensorRT support matrix ({exc!r})") from None


@dataclass
class Finding:
    """Nodes (or tensors) that keep releases before `parses_from` from parsing the graph (None: all)."""

    op: str
    reason: str
    source: str
    parses_from: str | None
    nodes: list[str] = field(default_factory=list)

    def key(self) -> tuple[str, str, str | None]:
        return (self.op, self.reason, self.parses_from)

    def to_json(self) -> dict[str, Any]:
        return {"op": self.op, "count": len(self.nodes), "nodes": self.nodes[:NODES_SHOWN],
                "parses_from": self.parses_from, "reason": self.reason, "source": self.source}


class _Graph:
    """Lookups over one graph (shape-inferred, weights not loaded)."""

    def __init__(self, model: onnx.ModelProto, base_dir: Path | None) -> None:
        import onnx

        try:
            model = onnx.shape_inference.infer_shapes(model)
        except Exception:  # noqa: BLE001 - ranks and dtypes are then known only where the graph states them
            pass
        self.graph = model.graph
        self.base_dir = base_dir
        self.initializers = {t.name: t for t in model.graph.initializer}
        self.constants = {n.output[0]: n for n in model.graph.node if n.op_type == "Constant" and n.output}
        self.io = {v.name for v in model.graph.input} | {v.name for v in model.graph.output}
        self.types: dict[str, int] = {}
        self.ranks: dict[str, int] = {}
        for v in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
            tt = v.type.tensor_type
            if tt.elem_type:
                self.types[v.name] = tt.elem_type
            if tt.HasField("shape"):
                self.ranks[v.name] = len(tt.shape.dim)
        for t in model.graph.initializer:
            self.types[t.name] = t.data_type
            self.ranks[t.name] = len(t.dims)
        self.used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}

    def constant_values(self, name: str) -> Any | None:
        """A constant input's values as numpy, or None when it is computed at run time."""
        from onnx import numpy_helper

        if name in self.initializers:
            tensor = self.initializers[name]
            if tensor.data_location == 1 and self.base_dir is not None:  # EXTERNAL: load just this tensor
                from onnx.external_data_helper import load_external_data_for_tensor

                copy = type(tensor)()
                copy.CopyFrom(tensor)
                load_external_data_for_tensor(copy, str(self.base_dir))
                tensor = copy
            return numpy_helper.to_array(tensor)
        node = self.constants.get(name)
        if node is not None:
            for attr in node.attribute:
                if attr.name == "value":
                    return numpy_helper.to_array(attr.t)
        return None

    def dtype_name(self, name: str) -> str | None:
        import onnx

        code = self.types.get(name)
        return onnx.TensorProto.DataType.Name(code) if code else None


def _op_key(node: onnx.NodeProto) -> str:
    return node.op_type if node.domain in ONNX_DOMAINS else f"{node.domain}::{node.op_type}"


def _label(node: onnx.NodeProto, index: int) -> str:
    return node.name or f"{node.op_type}#{index}"


def _given(node: onnx.NodeProto, index: int) -> str | None:
    return node.input[index] if index < len(node.input) and node.input[index] else None


def _attr(node: onnx.NodeProto, name: str) -> Any:
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return None


def _rule_violated(rule: dict[str, Any], node: onnx.NodeProto, g: _Graph) -> bool:
    kind = rule["kind"]
    if kind == "zero_input":
        name = _given(node, int(rule["index"]))
        if name is None:
            return False
        values = g.constant_values(name)
        return values is None or bool((values != 0).any())  # a computed zero point cannot be proven zero
    if kind == "input_not_dtype":
        name = _given(node, int(rule["index"]))
        return name is not None and g.dtype_name(name) == rule["dtype"]
    if kind == "rank_inputs":
        return any((n := _given(node, i)) is not None and n in g.ranks and g.ranks[n] != int(rule["rank"])
                   for i in rule["inputs"])
    if kind == "absent_inputs":
        return any(_given(node, int(i)) is not None for i in rule["inputs"])
    if kind == "absent_outputs":
        return any(int(i) < len(node.output) and node.output[int(i)] in g.used for i in rule["outputs"])
    if kind == "attr_absent":
        return any(_attr(node, a) not in (None, 0, 0.0) for a in rule["attrs"])
    if kind == "attr_equals":
        value = _attr(node, str(rule["attr"]))
        return value is not None and value != rule["value"]
    if kind == "const_input":
        name = _given(node, int(rule["index"]))
        return name is not None and name not in g.initializers and name not in g.constants
    if kind == "max_outputs":
        return sum(1 for o in node.output[int(rule["count"]):] if o and o in g.used) > 0
    raise EngineError(f"unknown rule kind {kind!r}")


def graph_findings(model: onnx.ModelProto, matrix: SupportMatrix | None = None,
                   base_dir: Path | None = None) -> tuple[list[Finding], list[str]]:
    """(findings that block releases, notes that do not) for one graph."""
    m = matrix or load_matrix()
    g = _Graph(model, base_dir)
    found: dict[tuple[str, str, str | None], Finding] = {}
    notes: list[str] = []

    def add(op: str, reason: str, source: str, parses_from: str | None, node: str) -> None:
        finding = found.setdefault((op, reason, parses_from), Finding(op, reason, source, parses_from))
        finding.nodes.append(node)

    rules_by_op: dict[str, list[dict[str, Any]]] = {}
    for rule in m.rules:
        rules_by_op.setdefault(str(rule["op"]), []).append(rule)
    for i, node in enumerate(g.graph.node):
        key, label = _op_key(node), _label(node, i)
        if key in m.since:
            release, source = m.since[key]
            add(key, f"{key} is parsed from TensorRT {release} on", source, release, label)
        elif key in m.unsupported:
            add(key, f"{key} is not supported by TensorRT's ONNX parser", "ops-10_1", None, label)
        elif key not in m.baseline:
            where = "a custom domain: it needs a TensorRT plugin of that name" if node.domain not in ONNX_DOMAINS \
                else "not in the operator matrix"
            add(key, f"{key} is {where}", "ops-10_1; ops-10_15", None, label)
        for rule in rules_by_op.get(key, []):
            if _rule_violated(rule, node, g):
                add(key, f"{key}: {rule['reason']}", str(rule["source"]), None, label)

    for name, code in sorted(g.types.items()):
        dtype = g.dtype_name(name) or str(code)
        if dtype in m.dtypes_supported:
            continue
        if dtype in m.dtypes_since:
            add(f"dtype {dtype}", f"{dtype} tensors parse from TensorRT {m.dtypes_since[dtype]} on", "ops-10_15",
                m.dtypes_since[dtype], name)
        elif dtype in m.dtypes_io_only:
            if name not in g.io:
                add(f"dtype {dtype}", f"{dtype} only as a network input or output", "ops-10_1", None, name)
        elif dtype in m.dtypes_cast_down:
            notes.append(f"{name} is {dtype}: TensorRT casts it down to FLOAT (clamped to +-FLT_MAX)")
        else:
            add(f"dtype {dtype}", f"TensorRT has no {dtype} tensors", "ops-10_1; ops-10_15", None, name)

    opset = graph_opset(model)
    over = [r for r in m.targets if opset > documented_opset(m, r)[0]]
    if over:
        top, source, assumed = documented_opset(m, over[0])
        notes.append(f"opset {opset} is above the range documented for TensorRT {over[0]}"
                     + (f"..{over[-1]}" if len(over) > 1 else "")
                     + f" (up to {top}, {source}{', assumed' if assumed else ''}); the parser warns, it does not refuse")
    return list(found.values()), notes


def graph_opset(model: onnx.ModelProto) -> int:
    return max((o.version for o in model.opset_import if o.domain in ONNX_DOMAINS), default=0)


def documented_opset(m: SupportMatrix, release: str) -> tuple[int, str, bool]:
    """The highest opset documented for `release`: the newest documented release at or below it."""
    best = None
    for r, entry in m.opset_documented.items():
        if release_tuple(r) <= release_tuple(release) and (best is None or release_tuple(r) > release_tuple(best[0])):
            best = (r, entry)
    if best is None:
        raise EngineError(f"support matrix documents no opset range at or below TensorRT {release}")
    return best[1]


def profile_findings(profiles_of: Any) -> tuple[list[Finding], list[InputProfile]]:
    """Findings from computing the optimization profile (callable returning the profiles)."""
    try:
        profiles = list(profiles_of())
    except EngineError as exc:
        return [Finding("profile", str(exc), "clipexport/trt/profiles.py", None, ["(graph inputs)"])], []
    m = load_matrix()
    out = []
    for p in profiles:
        if any(d > m.max_dim for d in p.max):
            out.append(Finding("profile", f"{p.name}: a max dimension exceeds TensorRT's 32-bit sizes",
                               "clipexport/trt/profiles.py", None, [p.name]))
    return out, profiles


def min_release(findings: Sequence[Finding], targets: Sequence[str]) -> str | None:
    """The oldest target no finding blocks (None: none parses it)."""
    for release in targets:
        if all(f.parses_from is not None and release_tuple(f.parses_from) <= release_tuple(release)
               for f in findings):
            return release
    return None


def blocked(findings: Sequence[Finding], release: str) -> list[Finding]:
    return [f for f in findings
            if f.parses_from is None or release_tuple(f.parses_from) > release_tuple(release)]


def with_plugin(findings: Sequence[Finding], m: SupportMatrix) -> list[Finding]:
    """The findings once the attention-plugin pass replaced the ONNX Attention nodes by our plugin nodes
    (clipexport.passes.attention_plugin; it errors on a block it cannot express)."""
    from clipexport.trt.plugin import PLUGIN_DOMAIN, PLUGIN_NAME

    key = f"{PLUGIN_DOMAIN}::{PLUGIN_NAME}"
    release, source = m.since[key]
    out = []
    for f in findings:
        if f.op == "Attention" and f.parses_from == m.since["Attention"][0]:
            out.append(Finding(key, f"{key} (our attention plugin) is parsed from TensorRT {release} on", source,
                               release, list(f.nodes)))
        else:
            out.append(f)
    return out


@dataclass
class Verdict:
    graph: str
    opset: int
    findings: list[Finding]
    notes: list[str]
    profiles: list[InputProfile]
    min_release: str | None
    min_release_with_plugin: str | None
    polygraphy: str
    matrix: str
    targets: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "matrix": self.matrix,
            "graph": self.graph,
            "opset": self.opset,
            "targets": list(self.targets),
            "min_release": self.min_release,
            "min_release_with_plugin": self.min_release_with_plugin,
            "blockers": [f.to_json() for f in self.findings],
            "notes": self.notes,
            "profile": [p.to_json() for p in self.profiles],
            "polygraphy": self.polygraphy,
        }

    def summary(self) -> str:
        return summarize(self.to_json())


def summarize(entry: dict[str, Any]) -> str:
    """One line for the build output and `clipexport info`."""
    low, plug = entry.get("min_release"), entry.get("min_release_with_plugin")
    if low is None and plug is None:
        head = "TensorRT: no targeted release parses it"
    elif low is None:
        head = f"TensorRT >= {plug} with the attention plugin (no release parses it as is)"
    else:
        head = f"TensorRT >= {low}" + (f" (>= {plug} with the attention plugin)" if plug and plug != low else "")
    blockers = entry.get("blockers") or []
    if blockers:
        head += "; blocking: " + "; ".join(
            f"{b['op']} x{b['count']} ({'never' if b['parses_from'] is None else 'before ' + b['parses_from']})"
            for b in blockers)
    return head


def polygraphy_command(onnx_name: str, profiles: Sequence[InputProfile], rtol: float, atol: float,
                       integer_inputs: Sequence[str] = ()) -> str:
    """`polygraphy run` comparing a TensorRT engine of the graph against ONNX Runtime on the same inputs.

    Strongly typed (the graph carries its precision; never --fp16), TF32 off (Polygraphy's default),
    the build's own profile; token ids drawn from a small range (any id is valid for every tokenizer).
    """
    def shapes(which: str) -> str:
        return " ".join(f"{p.name}:[{','.join(str(d) for d in getattr(p, which))}]" for p in profiles)

    parts = ["polygraphy", "run", onnx_name, "--trt", "--onnxrt", "--strongly-typed"]
    if profiles:
        parts += ["--trt-min-shapes", *shapes("min").split(" "), "--trt-opt-shapes", *shapes("opt").split(" "),
                  "--trt-max-shapes", *shapes("max").split(" "), "--input-shapes", *shapes("opt").split(" ")]
    if integer_inputs:
        parts += ["--val-range", *(f"{n}:[0,1000]" for n in integer_inputs)]
    parts += ["--rtol", f"{rtol:g}", "--atol", f"{atol:g}", "--check-error-stat", "median"]
    return " ".join(shlex.quote(p) for p in parts)


def tower_verdict(onnx_path: Path, tower: str, batch: BatchRange, context_length: int | None,
                  rtol: float = 1e-3, atol: float = 1e-3, matrix: SupportMatrix | None = None) -> Verdict:
    """The verdict for one written tower graph (the graph is read without its weights)."""
    import onnx

    from clipexport.trt.profiles import graph_input_shapes, tower_profiles

    m = matrix or load_matrix()
    model = onnx.load_model(str(onnx_path), load_external_data=False)
    findings, notes = graph_findings(model, m, onnx_path.parent)
    profile_issues, profiles = profile_findings(
        lambda: tower_profiles(graph_input_shapes(onnx_path), batch, tower, context_length))
    findings += profile_issues
    integer_inputs = [v.name for v in model.graph.input
                      if v.type.tensor_type.elem_type in (onnx.TensorProto.INT32, onnx.TensorProto.INT64)]
    plugin = with_plugin(findings, m)
    low, low_plugin = min_release(findings, m.targets), min_release(plugin, m.targets)
    return Verdict(
        graph=onnx_path.name, opset=graph_opset(model), findings=findings, notes=notes, profiles=profiles,
        min_release=low, min_release_with_plugin=low_plugin if low_plugin != low else low,
        polygraphy=polygraphy_command(onnx_path.name, profiles, rtol, atol, integer_inputs), matrix=m.label(),
        targets=m.targets,
    )


def choose_attention(entry: dict[str, Any] | None, installed: str, requested: str, native_layer: bool) -> str:
    """The attention mode for this engine build, from the tower's verdict and the installed TensorRT.

    Refuses (EngineError) when the installed TensorRT parses the graph neither as is nor after the
    attention-plugin pass, naming the nodes that block it. `native_layer`: TensorRT has add_attention.
    """
    if entry is None:  # an artifact written before the gate: decide from the TensorRT features alone
        if requested == "native" and not native_layer:
            raise EngineError(f"TensorRT {installed} has no native attention layer (needs 10.14+); "
                              "use the attention plugin instead")
        if requested == "auto":
            return "native" if native_layer else "plugin"
        return requested
    have = release_tuple(installed)
    low, plug = entry.get("min_release"), entry.get("min_release_with_plugin")
    as_is = low is not None and have >= release_tuple(low)
    plugged = plug is not None and have >= release_tuple(plug)
    if not as_is and not plugged:
        need = " or ".join(f">= {r}" + (" with the attention plugin" if r == plug and r != low else "")
                           for r in dict.fromkeys(x for x in (plug, low) if x))
        blockers = [b for b in entry.get("blockers", [])
                    if b["parses_from"] is None or release_tuple(b["parses_from"]) > have]
        what = "; ".join(f"{b['op']} x{b['count']} (e.g. {', '.join(b['nodes'])}): {b['reason']}" for b in blockers)
        raise EngineError(
            f"TensorRT {installed} cannot parse {entry.get('graph')}: it needs TensorRT {need or '(no targeted release)'}"
            f"; blocking: {what or 'see the manifest'}")
    if requested == "native" and not as_is:
        raise EngineError(f"--attention native: TensorRT {installed} is below {low}, which {entry.get('graph')} needs "
                          "as is; use the attention plugin")
    if requested == "plugin" and not plugged:
        raise EngineError(f"--attention plugin: TensorRT {installed} is below {plug}, which the plugin graph needs")
    if requested in ("native", "plugin", "none"):
        if requested == "none" and not as_is:
            raise EngineError(f"attention mode none: TensorRT {installed} cannot parse {entry.get('graph')} as is")
        return requested
    if not as_is:
        return "plugin"  # only the plugin pass makes the graph parse here
    return "native" if native_layer else "plugin"


def verdict_lines(entries: Iterable[tuple[str, dict[str, Any]]]) -> list[str]:
    return [f"{tower}: {summarize(e)}" for tower, e in entries]
