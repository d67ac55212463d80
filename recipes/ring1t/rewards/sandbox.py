"""Process sandbox for untrusted Python: the "ASandbox idea at laptop scale".

Used by ``recipes/ring1t/rewards/code_reward.py`` (the verl custom reward function of the
ring1t code stage).  Every program runs in a fresh child process tree that gets:

* its own network, mount, PID, IPC and UTS namespaces (``unshare``); the new network
  namespace has only a downed loopback, so no socket can reach anything;
* a read-only view of *every* mount (bind-remounted ``MS_RDONLY`` inside the private mount
  namespace) except a throwaway working directory (tempfile, deleted afterwards);
* a fresh unprivileged uid/gid (no capabilities, ``no_new_privs``), so it cannot undo the
  remounts, and so that ``RLIMIT_NPROC`` really bounds its process count;
* rlimits for CPU time, address space, processes, file size, open files, no core dumps;
* a wall-clock timeout after which the PID-namespace init is SIGKILLed (taking the whole
  namespace with it) and the process group is killed as well;
* a minimal environment (no inherited secrets) and ``python -I`` (isolated mode).

If isolation cannot be set up (not root, no ``unshare``, namespace creation fails) the run
is refused with status ``"error"`` -- it fails closed and never runs code without isolation.
"""

import itertools
import os
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal, Self

__all__ = ["UNSHARE", "SandboxLimits", "SandboxPool", "SandboxResult", "run_python"]

Status = Literal["ok", "failed", "timeout", "memory", "error"]
UNSHARE: str | None = shutil.which("unshare")


@dataclass
class SandboxLimits:
    cpu_seconds: int = 5
    memory_mb: int = 512
    wall_seconds: float = 10
    max_output_bytes: int = 64_000
    max_processes: int = 32
    max_file_mb: int = 16
    max_open_files: int = 64


@dataclass
class SandboxResult:
    status: Status
    returncode: int | None
    stdout: str
    stderr: str
    duration_s: float


# Runs as root *inside* the new namespaces, sets up the read-only view, drops privileges
# and execs the untrusted interpreter.  Reports "R" (ready) / "X" (exec failed) on a pipe
# whose write end is close-on-exec, so the untrusted program can never forge it.
_LAUNCHER = r"""
import ctypes, os, resource, sys
fd, work, uid = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
cpu, mem, nproc, fsize, nofile = (int(v) for v in sys.argv[4:9])
argv = sys.argv[9:]
os.set_inheritable(fd, False)
libc = ctypes.CDLL(None, use_errno=True)
RDONLY, NOSUID, NODEV, NOEXEC, REMOUNT, BIND, REC, PRIVATE = 1, 2, 4, 8, 32, 4096, 16384, 1 << 18
def mnt(src, tgt, flags):
    if libc.mount(src, tgt.encode(), None, ctypes.c_ulong(flags), None) != 0:
        e = ctypes.get_errno()
        raise OSError(e, "mount(%s): %s" % (tgt, os.strerror(e)))
def unesc(s):
    return s.encode().decode("unicode_escape").encode("latin-1").decode()
try:
    mnt(None, "/", REC | PRIVATE)
    mnt(work.encode(), work, BIND)
    mnt(None, work, REMOUNT | BIND | NOSUID | NODEV)
    with open("/proc/self/mountinfo") as f:
        points = [unesc(line.split()[4]) for line in f]
    for mp in points:
        if mp != work:
            mnt(None, mp, REMOUNT | BIND | RDONLY | (os.statvfs(mp).f_flag & (NOSUID | NODEV | NOEXEC)))
    for mp in points:
        if mp != work and not os.statvfs(mp).f_flag & RDONLY:
            raise OSError("mount %s is still writable" % mp)
    for res, val in ((resource.RLIMIT_CPU, cpu), (resource.RLIMIT_AS, mem), (resource.RLIMIT_NPROC, nproc),
                     (resource.RLIMIT_FSIZE, fsize), (resource.RLIMIT_NOFILE, nofile), (resource.RLIMIT_CORE, 0)):
        resource.setrlimit(res, (val, val))
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)
    if libc.prctl(38, 1, 0, 0, 0) != 0 or libc.prctl(1, 9, 0, 0, 0) != 0:  # NO_NEW_PRIVS, PDEATHSIG=KILL
        raise OSError("prctl failed")
    if os.getuid() == 0 or os.geteuid() == 0:
        raise OSError("could not drop root")
    os.chdir(work)
except BaseException as e:
    sys.stderr.write("sandbox setup failed: %r\n" % (e,))
    os._exit(121)
env = {"PATH": "/usr/bin:/bin", "HOME": work, "TMPDIR": work, "LANG": "C.UTF-8",
       "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
os.write(fd, b"R")
try:
    os.execve(argv[0], argv, env)
except BaseException as e:
    os.write(fd, b"X")
    sys.stderr.write("sandbox setup failed: exec %r\n" % (e,))
    os._exit(121)
"""

_uid_lock = threading.Lock()
_uid_counter = itertools.count()
_UID_BASE = 1_000_000 + (os.getpid() % 4096) * 4096


def _next_uid() -> int:
    """A fresh unprivileged uid per run, so RLIMIT_NPROC counts only this run's processes."""
    with _uid_lock:
        return _UID_BASE + next(_uid_counter) % 4096


def _usable_by_others(path: str) -> bool:
    """True if an unprivileged uid can traverse to and execute ``path`` (and its prefix)."""
    real = os.path.realpath(path)
    parts = real.split(os.sep)
    for i in range(2, len(parts)):
        mode = os.stat(os.sep.join(parts[:i]) or "/").st_mode
        if not mode & stat.S_IXOTH:
            return False
    return bool(os.stat(real).st_mode & stat.S_IXOTH)


def _sandbox_python() -> str | None:
    candidates = [os.environ.get("RING1T_SANDBOX_PYTHON") or "", sys.executable, "/usr/bin/python3",
                  shutil.which("python3") or ""]
    for cand in candidates:
        try:
            if cand and os.path.exists(cand) and _usable_by_others(cand):
                return cand
        except OSError:
            continue
    return None


def _preflight() -> str | None:
    """Return a reason to refuse (fail closed), or None if isolation can be set up."""
    if not sys.platform.startswith("linux"):
        return "sandbox refused: namespaces require Linux"
    if UNSHARE is None or not os.path.exists(UNSHARE):
        return "sandbox refused: `unshare` not found; will not run untrusted code with network/file access"
    if os.geteuid() != 0:
        return "sandbox refused: root (CAP_SYS_ADMIN) is needed for network/mount namespaces and uid drop"
    if _sandbox_python() is None:
        return "sandbox refused: no python interpreter usable by an unprivileged uid (set RING1T_SANDBOX_PYTHON)"
    return None


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the PID-namespace init (kills the whole namespace) and unshare's process group."""
    try:
        with open(f"/proc/{proc.pid}/task/{proc.pid}/children") as f:
            for child in f.read().split():
                os.kill(int(child), signal.SIGKILL)
    except (OSError, ValueError):
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except OSError:
        pass


def _communicate(proc: subprocess.Popen, data: bytes, deadline: float, cap: int) -> tuple[bytes, bytes, str]:
    """Feed stdin / read capped stdout+stderr until EOF, the deadline, or the output cap."""
    bufs = {"out": bytearray(), "err": bytearray()}
    assert proc.stdin and proc.stdout and proc.stderr
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ, "out")
    sel.register(proc.stderr, selectors.EVENT_READ, "err")
    if data:
        os.set_blocking(proc.stdin.fileno(), False)
        sel.register(proc.stdin, selectors.EVENT_WRITE, "in")
    else:
        proc.stdin.close()
    offset = 0
    try:
        while sel.get_map():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return bytes(bufs["out"]), bytes(bufs["err"]), "timeout"
            for key, _ in sel.select(min(remaining, 0.5)):
                if key.data == "in":
                    try:
                        offset += os.write(key.fd, data[offset:offset + 65536])
                    except OSError:
                        offset = len(data)
                    if offset >= len(data):
                        sel.unregister(key.fileobj)
                        proc.stdin.close()
                    continue
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    sel.unregister(key.fileobj)
                    continue
                buf = bufs[key.data]
                buf += chunk[: max(0, cap - len(buf))]
                if len(buf) >= cap:
                    return bytes(bufs["out"]), bytes(bufs["err"]), "output"
    finally:
        sel.close()
    return bytes(bufs["out"]), bytes(bufs["err"]), ""


def run_python(code: str, stdin: str = "", limits: SandboxLimits | None = None) -> SandboxResult:
    """Run ``code`` with ``stdin`` in an isolated child; never raises for program behaviour."""
    lim = limits or SandboxLimits()
    t0 = time.monotonic()
    refusal = _preflight()
    if refusal is not None:
        return SandboxResult("error", None, "", refusal, 0.0)
    root = tempfile.mkdtemp(prefix="ring1t-sbx-")
    ready_r, ready_w = os.pipe()
    proc: subprocess.Popen | None = None
    try:
        os.chmod(root, 0o711)  # root-owned, traversable by the sandbox uid
        work = os.path.join(root, "work")
        os.mkdir(work, 0o700)
        uid = _next_uid()
        with open(os.path.join(work, "main.py"), "w", encoding="utf-8", errors="replace") as f:
            f.write(code)
        os.chown(work, uid, uid)
        os.chown(os.path.join(work, "main.py"), uid, uid)
        mem = lim.memory_mb * 1024 * 1024
        cmd = [UNSHARE or "unshare", "--net", "--mount", "--pid", "--ipc", "--uts", "--fork", "--kill-child",
               "--mount-proc", "--", sys.executable, "-I", "-S", "-c", _LAUNCHER, str(ready_w), work, str(uid),
               str(max(1, int(lim.cpu_seconds))), str(mem), str(lim.max_processes),
               str(lim.max_file_mb * 1024 * 1024), str(lim.max_open_files), _sandbox_python() or "python3",
               "-I", "main.py"]
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                cwd=root, env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"},
                                start_new_session=True, pass_fds=(ready_w,))
        os.close(ready_w)
        ready_w = -1
        deadline = t0 + lim.wall_seconds
        out, err, why = _communicate(proc, stdin.encode("utf-8", "replace"), deadline, lim.max_output_bytes)
        reaped = None
        while not why:  # pipes are closed; wait (bounded) for the process itself
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                reaped = (status, usage)
                break
            if time.monotonic() >= deadline:
                why = "timeout"
            time.sleep(0.01)
        if why:
            _kill_tree(proc)
        status, usage = reaped or os.wait4(proc.pid, 0)[1:]
        rc = proc.returncode = os.waitstatus_to_exitcode(status)
        cpu_used = usage.ru_utime + usage.ru_stime  # includes the reaped namespace init
        os.set_blocking(ready_r, False)
        try:
            ready = os.read(ready_r, 16)
        except BlockingIOError:
            ready = b""
        stdout_s, stderr_s = out.decode("utf-8", "replace"), err.decode("utf-8", "replace")
        duration = time.monotonic() - t0
        if ready != b"R":
            return SandboxResult("error", rc, stdout_s, stderr_s or "sandbox setup failed", duration)
        if why == "timeout":
            return SandboxResult("timeout", rc, stdout_s, stderr_s + "\n[sandbox] wall-clock limit", duration)
        if why == "output":
            return SandboxResult("failed", rc, stdout_s, stderr_s + "\n[sandbox] output limit exceeded", duration)
        if rc == 0:
            return SandboxResult("ok", rc, stdout_s, stderr_s, duration)
        if cpu_used >= 0.9 * max(1, int(lim.cpu_seconds)):  # killed by RLIMIT_CPU (SIGKILL at the hard limit)
            return SandboxResult("timeout", rc, stdout_s, stderr_s + "\n[sandbox] CPU time limit", duration)
        if "MemoryError" in stderr_s or "Cannot allocate memory" in stderr_s:
            return SandboxResult("memory", rc, stdout_s, stderr_s, duration)
        return SandboxResult("failed", rc, stdout_s, stderr_s, duration)
    except Exception as e:  # noqa: BLE001  (infrastructure failure: report, never raise)
        if proc is not None and proc.poll() is None:
            _kill_tree(proc)
            proc.wait()
        return SandboxResult("error", None, "", f"sandbox error: {e!r}", time.monotonic() - t0)
    finally:
        for fd in (ready_r, ready_w):
            if fd >= 0:
                os.close(fd)
        if proc is not None:
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                if stream is not None:
                    try:
                        stream.close()
                    except OSError:
                        pass
        shutil.rmtree(root, ignore_errors=True)


class SandboxPool:
    """Runs several sandboxed programs in parallel (threads managing subprocesses), order-preserving."""

    def __init__(self, max_workers: int = 4, limits: SandboxLimits | None = None) -> None:
        self.limits = limits or SandboxLimits()
        self._executor = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="ring1t-sandbox")

    def run_many(self, jobs: Sequence[tuple[str, str]], limits: SandboxLimits | None = None,
                 stop_on_timeout: bool = False) -> list[SandboxResult]:
        """Run ``(code, stdin)`` jobs in parallel; results in job order.  With ``stop_on_timeout``,
        jobs not yet started when one times out are skipped (reported as status "timeout")."""
        lim = limits or self.limits
        stop = threading.Event()

        def one(job: tuple[str, str]) -> SandboxResult:
            if stop.is_set():
                return SandboxResult("timeout", None, "", "[sandbox] skipped: an earlier job timed out", 0.0)
            res = run_python(job[0], job[1], lim)
            if stop_on_timeout and res.status == "timeout":
                stop.set()
            return res

        return list(self._executor.map(one, jobs))

    def map(self, codes: Iterable[str], stdins: Iterable[str] | None = None,
            limits: SandboxLimits | None = None) -> list[SandboxResult]:
        codes = list(codes)
        ins = list(stdins) if stdins is not None else [""] * len(codes)
        return self.run_many(list(zip(codes, ins)), limits)

    def close(self) -> None:
        self._executor.shutdown(wait=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
