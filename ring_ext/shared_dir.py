"""Does every node of the Ray cluster see the same directory? Asked of the nodes themselves, at run time.

A directory that several processes write and one reads (C3PO++'s spool of partial trajectories under the checkpoint
directory: rollout clients on every node append, the trainer snapshots) must be one file system for all of them.
A path can look right and still not be: relative (each process resolves it against its own working directory), or
absolute on a disk each host has of its own. Nothing in the config tells; the nodes do: this process writes a file
with a fresh random name under the directory and a task pinned to each alive node with CPUs (where verl places its
agent-loop workers) resolves the same configured path there and reads it back.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any

PROBE_TIMEOUT_S = 120.0  # a task on each node: a worker process to start per node (seconds on busy cores)


def _read_marker(configured: str, name: str) -> tuple[str, str, str | None]:
    """On a node: its address, the path as it resolves there, the marker's content (None: not there)."""
    import ray

    resolved = os.path.abspath(configured)
    try:
        content: str | None = Path(resolved, name).read_text()
    except OSError:
        content = None
    return ray.util.get_node_ip_address(), resolved, content


def nodes_not_sharing(configured: str, timeout_s: float = PROBE_TIMEOUT_S) -> list[str]:
    """Every alive node with CPUs reads a marker this process writes under `configured`; returns one line per node
    that does not see it (empty: all do). Needs a connected Ray; raises TimeoutError naming the nodes that did not
    answer within `timeout_s`, rather than wait on a node that cannot run a task."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) > 0]
    if len(nodes) < 2:  # one node: its processes share its disk
        return []
    here = os.path.abspath(configured)
    os.makedirs(here, exist_ok=True)
    name, token = f".ring_ext_shared_{secrets.token_hex(8)}", secrets.token_hex(16)
    marker = Path(here, name)
    marker.write_text(token)
    try:
        read = ray.remote(num_cpus=0, max_retries=0)(_read_marker)
        refs: dict[Any, str] = {
            read.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(
                configured, name): n["NodeManagerAddress"] for n in nodes}
        done, pending = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
        if pending:
            raise TimeoutError(f"checking that every node sees {configured!r}: nodes {sorted(refs[r] for r in pending)}"
                               f" ran no task within {timeout_s:.0f} s")
        problems = []
        for ip, resolved, content in ray.get(done):
            if content != token:
                where = "" if resolved == here else f" (it resolves the path to {resolved})"
                problems.append(f"node {ip} does not see {here}{where}")
        return sorted(problems)
    finally:
        marker.unlink(missing_ok=True)


def require_shared(configured: str, knob: str, why: str) -> None:
    """Raise naming the nodes that do not see `configured` (the value of config key `knob`), and why it matters."""
    problems = nodes_not_sharing(configured)
    if problems:
        raise ValueError(f"{knob}={configured!r} must be one file system for every node: {why}; "
                         + "; ".join(problems) + ". Give an absolute path on a file system every node mounts")
