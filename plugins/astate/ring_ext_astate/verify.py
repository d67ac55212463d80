"""When a sync hashes every byte it wrote: one rule for the in-place sync and the staged checkpoint engine."""

from __future__ import annotations

from typing import Literal

VerifyMode = Literal["audit", "always"]  # the knob's values, in both option sections


def verified(mode: VerifyMode, version: int, attempt: int = 0, audit_every: int = 10) -> bool:
    """`audit`: sync 1 (a new plan or layout), every `audit_every`-th and every retry (the failure may be the
    memory's); `always`: every sync. Coverage (every planned byte exactly once) is checked on every sync anyway."""
    return mode == "always" or attempt > 0 or version == 1 or version % audit_every == 0
