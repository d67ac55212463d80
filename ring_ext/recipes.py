"""The Hydra recipes shipped in `ring_ext.hydra_conf/recipe` (the repository's `hydra_conf/`)."""

from __future__ import annotations

import importlib.util
import sys
import threading
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from types import ModuleType

RECIPE_GROUP = "recipe"
_load_lock = threading.Lock()


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


def load_sibling(anchor_file: str, filename: str) -> ModuleType:
    """Import `filename` next to `anchor_file`, once per process.

    verl loads a reward function by file path, outside any package, so a reward file that needs a
    sibling (the sandbox, the math checker) loads it by path too; the module is cached in `sys.modules`
    under a name derived from the file so every caller shares its state (e.g. one sandbox pool).
    """
    path = Path(anchor_file).resolve().with_name(filename)
    name = f"ring_ext_sibling_{path.parent.name}_{path.stem}"
    with _load_lock:
        module = sys.modules.get(name)
        if module is None:
            spec = importlib.util.spec_from_file_location(name, path)
            if spec is None or spec.loader is None:
                raise ImportError(f"cannot load {path}")
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            sys.modules[name] = module
        return module
