"""A Ray cluster of two nodes on one machine, standing in for two hosts: the head raylet on 127.0.0.2, the
worker raylet on 127.0.0.3 (loopback addresses: Linux routes all of 127/8 to `lo`). Each node is its own
`ray start --block` process in a session of its own, with its own logical resources. Every process of the
cluster carries a marker in its environment, and `stop` ends exactly those, by id, however the test went.

A node may have directories of its own (`NodeSpec.private_dirs`): its raylet starts in a mount namespace of its
own (`unshare --mount`, root only) with an empty tmpfs over each, so its processes and the other node's see two
different disks at the same path, as two hosts without a shared file system do.

The cluster writes its address file in a temp dir of its own (`--temp-dir`): a bare `ray.init()` elsewhere on
this machine does not find it and attach. It requires a token of its own (Ray's token authentication): a
client needs `client_env()`, as a driver on another host needs RAY_AUTH_MODE=token and the cluster's token.
Used by the two-host tests (plugins/astate/tests/test_two_hosts.py, plugins/c3po/tests/test_c3po_two_hosts.py).
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

HEAD_IP, WORKER_IP = "127.0.0.2", "127.0.0.3"
START_TIMEOUT_S = 120.0  # a node's raylet registered with the GCS (2 busy cores: ~10 s measured)
STOP_TIMEOUT_S = 5.0  # SIGTERM to exit, before SIGKILL (nothing left to drain after the run)
MARKER = "RING_EXT_LOCAL_CLUSTER"  # in the environment of every process of the cluster (inherited)
# A driver of the cluster: waits for the nodes at `want` to be alive, prints the node and actor tables.
PROBE = """
import json, sys, time
import ray
from ray._private import state
ray.init(logging_level="ERROR", log_to_driver=False)  # RAY_ADDRESS and the token from the environment
want, deadline = set(filter(None, sys.argv[1].split(","))), time.monotonic() + float(sys.argv[2])
while True:
    nodes = ray.nodes()
    alive = {n["NodeManagerAddress"] for n in nodes if n["Alive"]}
    if want <= alive or time.monotonic() > deadline:
        break
    time.sleep(1.0)
print(json.dumps({"nodes": nodes, "actors": list(state.actors().values())}, default=str))
"""


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class NodeSpec:
    ip: str
    num_cpus: int  # logical: Ray's bookkeeping, not cores
    num_gpus: int  # logical GPUs (ring-ext-cpu schedules its CPU workers on them)
    resources: dict[str, float] = field(default_factory=dict)  # custom resources naming the node
    private_dirs: tuple[Path, ...] = ()  # each an empty disk of this node's own (a tmpfs in its mount namespace)


@dataclass
class TwoHosts:
    address: str  # the head's GCS, host:port: RAY_ADDRESS for a driver
    temp_dir: Path
    log_dir: Path  # each `ray start`'s output
    token: str  # marks the cluster's processes
    env: dict[str, str]  # for every process of the cluster (Ray's workers inherit their raylet's environment)
    auth_token: str = field(default_factory=lambda: secrets.token_hex(32))
    procs: list[tuple[NodeSpec, subprocess.Popen, Path]] = field(default_factory=list)

    def client_env(self) -> dict[str, str]:
        """What a driver of this cluster needs in its environment."""
        return {"RAY_ADDRESS": self.address, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.auth_token}

    def tables(self, want: tuple[str, ...] = (), timeout_s: float = START_TIMEOUT_S) -> dict[str, list[dict]]:
        """Ray's node table (NodeManagerAddress, Alive, Resources) and actor table (Name, Address.IPAddress,
        State; dead actors included) from the GCS, once the nodes at `want` are alive."""
        proc = subprocess.run([sys.executable, "-c", PROBE, ",".join(want), str(timeout_s)],
                              capture_output=True, text=True, env={**os.environ, **self.client_env()},
                              timeout=timeout_s + 60, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"reading the GCS at {self.address} failed:\n{proc.stderr[-3000:]}")
        tables = json.loads(proc.stdout.strip().splitlines()[-1])
        alive = {n["NodeManagerAddress"] for n in tables["nodes"] if n["Alive"]}
        if not set(want) <= alive:
            logs = "\n".join(f"{log}:\n{log.read_text()[-2000:]}" for _, _, log in self.procs)
            raise TimeoutError(f"nodes {sorted(set(want) - alive)} not alive in the GCS at {self.address} "
                               f"after {timeout_s:.0f} s (alive: {sorted(alive)}); ray start logs:\n{logs}")
        return tables

    def _start(self, spec: NodeSpec, head: bool) -> None:
        log = self.log_dir / f"ray_start_{spec.ip}.log"
        ray = Path(sys.executable).with_name("ray")
        cmd = [str(ray), "start", "--block", f"--node-ip-address={spec.ip}", f"--num-cpus={spec.num_cpus}",
               f"--num-gpus={spec.num_gpus}", f"--resources={json.dumps(spec.resources)}",
               f"--temp-dir={self.temp_dir}", "--object-store-memory=500000000", "--disable-usage-stats",
               # two raylets on one machine: no fixed port may be shared (workers: OS-assigned ports)
               "--min-worker-port=0", "--max-worker-port=0",
               f"--dashboard-agent-listen-port={free_port(spec.ip)}"]
        if head:
            cmd += ["--head", f"--port={self.address.rsplit(':', 1)[1]}", "--include-dashboard=false",
                    f"--ray-client-server-port={free_port(spec.ip)}"]
        else:
            cmd += [f"--address={self.address}"]
        if spec.private_dirs:
            if os.geteuid() != 0:
                raise PermissionError(f"node {spec.ip}: private directories need a mount namespace (root)")
            mounts = []
            for d in spec.private_dirs:
                Path(d).mkdir(parents=True, exist_ok=True)
                mounts.append(f"mount -t tmpfs ring-ext-private {shlex.quote(str(d))}")
            # mounts made in the namespace stay there (private propagation); exec: the raylet keeps the pid
            cmd = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                   " && ".join(mounts) + ' && exec "$@"', "sh", *cmd]
        env = {**os.environ, **self.env, MARKER: self.token, "RAY_USAGE_STATS_ENABLED": "0",
               **self.client_env()}
        env.pop("RAY_ADDRESS")  # the head starts a cluster; the worker gets --address
        with log.open("w") as out:  # its own session: signals to the test's process group never reach it
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                    start_new_session=True)
        self.procs.append((spec, proc, log))
        # `ray start` says so once its node's processes run (registration is checked by `tables`)
        deadline = time.monotonic() + START_TIMEOUT_S
        while "Ray runtime started." not in log.read_text():
            if proc.poll() is not None:
                raise RuntimeError(f"ray start on {spec.ip} exited {proc.returncode}:\n"
                                   f"{log.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"ray start on {spec.ip} did not start its node within "
                                   f"{START_TIMEOUT_S:.0f} s; log {log}:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)

    def _marked_pids(self) -> list[int]:
        """Processes whose environment carries this cluster's marker (raylets, workers, vLLM's engine...)."""
        needle = f"{MARKER}={self.token}".encode()
        pids = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and int(entry.name) != os.getpid():
                try:
                    if needle in (entry / "environ").read_bytes().split(b"\0"):
                        pids.append(int(entry.name))
                except OSError:  # gone, or not ours to read
                    pass
        return pids

    def stop(self) -> list[int]:
        """SIGTERM each node's session (worker first), then SIGKILL what is left; returns the pids killed."""
        for _, proc, _ in reversed(self.procs):
            _signal_group(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while self._marked_pids() and time.monotonic() < deadline:
            time.sleep(0.5)
        left = self._marked_pids()
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for _, proc, _ in self.procs:
            proc.wait(timeout=STOP_TIMEOUT_S)
        return left


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


@contextmanager
def two_hosts(head: NodeSpec, worker: NodeSpec, log_dir: Path,
              env: dict[str, str] | None = None) -> Iterator[TwoHosts]:
    """Start the head node, then the worker node; stop both however the body ends."""
    temp_dir = Path(tempfile.mkdtemp(prefix="rx2h_", dir="/tmp"))  # short: Ray's unix socket paths live in it
    cluster = TwoHosts(f"{head.ip}:{free_port(head.ip)}", temp_dir, log_dir, secrets.token_hex(8), env or {})
    try:
        cluster._start(head, head=True)
        cluster._start(worker, head=False)
        yield cluster
    finally:
        left = cluster.stop()
        if left:
            print(f"two hosts: SIGKILLed {len(left)} processes left after SIGTERM: {left}")
        shutil.rmtree(temp_dir, ignore_errors=True)
