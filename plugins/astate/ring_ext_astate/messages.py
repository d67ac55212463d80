"""The staged transports' control messages (`shm_transport` and the transports built on it), one class per kind.

Each starts with `rank` (who sent it: a sender's or a receiver's rank) and `version` (the sync), so a leftover of an
earlier, failed sync is recognised whatever its kind. They travel pickled over ZeroMQ (`_Channel`).
"""

from __future__ import annotations

from typing import Any, NamedTuple

Meta = tuple[str, tuple[int, ...], str]  # name, shape, dtype


class Begin(NamedTuple):
    """sender -> receivers: a sync starts; its layout when the sender knows it (the direct path needs it)."""

    rank: int
    version: int
    manifest: list[Meta] | None


class Bucket(NamedTuple):
    """sender -> receivers: slot `slot` holds `extents` ((meta, a, b, offset in the slot), ...); read it, then ack."""

    rank: int
    version: int
    slot: int
    extents: list
    checksum: Any


class Chunk(NamedTuple):
    """direct sender -> receivers: these arena bytes ((meta, a, b), ...) are written; `checksum` is the source's."""

    rank: int
    version: int
    extents: list
    checksum: int


class End(NamedTuple):
    """sender -> receivers: its share is sent; `owned` = (meta, a, b, digest or None) of each tensor it owned."""

    rank: int
    version: int
    owned: list


class Error(NamedTuple):
    """sender -> receivers: the sender failed (its weights generator raised); the sync cannot complete."""

    rank: int
    version: int
    why: str


class Ack(NamedTuple):
    """receiver -> sender: slot `slot` was read; the sender may refill it."""

    rank: int
    version: int
    slot: int


class Report(NamedTuple):
    """receiver -> every sender: the sync assembled and checked (`ok`), or why not."""

    rank: int
    version: int
    ok: bool
    why: str = ""


class ArenaOffer(NamedTuple):
    """direct receiver -> sender: write this sync straight into staging arena `name` at `offsets`."""

    rank: int
    version: int
    name: str
    size: int
    offsets: dict[str, int]


class Vote(NamedTuple):
    """sender -> receivers: every report was ok (`commit`) or not; a receiver returns only on every commit."""

    rank: int
    version: int
    commit: bool
