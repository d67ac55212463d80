"""Find ring-ext plugins (entry-point group `ring_ext.plugins`) with pluggy and let each register.

Runs once per process, from verl's own plugin loader (`verl.plugins` -> `ring_ext.verl_entry`), so
registrations exist in the driver, the trainer and every Ray worker. verl's loader drops a failing
plugin with a DEBUG log; here a failure is a `RingExtPluginWarning` naming the plugin and the error,
and the other plugins still load.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint, entry_points

import pluggy

from ring_ext.hookspecs import ENTRY_POINT_GROUP, PROJECT, RingExtSpec
from ring_ext.registrar import Registrar, Registration

logger = logging.getLogger("ring_ext")


class RingExtPluginWarning(UserWarning):
    """A ring-ext plugin could not be imported or could not register."""


@dataclass
class PluginReport:
    name: str
    distribution: str
    version: str
    registrations: list[Registration] = field(default_factory=list)
    error: str | None = None


_reports: list[PluginReport] | None = None


def _distribution(ep: EntryPoint) -> tuple[str, str]:
    dist = ep.dist
    return (dist.name, dist.version) if dist is not None else ("?", "?")


def load_plugins(*, reload: bool = False) -> list[PluginReport]:
    """Import every installed plugin and call its `ring_ext_register` hook; cached per process."""
    global _reports
    # Plugins register into verl, and `import verl` runs verl's entry-point loader, which calls back
    # here through `ring_ext.verl_entry`: import it first so that nested call does the work once.
    already_loaded = _reports
    import verl  # noqa: F401

    if _reports is not None and (not reload or _reports is not already_loaded):
        return _reports
    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(RingExtSpec)
    reports: list[PluginReport] = []
    for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        dist_name, version = _distribution(ep)
        report = PluginReport(ep.name, dist_name, version)
        reports.append(report)
        try:
            module = ep.load()
            pm.register(module, name=ep.name)
            registrar = Registrar(ep.name)
            others = [p for p in pm.get_plugins() if p is not module]
            pm.subset_hook_caller("ring_ext_register", remove_plugins=others)(registrar=registrar)
            report.registrations = registrar.records
        except Exception as exc:  # a broken plugin must not take the others down
            report.error = f"{type(exc).__name__}: {exc}"
            message = (
                f"ring-ext plugin {ep.name!r} ({dist_name} {version}, entry point {ep.value}) failed to load: "
                f"{report.error}. The other plugins are unaffected; fix or uninstall {dist_name}."
            )
            # Both: warnings can be filtered away by other libraries, the log line cannot.
            logger.warning(message)
            warnings.warn(message, RingExtPluginWarning, stacklevel=2)
    _reports = reports
    return reports
