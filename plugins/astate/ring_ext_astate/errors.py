"""The one error of a failed weight sync, for every path of ring-ext-astate (in place and staged, every transport)."""

from __future__ import annotations


class SyncError(RuntimeError):
    """A weight sync failed; the receiver's committed weights and version are unchanged (the message names the
    tensor, rank or peer)."""
