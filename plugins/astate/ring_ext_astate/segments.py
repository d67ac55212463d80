"""Shared-memory segments and socket files that do not outlive their creator by more than one run.

No verl import. multiprocessing's resource tracker unlinks a dead process's segments only while the tracker
lives, and Ray ends a worker by killing its whole process tree, tracker included: every killed run would leave
its slot ring and its model-sized staging arena in /dev/shm (and its socket file in /tmp) until the host reboots.
So each is named after its creator (PID namespace and PID), and creating one first removes those whose creator
is gone.
Removing a name never breaks a live mapping: a peer that mapped the segment keeps its memory until it unmaps.
"""

from __future__ import annotations

import os
import uuid
from multiprocessing import shared_memory
from pathlib import Path

PREFIX = "ring_ext_astate"
SHM_DIR, SOCKET_DIR = Path("/dev/shm"), Path("/tmp")


def _pid_namespace() -> int:
    """PIDs are only comparable inside one namespace (containers may share /dev/shm, never PIDs)."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def owned_name() -> str:
    return f"{PREFIX}_{_pid_namespace()}_{os.getpid()}_{uuid.uuid4().hex[:12]}"


def sweep_orphans(directory: Path = SHM_DIR) -> list[str]:
    """Unlink this namespace's files in `directory` whose creating process has exited; returns their names."""
    mine, removed = f"{PREFIX}_{_pid_namespace()}_", []
    for path in directory.glob(f"{mine}*"):
        pid = path.name[len(mine):].split("_", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            path.unlink(missing_ok=True)  # a concurrent sweep may have taken it
            removed.append(path.name)
    return removed


def create_segment(size: int) -> shared_memory.SharedMemory:
    """A new segment named after this process, after sweeping the orphans of dead ones."""
    sweep_orphans(SHM_DIR)
    return shared_memory.SharedMemory(name=owned_name(), create=True, size=size)


def socket_path() -> str:
    """A new Unix socket path named after this process, after sweeping the orphans of dead ones."""
    sweep_orphans(SOCKET_DIR)
    return str(SOCKET_DIR / f"{owned_name()}.sock")
