"""ring-ext hook implementation of ring-ext-c3po: the `c3po` v1 trainer mode."""

from __future__ import annotations

from ring_ext.hookspecs import hookimpl
from ring_ext.registrar import Registrar


@hookimpl
def ring_ext_register(registrar: Registrar) -> None:
    # a string: the mode imports verl's v1 trainer, which only the TaskRunner loads
    registrar.trainer_mode("c3po", "ring_ext_c3po.verl_mode:C3POTrainer")
    registrar.config_section("trainer.v1.c3po", "ring_ext_c3po.pool:C3POModeConfig")
