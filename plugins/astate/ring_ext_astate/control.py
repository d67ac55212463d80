"""The in-place sync's control channel: a worker-side server, the sender's client, and who may talk.

No verl, no vLLM. Writable parameter memory is a way into the model, so the worker hands out its arena's name only
to a sender that proves it holds the worker's secret (an HMAC over a fresh nonce), and takes reports only with a
valid MAC. The secret, the control socket's path and nothing else go into a descriptor file; the directory is 0700
and the descriptor and the socket 0600, so only the run's own user can even try.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import threading
import time
from pathlib import Path
from typing import Any

import zmq

from ring_ext_astate.errors import SyncError


def _mac(secret: bytes, *parts: Any) -> str:
    return hmac.new(secret, repr(parts).encode(), hashlib.sha256).hexdigest()


def private_dir(path: str | Path) -> Path:
    path = Path(path)
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path


def wait_for_file(path: Path, timeout_s: float, what: str) -> None:
    """Until `path` exists (a descriptor, a replica leader's "session open" marker); SyncError naming it after
    `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if time.monotonic() > deadline:
            raise SyncError(f"astate: no {what} at {path} within {timeout_s}s")
        time.sleep(0.01)


def descriptor_path(run_dir: str | Path, rank: int) -> Path:
    return Path(run_dir) / f"worker{rank}.json"


class ControlServer:
    """Runs in the rollout worker: answers hellos with `welcome()`'s payload, queues reports per version."""

    def __init__(self, run_dir: str | Path, rank: int, welcome: Any, classify: Any) -> None:
        self.secret = secrets.token_bytes(32)
        self.welcome = welcome  # a callable returning the payload a proven sender gets
        self.classify = classify  # (name, shape, dtype) -> True if the worker ignores that tensor
        self.refused = 0
        self.reports: dict[int, list[dict]] = {}
        self._cond = threading.Condition()
        run_dir = private_dir(run_dir)
        self.path = run_dir / f"ctl-{secrets.token_hex(8)}.sock"
        self.sock = zmq.Context.instance().socket(zmq.REP)
        self.sock.bind(f"ipc://{self.path}")
        os.chmod(self.path, 0o600)
        self.descriptor = descriptor_path(run_dir, rank)
        fd = os.open(self.descriptor, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"socket": str(self.path), "secret": self.secret.hex()}, f)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="astate-control", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            if not self.sock.poll(100):
                continue
            msg = self.sock.recv_pyobj()
            try:
                self.sock.send_pyobj(self._answer(msg))
            except Exception as e:  # a bad message never kills the server
                self.sock.send_pyobj(("refused", f"{type(e).__name__}: {e}"))

    def _answer(self, msg: tuple) -> tuple:
        kind, body, mac = msg
        if not hmac.compare_digest(mac, _mac(self.secret, kind, body)):
            self.refused += 1
            return ("refused", "the handshake does not prove this run's secret")
        if kind == "hello":
            return ("welcome", self.welcome())
        if kind == "classify":
            return ("ok", self.classify(*body))
        if kind == "report":
            with self._cond:
                self.reports.setdefault(body["version"], []).append(body)
                self._cond.notify_all()
            return ("ok",)
        return ("refused", f"unknown message {kind!r}")

    def wait_reports(self, version: int, count: int, timeout_s: float) -> list[dict]:
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while len(self.reports.get(version, [])) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    got = len(self.reports.get(version, []))
                    raise SyncError(f"sync {version}: {got} of {count} sender report(s) within {timeout_s}s "
                                    "(a sender died or was slower than astate timeout_s)")
                self._cond.wait(left)
            return self.reports.pop(version)

    def drop_reports(self, below: int) -> None:
        with self._cond:
            for v in [v for v in self.reports if v < below]:
                del self.reports[v]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self.sock.close(linger=0)
        for p in (self.path, self.descriptor):
            Path(p).unlink(missing_ok=True)


class ControlClient:
    """Runs in a sender: reads the worker's descriptor, then every message carries a MAC of the secret."""

    def __init__(self, descriptor: str | Path, timeout_s: float) -> None:
        d = json.loads(Path(descriptor).read_text())
        self.secret, self.timeout_ms = bytes.fromhex(d["secret"]), int(timeout_s * 1000)
        self.address = f"ipc://{d['socket']}"
        self.sock: zmq.Socket | None = None

    def _call(self, kind: str, body: Any) -> Any:
        if self.sock is None:
            self.sock = zmq.Context.instance().socket(zmq.REQ)
            self.sock.setsockopt(zmq.LINGER, 0)
            self.sock.connect(self.address)
        self.sock.send_pyobj((kind, body, _mac(self.secret, kind, body)))
        if not self.sock.poll(self.timeout_ms):
            self.close()  # a REQ socket without its reply is stuck: the next call reconnects
            raise SyncError(f"no answer from the rollout worker's astate control socket {self.address} "
                            f"within {self.timeout_ms / 1000}s")
        reply = self.sock.recv_pyobj()
        if reply[0] == "refused":
            raise SyncError(f"the rollout worker refused {kind!r}: {reply[1]}")
        return reply[1] if len(reply) > 1 else None

    def hello(self) -> Any:
        return self._call("hello", secrets.token_hex(16))

    def ignores(self, name: str, shape: tuple[int, ...], dtype: str) -> bool:
        return self._call("classify", (name, shape, dtype))

    def report(self, body: dict) -> None:
        self._call("report", body)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close(linger=0)
            self.sock = None
