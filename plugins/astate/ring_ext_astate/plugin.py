"""ring-ext hook implementation of ring-ext-astate: the ``astate`` verl checkpoint engine."""

from __future__ import annotations

from ring_ext.hookspecs import hookimpl
from ring_ext.registrar import Registrar


@hookimpl
def ring_ext_register(registrar: Registrar) -> None:
    # a string: the engine module imports verl's checkpoint engines, which only load when verl needs them
    registrar.checkpoint_engine("astate", "ring_ext_astate.engine:AStateCheckpointEngine")
