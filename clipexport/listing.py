"""Which open_clip models each recipe covers, and why the others are not covered."""

from __future__ import annotations

from clipexport.models.architecture import HF_TEXT, families_of
from clipexport.models.hf_text import missing_config_reason
from clipexport.recipes import Recipe, load_recipes, unsupported_reason


def coverage() -> tuple[list[tuple[Recipe, list[str]]], list[tuple[str, str]]]:
    """([(recipe, [model names])], [(model name, reason unsupported)]) over open_clip.list_models()."""
    from clipexport.models import registry

    recipes = list(load_recipes().values())
    covered: dict[str, list[str]] = {r.name: [] for r in recipes}
    unsupported: list[tuple[str, str]] = []
    for name in registry.list_models():
        cfg = registry.get_model_config(name)
        assert cfg is not None  # listed names have configs
        families = families_of(cfg)
        match = next((r for r in recipes if r.covers(families)), None)
        missing = missing_config_reason(cfg["text_cfg"]) if families.text == HF_TEXT else ""
        if match is None:
            unsupported.append((name, unsupported_reason(families)))
        elif missing:
            unsupported.append((name, missing))
        else:
            covered[match.name].append(name)
    return [(r, covered[r.name]) for r in recipes], unsupported
