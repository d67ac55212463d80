"""Every astate knob, one section: ``actor_rollout_ref.rollout.checkpoint_engine.engine_kwargs.astate``.

Read by the in-place sync's server adapter (every trainer mode) and handed by verl to the `astate` checkpoint engine
(separate_async), so one `verify` and one `timeout_s` hold for every path a sync takes. No verl import.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from ring_ext.knobs import check_knobs, from_mapping, knob

from ring_ext_astate.verify import VerifyMode, verified

SECTION = "actor_rollout_ref.rollout.checkpoint_engine.engine_kwargs.astate"
# the in-place sync's knobs lived in a section of their own until the two systems became one
OLD_SECTION = "actor_rollout_ref.rollout.checkpoint_engine.engine_kwargs.astate_inplace"
IN_PLACE_ONLY = ("retries", "backoff_s", "shadow")  # not read by the checkpoint engine's staged transports


@dataclass(frozen=True)
class AStateOptions:
    # every sync
    verify: VerifyMode = "audit"  # audit: every byte hashed on the 1st, every K-th and each retry (verify.verified)
    audit_every: int = knob(10, ge=1)  # K
    timeout_s: float = knob(120.0, gt=0)  # every wait of a sync; a dead peer ends it with an error after this
    # the in-place write (every trainer mode)
    retries: int = knob(2, ge=0)  # whole-sync retries after a failed attempt (0 also skips keeping sources alive)
    backoff_s: float = knob(1.0, ge=0)  # doubled per retry
    shadow: bool = False  # a second arena: a sync writes the inactive one, its commit switches (2x weight memory)
    # the checkpoint engine's transports (separate_async)
    slots: int = knob(4, ge=1)  # buckets in flight per sender: bounds shared memory to slots x slot size
    slot_megabytes: int = knob(16, ge=1)  # capped by verl's update_weights_bucket_megabytes
    transport: str = "shm"  # a key of ring_ext_astate.engine.TRANSPORTS, checked by the engine

    def __post_init__(self) -> None:
        check_knobs(self, SECTION)

    def verified(self, version: int, attempt: int = 0) -> bool:
        return verified(self.verify, version, attempt, self.audit_every)

    @classmethod
    def from_kwargs(cls, kwargs: Any) -> "AStateOptions":
        return from_mapping(cls, dict(kwargs or {}), SECTION)

    @classmethod
    def from_rollout_config(cls, rollout: Any) -> "AStateOptions":
        engine_kwargs = rollout.checkpoint_engine.get("engine_kwargs", {}) or {}
        old = engine_kwargs.get("astate_inplace")
        if old:
            raise ValueError(f"{OLD_SECTION} is now part of {SECTION} (one section for every astate knob): set "
                             f"{', '.join(f'{SECTION}.{k}' for k in old)} instead")
        return cls.from_kwargs(engine_kwargs.get("astate"))

    def in_place_knobs_set(self) -> list[str]:
        """The in-place-only knobs given other values than their defaults (reported where no in-place sync runs)."""
        defaults = {f.name: f.default for f in fields(self)}
        return [k for k in IN_PLACE_ONLY if getattr(self, k) != defaults[k]]
