"""open_clip's model names, configs and pretrained tags, read without importing open_clip.

`import open_clip` imports torch (seconds, hundreds of MB); a mistyped model name or tag must
be refused in well under a second. open_clip keeps its registry as data: one JSON file per
model under `model_configs/`, and the tags as literal dicts in `pretrained.py`. Both are read
here as files; `tests/test_registry.py` checks the result equals open_clip's own lists. If
`pretrained.py` ever takes a form this reader does not understand, it falls back to open_clip.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import re
from functools import cache
from pathlib import Path
from typing import Any


def _package_dir() -> Path | None:
    spec = importlib.util.find_spec("open_clip")  # finds the package without running it
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _natural_key(name: str) -> list[Any]:
    return [int(s) if s.isdigit() else s for s in re.split(r"(\d+)", name.lower())]


@cache
def _config_files() -> dict[str, Path]:
    root = _package_dir()
    if root is None:
        return {}
    files = {p.stem: p for p in (root / "model_configs").glob("*.json")}
    return {name: files[name] for name in sorted(files, key=_natural_key)}


def list_models() -> list[str]:
    """open_clip.list_models(), without importing open_clip."""
    names = list(_config_files())
    if not names:  # open_clip not installed where we looked: ask it (slow, but right)
        import open_clip

        return list(open_clip.list_models())
    return names


def get_model_config(name: str) -> dict[str, Any] | None:
    """open_clip.get_model_config(name) (a fresh dict), or None for an unknown name."""
    path = _config_files().get(name)
    if path is None:
        if _config_files():
            return None
        import open_clip

        cfg = open_clip.get_model_config(name)
        return None if cfg is None else dict(cfg)
    data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return data


def _dict_keys(node: ast.AST, names: dict[str, ast.AST]) -> dict[str, ast.AST] | None:
    """Keys -> value nodes of a literal `dict(k=...)` / `{"k": ...}`, following one Name."""
    if isinstance(node, ast.Name):
        target = names.get(node.id)
        return None if target is None else _dict_keys(target, {})
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "dict" and not node.args:
        if any(k.arg is None for k in node.keywords):
            return None
        return {k.arg: k.value for k in node.keywords if k.arg is not None}
    if isinstance(node, ast.Dict) and all(isinstance(k, ast.Constant) and isinstance(k.value, str) for k in node.keys):
        return {k.value: v for k, v in zip(node.keys, node.values)}  # type: ignore[union-attr]
    return None


def _is_quick_gelu(node: ast.AST) -> bool:
    return isinstance(node, ast.Call) and any(
        k.arg == "quick_gelu" and isinstance(k.value, ast.Constant) and k.value.value is True for k in node.keywords)


@cache
def _pretrained_from_source() -> dict[str, list[str]] | None:
    root = _package_dir()
    try:
        tree = ast.parse((root / "pretrained.py").read_text(encoding="utf-8")) if root else None
    except (OSError, SyntaxError):
        return None
    if tree is None:
        return None
    assigned: dict[str, ast.AST] = {}
    for stmt in tree.body:
        if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name):
            assigned[stmt.targets[0].id] = stmt.value
    table = _dict_keys(assigned.get("_PRETRAINED", ast.Constant(None)), {})
    if not table:
        return None
    models: dict[str, list[str]] = {}
    quick: dict[str, list[str]] = {}
    for model, value in table.items():
        tags = _dict_keys(value, assigned)
        if tags is None:
            return None  # a form we do not understand: let open_clip answer
        models[model] = list(tags)
        gelu = [tag for tag, cfg in tags.items() if _is_quick_gelu(cfg)]
        if gelu:  # open_clip adds '<model>-quickgelu' for the tags marked quick_gelu
            quick[f"{model}-quickgelu"] = gelu
    models.update(quick)
    return models


def list_pretrained_tags_by_model(name: str) -> list[str]:
    """open_clip.list_pretrained_tags_by_model(name), without importing open_clip when possible."""
    table = _pretrained_from_source()
    if table is None:
        import open_clip

        return list(open_clip.list_pretrained_tags_by_model(name))
    return list(table.get(name, []))


def pretrained_table() -> dict[str, list[str]] | None:
    """The whole tag table as read from source (None when it could not be read); for tests."""
    table = _pretrained_from_source()
    return None if table is None else {k: list(v) for k, v in table.items()}


__all__ = ["get_model_config", "list_models", "list_pretrained_tags_by_model", "pretrained_table"]
