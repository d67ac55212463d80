"""The one place that knows verl 0.9.1's registries: plugins declare, the registrar forwards and records.

Registrations into verl's trainer, loss and checkpoint modules wait (`after_import`) until verl
itself imports those modules, so loading a plugin stays cheap in every process. Records feed
`ring-ext plugins`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from ring_ext.patching import Wrap, after_import, patch_after_import, resolve


def _qualname(obj: Any) -> str:
    return f"{obj.__module__}.{obj.__qualname__}"


def _detail(cls: type | str) -> str:
    return cls.replace(":", ".") if isinstance(cls, str) else _qualname(cls)


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
        def register(core_algos: ModuleType) -> None:
            if core_algos.POLICY_LOSS_REGISTRY.get(name) is not fn:
                core_algos.register_policy_loss(name)(fn)

        after_import("verl.trainer.ppo.core_algos", register)
        self._record("policy_loss", name, _qualname(fn))

    def trainer_mode(self, name: str, cls: type | str) -> None:
        """`cls` may be "module:Class", imported only once verl imports its v1 trainers (in the TaskRunner)."""

        def register(v1: ModuleType) -> None:
            trainer = resolve(cls, missing_ok=True) if isinstance(cls, str) else cls
            if trainer is not None:  # None: that module is mid-import and registers itself when done
                v1.register_trainer(name)(trainer)

        after_import("verl.trainer.ppo.v1", register)
        self._record("trainer_mode", name, _detail(cls))

    def checkpoint_engine(self, name: str, cls: type | str) -> None:
        """`cls` may be "module:Class", imported only once verl imports its checkpoint engines; such a module
        also registers the class itself (verl's decorator), so importing it directly works too."""

        def register(base: ModuleType) -> None:
            engine = resolve(cls, missing_ok=True) if isinstance(cls, str) else cls
            if engine is not None:  # None: that module is mid-import and registers itself when done
                base.CheckpointEngineRegistry.register(name)(engine)

        after_import("verl.checkpoint_engine.base", register)
        self._record("checkpoint_engine", name, _detail(cls))

    def config_section(self, path: str, dataclass_spec: str) -> None:
        """Declare a config section the plugin reads (e.g. "trainer.v1.c3po"), typed by "module:Dataclass": the
        recipe key check then accepts exactly that dataclass's fields under it."""
        from ring_ext.config_check import add_config_section

        add_config_section(path, dataclass_spec)
        self._record("config_section", path, _detail(dataclass_spec))

    def startup_check(self, name: str, check: Callable[[Any], None]) -> None:
        """`check(config)` runs in the driver inside verl's `validate_config`, before Ray starts."""
        from ring_ext.startup import add_startup_check

        add_startup_check(name, check)
        self._record("startup_check", name, _qualname(check))

    def platform(self, name: str, cls: type) -> None:
        from verl.plugin.platform.platform_manager import PlatformRegistry

        PlatformRegistry.register(platform=name)(cls)
        self._record("platform", name, _qualname(cls))

    def patch(self, target: str, wrap: Wrap | str, name: str, why: str) -> None:
        """Wrap verl's "module:Owner.attr" by `wrap(original)` once verl imports the module (`patch_once`: a
        second registration is a no-op); listed by `ring-ext plugins` as workaround `name`, with `why`."""
        patch_after_import(target, wrap)
        self.workaround(name, why)

    def workaround(self, name: str, description: str) -> None:
        """Record a patch of a verl/vLLM defect so users can see exactly what ring-ext changed."""
        self._record("workaround", name, description)
