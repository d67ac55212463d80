"""A rollout worker's parameters, moved once into one shared-memory file that the senders map and write into.

No verl, no vLLM. The file is created owner-only (0600, O_EXCL) under an unguessable name (128 random bits) that also
names its creator, so that the arena of a worker Ray killed is removed by the next one created on the host. The worker
learns nothing new per sync: the parameters keep their addresses (`check_unmoved` before every sync, since a module
that replaced a parameter would silently stop seeing the writes) and senders keep their mapping open across syncs
(first touch of fresh shared pages runs at a fraction of memcpy's speed).
"""

from __future__ import annotations

import mmap
import os
import secrets
from collections.abc import Iterable

import torch

from ring_ext_astate.plan import PlanError
from ring_ext_astate.segments import PREFIX, owned_name, sweep_orphans

ALIGN = 64  # each tensor on its own cache line: any dtype view is aligned, no two tensors (or senders) share a line
STEP = 1 << 20  # bytes per copy step: source and destination of one step are still in cache when it is hashed
SHM_DIR = "/dev/shm"


def _map(path: str, size: int, populate: bool = False) -> mmap.mmap:
    fd = os.open(path, os.O_RDWR)
    try:
        # populate: the page tables filled now, so the first sync does not fault on each of the arena's pages
        # (a 0.5 GiB arena's first write took 2.9x its second without it; Linux only)
        flags = mmap.MAP_SHARED | (getattr(mmap, "MAP_POPULATE", 0) if populate else 0)
        return mmap.mmap(fd, size, flags=flags)
    finally:
        os.close(fd)


class ParamArena:
    """Owner side: `adopt` moves tensors' storage into the file (their `.data` becomes a view of it)."""

    def __init__(self, size: int) -> None:
        st = os.statvfs(SHM_DIR)
        if size > st.f_bavail * st.f_frsize:
            raise PlanError(f"{SHM_DIR} has {st.f_bavail * st.f_frsize} bytes free, the parameter arena needs {size}: "
                            "enlarge it (docker --shm-size) or sync without astate")
        sweep_orphans()
        self.name = f"{owned_name()}_{secrets.token_hex(16)}"
        self.path = f"{SHM_DIR}/{self.name}"
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.posix_fallocate(fd, 0, max(size, 1))  # no room raises here, not SIGBUS at a later write
        finally:
            os.close(fd)
        self.size = size
        self.bytes = torch.frombuffer(_map(self.path, max(size, 1)), dtype=torch.uint8)
        self.addresses: dict[str, int] = {}

    @classmethod
    def adopt(cls, params: Iterable[tuple[str, torch.nn.Parameter]]) -> tuple["ParamArena", dict[str, tuple[int, int]]]:
        """Move each (distinct) parameter into a new arena; returns it and each parameter's (offset, nbytes)."""
        params = list(params)
        layout, size = {}, 0
        for name, p in params:
            if p.device.type != "cpu" or not p.is_contiguous():
                raise PlanError(f"parameter {name!r} ({p.device}, contiguous={p.is_contiguous()}) cannot move into a "
                                "host arena")
            layout[name] = (size, p.numel() * p.element_size())
            size += -(-layout[name][1] // ALIGN) * ALIGN
        arena = cls(size)
        for name, p in params:
            off, n = layout[name]
            view = arena.bytes[off:off + n].view(p.dtype).view(p.shape)
            view.copy_(p.data)
            p.data = view
            arena.addresses[name] = p.data_ptr()
        return arena, layout

    def check_unmoved(self, params: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Every adopted parameter still lives at its address in the arena (checked before any byte moves)."""
        seen = dict(params)
        for name, addr in self.addresses.items():
            p = seen.get(name)
            if p is None or p.data_ptr() != addr:
                now = "gone" if p is None else hex(p.data_ptr())
                raise PlanError(f"parameter {name!r} moved out of the astate arena (was {hex(addr)}, now {now}): "
                                "something replaced it after the plan was recorded; writes would not reach it")

    def unlink(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


class Arenas:
    """A worker's parameter arenas: one (a sync writes the live parameters) or two with `shadow` (a sync writes the
    inactive one and its commit repoints the parameters at it: a failed sync leaves the serving weights untouched,
    for twice the weight memory). Sync v writes arena `v % len`; the parameters start in arena 0."""

    def __init__(self, params: Iterable[tuple[str, torch.nn.Parameter]], shadow: bool) -> None:
        first, self.layout = ParamArena.adopt(params)
        self.all = [first]
        if shadow:
            second = ParamArena(first.size)
            second.bytes.copy_(first.bytes)
            self.all.append(second)
        self.active = 0

    def target(self, version: int) -> ParamArena:
        return self.all[version % len(self.all)]

    def commit(self, version: int, params: Iterable[tuple[str, torch.nn.Parameter]]) -> None:
        arena = self.target(version)
        if arena is self.all[self.active]:
            return
        for name, p in params:
            if name in self.layout:
                off, n = self.layout[name]
                p.data = arena.bytes[off:off + n].view(p.dtype).view(p.shape)
                arena.addresses[name] = p.data_ptr()
        self.active = self.all.index(arena)

    def check_unmoved(self, params: Iterable[tuple[str, torch.Tensor]]) -> None:
        self.all[self.active].check_unmoved(params)

    def unlink(self) -> None:
        for a in self.all:
            a.unlink()


def map_arena(name: str, size: int) -> torch.Tensor:
    """Sender side: the worker's arena as bytes (the mapping stays open as long as the tensor lives)."""
    if "/" in name or not name.startswith(PREFIX + "_"):
        raise PlanError(f"not an astate arena name: {name!r}")
    return torch.frombuffer(_map(f"{SHM_DIR}/{name}", max(size, 1), populate=True), dtype=torch.uint8)
