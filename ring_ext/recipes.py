"""The Hydra recipes shipped in `ring_ext.hydra_conf/recipe` (the repository's `hydra_conf/`)."""

from __future__ import annotations

from dataclasses import dataclass
from importlib.resources import files

RECIPE_GROUP = "recipe"


@dataclass(frozen=True)
class Recipe:
    name: str
    summary: str


def _summary(text: str) -> str:
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("#") and "@package" not in line and line.strip("# "):
            return line.lstrip("# ").strip()
    return ""


def list_recipes() -> list[Recipe]:
    folder = files("ring_ext.hydra_conf") / RECIPE_GROUP
    recipes = [
        Recipe(entry.name.removesuffix(".yaml"), _summary(entry.read_text()))
        for entry in folder.iterdir()
        if entry.name.endswith(".yaml")
    ]
    return sorted(recipes, key=lambda r: r.name)
