"""The pluggy contract between ring-ext and its plugins.

A plugin distribution exposes a module under the `ring_ext.plugins` entry-point group; that module
implements `ring_ext_register`, and declares through the `Registrar` it receives everything it adds
to verl (policy losses, trainer modes, checkpoint engines, platforms, workarounds).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

PROJECT = "ring_ext"
ENTRY_POINT_GROUP = "ring_ext.plugins"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

if TYPE_CHECKING:
    from ring_ext.registrar import Registrar


class RingExtSpec:
    @hookspec
    def ring_ext_register(self, registrar: Registrar) -> None:
        """Register what the plugin provides with verl, through `registrar` so it can be listed."""
