"""Segments and sockets of a killed process tree are removed by the next creator, live ones are kept."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from ring_ext_astate import segments
from ring_ext_astate.shm_transport import ShmSender

# Ray ends a worker by killing its process tree: multiprocessing's resource tracker dies with it.
HOLDER = """
import sys, time
from ring_ext_astate.shm_transport import ShmSender
s = ShmSender(0, 1, slot_bytes=4096, n_slots=2)
print(*[x.name for x in s.shms], s.chan.address.removeprefix("ipc://"), flush=True)
time.sleep(600)
"""


def _holder() -> tuple[subprocess.Popen, list[str]]:
    p = subprocess.Popen([sys.executable, "-c", HOLDER], stdout=subprocess.PIPE, text=True, start_new_session=True)
    return p, p.stdout.readline().split()


def test_a_killed_process_trees_segments_and_socket_go_with_the_next_creator():
    (dead, dead_names), (live, live_names) = _holder(), _holder()
    try:
        os.killpg(dead.pid, signal.SIGKILL)
        dead.wait()
        time.sleep(0.5)
        *dead_shms, dead_sock = dead_names
        assert all(os.path.exists(f"/dev/shm/{n}") for n in dead_shms) and os.path.exists(dead_sock)  # the leak
        foreign = segments.SHM_DIR / f"{segments.PREFIX}_1_{dead.pid}_0"  # another PID namespace's: not ours to judge
        foreign.touch()
        sender = ShmSender(0, 1, slot_bytes=4096, n_slots=1)
        sender.close()
        assert not any(os.path.exists(f"/dev/shm/{n}") for n in dead_shms) and not os.path.exists(dead_sock)
        *live_shms, live_sock = live_names
        assert all(os.path.exists(f"/dev/shm/{n}") for n in live_shms) and os.path.exists(live_sock)
        assert foreign.exists()
    finally:
        foreign.unlink(missing_ok=True)
        live.kill()  # the process alone: its resource tracker unlinks its segments
        live.wait()


def test_names_carry_the_creators_pid_and_sweeping_spares_it():
    shm = segments.create_segment(64)
    try:
        assert shm.name.startswith(f"{segments.PREFIX}_{os.stat('/proc/self/ns/pid').st_ino}_{os.getpid()}_")
        assert shm.name not in segments.sweep_orphans()
        assert Path(f"/dev/shm/{shm.name}").exists()
    finally:
        shm.close()
        shm.unlink()
