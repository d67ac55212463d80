"""The one place that knows verl 0.9.1's registries: plugins declare, the registrar forwards and records.

Every method imports its verl registry lazily, so a plugin that only adds a platform does not pay for
importing verl's trainer. Records feed `ring-ext plugins`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class Registration:
    plugin: str
    kind: str
    name: str
    detail: str = ""


class Registrar:
    """Handed to each plugin's `ring_ext_register` hook; `records` ends up in the plugin's report."""

    def __init__(self, plugin: str) -> None:
        self.plugin = plugin
        self.records: list[Registration] = []

    def _record(self, kind: str, name: str, detail: str = "") -> None:
        self.records.append(Registration(self.plugin, kind, name, detail))

    def policy_loss(self, name: str, fn: Callable[..., Any]) -> None:
        from verl.trainer.ppo.core_algos import register_policy_loss

        register_policy_loss(name)(fn)
        self._record("policy_loss", name, f"{fn.__module__}.{fn.__qualname__}")

    def trainer_mode(self, name: str, cls: type) -> None:
        from verl.trainer.ppo.v1 import register_trainer

        register_trainer(name)(cls)
        self._record("trainer_mode", name, f"{cls.__module__}.{cls.__qualname__}")

    def checkpoint_engine(self, name: str, cls: type) -> None:
        from verl.checkpoint_engine.base import CheckpointEngineRegistry

        CheckpointEngineRegistry.register(name)(cls)
        self._record("checkpoint_engine", name, f"{cls.__module__}.{cls.__qualname__}")

    def platform(self, name: str, cls: type) -> None:
        from verl.plugin.platform.platform_manager import PlatformRegistry

        PlatformRegistry.register(platform=name)(cls)
        self._record("platform", name, f"{cls.__module__}.{cls.__qualname__}")

    def workaround(self, name: str, description: str) -> None:
        """Record a patch of a verl/vLLM defect so users can see exactly what ring-ext changed."""
        self._record("workaround", name, description)
