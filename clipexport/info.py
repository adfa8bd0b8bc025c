"""`clipexport info`: an artifact's manifest as a person reads it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from clipexport.manifest import Manifest, TowerEntry

TOP1_LEGEND = ("top1_agreement: the share of zero-shot queries whose best match is the same as PyTorch's; "
               "gated only with trained weights (random weights give near-tied scores)")


def human_bytes(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} GB"  # pragma: no cover


def _size(directory: Path, name: str) -> int | None:
    try:
        return (directory / name).stat().st_size
    except OSError:
        return None


def _tower_lines(directory: Path, entry: TowerEntry) -> list[str]:
    sizes = [_size(directory, n) for n in entry.files]
    size = "missing" if None in sizes else human_bytes(sum(s or 0 for s in sizes))
    ins = ", ".join(i.describe() for i in entry.inputs)
    outs = ", ".join(o.describe() for o in entry.outputs)
    lines = [f"  {entry.name}: {entry.onnx} ({size})  {ins} -> {outs}"]
    ran = [r for r in entry.raw.get("passes") or [] if isinstance(r, dict) and r.get("status") != "skipped"]
    passes = ", ".join(f"{r.get('name')} {r.get('nodes_before')}->{r.get('nodes_after')} nodes" for r in ran)
    lines.append(f"    passes: {passes or 'none'}")
    if entry.sequence is not None:
        seq = entry.sequence
        lines.append(f"    tokens: [batch, sequence], trimmed per batch to its longest text (at most {seq.max})"
                     if seq.dynamic else f"    tokens: [batch, {seq.max}], fixed length")
    lines.append(f"    parity: {_parity(entry.parity)}")
    verdict = entry.raw.get("tensorrt")
    if isinstance(verdict, dict):  # the TensorRT-compatibility verdict (clipexport.trt.compat)
        from clipexport.trt.compat import summarize

        lines.append(f"    {summarize(verdict)}")
        lines.append(f"    compare on a GPU: {verdict.get('polygraphy')}")
    if entry.engine is not None:
        lines.append(f"    TensorRT engine: {entry.engine.file} ({human_bytes(_size(directory, entry.engine.file) or 0)})")
    return lines


def _parity(p: dict[str, Any] | Any) -> str:
    def num(key: str, fmt: str) -> str:
        value = p.get(key)
        return format(value, fmt) if isinstance(value, (int, float)) and not isinstance(value, bool) else "?"

    top1 = p.get("top1_agreement")
    gated = "" if p.get("top1_gated") else " (not gated)"
    top1_text = f", top1_agreement {num('top1_agreement', '.3f')}{gated}" if top1 is not None else ""
    verdict = "passed" if p.get("passed") is True else "FAILED"
    return (f"{p.get('backend', '?')}: cosine_min {num('cosine_min', '.7f')}, max_abs_err {num('max_abs_err', '.3g')}, "
            f"max_rel_err {num('max_rel_err', '.3g')}{top1_text}, {verdict}")


def describe(directory: Path, manifest: Manifest) -> str:
    """Several lines: model, weights, precision, batch range, versions, per tower files/shapes/parity."""
    raw_versions = manifest.get("versions")
    versions: dict[str, Any] = raw_versions if isinstance(raw_versions, dict) else {}
    lines = [
        f"{directory}: {manifest.model} (recipe {manifest.get('recipe', '?')}), weights {manifest.weights.describe()}, "
        f"{manifest.precision}, batch {manifest.batch} (min:opt:max)",
        f"built {manifest.get('created', '?')} with clipexport {manifest.get('clipexport_version', '?')}, torch "
        f"{versions.get('torch', '?')}, onnx {versions.get('onnx', '?')}, onnxruntime {versions.get('onnxruntime', '?')}",
    ]
    for entry in manifest.towers.values():
        lines += _tower_lines(directory, entry)
    sizes = [_size(directory, n) for n in manifest.files]
    missing = sum(s is None for s in sizes)
    lines.append(f"  files: {len(sizes)}, {human_bytes(sum(s or 0 for s in sizes))} in all"
                 + (f", {missing} MISSING (`clipexport verify` says which)" if missing else ""))
    if any(e.parity.get("top1_agreement") is not None for e in manifest.towers.values()):
        lines.append(f"  {TOP1_LEGEND}")
    if manifest.get("parity_accepted_by_user"):
        lines.append("  warning: built with --accept-parity-failure")
    return "\n".join(lines)





def build_summary(directory: Path, manifest: Manifest, timings: dict[str, float], seconds: float) -> str:
    """The table a build ends with: per tower its files, size, parity figures and time; then the stages."""
    rows = [("tower", "file", "size", "cosine_min", "max_rel_err", "top1", "time")]
    for entry in manifest.towers.values():
        p = entry.parity
        size = sum((_size(directory, n) or 0) for n in entry.files)
        top1 = p.get("top1_agreement")
        rows.append((entry.name, entry.onnx, human_bytes(size), f"{p.get('cosine_min', 0):.7f}",
                     f"{p.get('max_rel_err', 0):.2g}", "-" if top1 is None else f"{top1:.3f}",
                     f"{entry.raw.get('seconds', 0):.1f}s"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["summary:"] + ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    total = sum((_size(directory, n) or 0) for n in manifest.files)
    lines.append(f"  {len(manifest.files)} files, {human_bytes(total)}; parity on batches "
                 f"{manifest.get('parity_batch_sizes')} against PyTorch fp32 ({manifest.precision} graphs)")
    slow = sorted(timings.items(), key=lambda kv: -kv[1])
    lines.append("  time per stage: " + ", ".join(f"{label} {t:.1f}s" for label, t in slow) + f"; total {seconds:.1f}s")
    return "\n".join(lines)
__all__ = ["TOP1_LEGEND", "build_summary", "describe", "human_bytes"]
