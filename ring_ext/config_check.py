"""Refuse recipe keys that verl would silently carry and never read (a typo in a recipe file).

Hydra lets a config file add keys to verl's config, so `clip_ratoi: 0.3` in a recipe composes fine
and does nothing. Every key present after composition but absent from verl's fully expanded default
config (`_generated_ppo_trainer.yaml`) must be either a field of the dataclass its nearest `_target_`
ancestor names (verl's typed configs accept those) or sit under a free-form mapping (an empty dict in
verl's defaults, e.g. `model.override_config`, or Ray's init kwargs).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import importlib
from collections.abc import Iterator
from typing import Any

from omegaconf import DictConfig, OmegaConf

FREE_FORM = frozenset({"ray_kwargs.ray_init", "hydra"})
# Present after verl's own composition but not in its generated file (a defaults-list selector).
COMPOSED_ONLY = frozenset({"model_engine"})
# Sections that plugins add to verl's config (`Registrar.config_section`): path -> "module:Dataclass".
_plugin_sections: dict[str, str] = {}


def add_config_section(path: str, dataclass_spec: str) -> None:
    _plugin_sections[path] = dataclass_spec


class UnknownConfigKeyError(ValueError):
    pass


@functools.cache
def verl_default_config(model_engine: str = "dp") -> DictConfig:
    """verl's fully expanded defaults for an engine (`model_engine=megatron`: its Megatron config)."""
    from ring_ext.verl_config import verl_config_dir

    name = "_generated_ppo_trainer.yaml" if model_engine == "dp" else f"_generated_ppo_{model_engine}_trainer.yaml"
    return OmegaConf.load(verl_config_dir() / name)


def _defaults_for(cfg: DictConfig) -> DictConfig:
    return verl_default_config(str(cfg.get("model_engine", "dp") or "dp"))


def _leaf_paths(node: Any, prefix: str = "") -> Iterator[str]:
    if isinstance(node, DictConfig):
        for key in node.keys():
            path = f"{prefix}.{key}" if prefix else str(key)
            yield path
            yield from _leaf_paths(node._get_node(key), path)  # raw node: no interpolation resolved


def _dataclass_fields(target: str) -> set[str]:
    module, _, name = target.rpartition(":") if ":" in target else target.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return set()
    return {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()


def _accepted(path: str, cfg: DictConfig, base: DictConfig) -> bool:
    parts = path.split(".")
    if any(".".join(parts[:i]) in FREE_FORM for i in range(1, len(parts))):  # anything below ray.init's kwargs
        return True
    for i in range(len(parts) - 1, 0, -1):
        parent = ".".join(parts[:i])
        node = OmegaConf.select(base, parent, throw_on_missing=False)
        if node is None:
            continue
        if isinstance(node, DictConfig) and len(node) == 0:
            return True
        # The user's `_target_` wins: a typed subclass (e.g. a plugin's policy-loss config) adds fields.
        target = OmegaConf.select(cfg, f"{parent}._target_", default=None) or node.get("_target_")
        return bool(target) and parts[i] in _dataclass_fields(str(target))
    return parts[0] in FREE_FORM


def unknown_keys(cfg: DictConfig, base: DictConfig | None = None) -> list[str]:
    base = _defaults_for(cfg) if base is None else base
    known = set(_leaf_paths(base)) | COMPOSED_ONLY
    added = [p for p in _leaf_paths(cfg) if p not in known]
    # Report the topmost unknown key only, not every key below it.
    roots = [p for p in added if not any(p.startswith(q + ".") for q in added if q != p)]
    bad = []
    for path in roots:
        if path in _plugin_sections:  # a plugin's section: only its dataclass's fields are read
            section, fields_ = OmegaConf.select(cfg, path), _dataclass_fields(_plugin_sections[path])
            keys = section.keys() if isinstance(section, DictConfig) else []
            bad += [f"{path}.{k}" for k in keys if k not in fields_]
        elif not _accepted(path, cfg, base):
            bad.append(path)
    return bad


def check_config_keys(cfg: DictConfig) -> None:
    bad = unknown_keys(cfg)
    if not bad:
        return
    base = _defaults_for(cfg)
    lines = []
    for path in bad:
        parent, _, key = path.rpartition(".")
        siblings = OmegaConf.select(base, parent) if parent else base
        close = difflib.get_close_matches(key, list(siblings.keys()) if isinstance(siblings, DictConfig) else [], n=1)
        lines.append(f"  {path}" + (f"  (did you mean '{parent + '.' if parent else ''}{close[0]}'?)" if close else ""))
    raise UnknownConfigKeyError("unknown config keys, not read by verl 0.9.1:\n" + "\n".join(lines))


try:
    from hydra.experimental.callback import Callback
except ImportError:  # pragma: no cover - hydra is a dependency
    Callback = object  # type: ignore[misc,assignment]


_enforced = False


class KeyCheckCallback(Callback):  # type: ignore[misc]
    """Hydra callback set by ring-ext recipes: opts this run into the key check.

    Hydra turns an exception raised in a callback into a warning and runs the job anyway, so the
    callback only marks the run; `check_recipe_keys` raises from inside verl's `validate_config`.
    """

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        global _enforced
        _enforced = True


def check_recipe_keys(config: Any) -> None:
    """Startup check: refuse unknown keys in runs composed from a ring-ext recipe."""
    if _enforced:
        check_config_keys(config)
