"""Tests for recipes/ring1t/rewards/sandbox.py: real child processes in real namespaces."""

from __future__ import annotations

import importlib.util
import os
import resource
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

SANDBOX_PATH = Path(__file__).resolve().parents[1] / "recipes" / "ring1t" / "rewards" / "sandbox.py"


def _load() -> Any:
    spec = importlib.util.spec_from_file_location("ring1t_sandbox_under_test", SANDBOX_PATH)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)  # deliberately not put in sys.modules (as verl loads files)
    spec.loader.exec_module(mod)
    return mod


sbx = _load()
needs_isolation = pytest.mark.skipif(sbx._preflight() is not None, reason=f"{sbx._preflight()}")
L = sbx.SandboxLimits


@needs_isolation
def test_correct_program_exact_stdout() -> None:
    res = sbx.run_python("import sys\nprint(sum(map(int, sys.stdin.read().split())))", "1 2 3\n")
    assert (res.status, res.returncode, res.stdout) == ("ok", 0, "6\n")


@needs_isolation
def test_wrong_program_failed() -> None:
    res = sbx.run_python("raise ValueError('nope')")
    assert res.status == "failed" and res.returncode != 0 and "ValueError: nope" in res.stderr


@needs_isolation
def test_infinite_loop_killed_at_wall_limit() -> None:
    res = sbx.run_python("import time\nwhile True:\n    time.sleep(0.05)", limits=L(wall_seconds=1))
    assert res.status == "timeout" and res.duration_s < 1 + 2


@needs_isolation
def test_cpu_bound_loop_hits_cpu_limit() -> None:
    res = sbx.run_python("while True:\n    pass", limits=L(cpu_seconds=1, wall_seconds=10))
    assert res.status == "timeout" and "CPU" in res.stderr
    assert res.duration_s < 5  # the CPU limit, not the 10 s wall clock, ended it


@needs_isolation
def test_2gib_allocation_hits_memory_limit_parent_unaffected() -> None:
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    res = sbx.run_python("x = bytearray(2 * 1024 ** 3)\nprint('allocated')", limits=L(memory_mb=256))
    assert res.status == "memory" and "allocated" not in res.stdout
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before < 512 * 1024  # not in this process
    assert sbx.run_python("print('still fine')").stdout == "still fine\n"


@needs_isolation
def test_network_refused() -> None:
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    server.settimeout(0.3)
    port = server.getsockname()[1]
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):  # control: reachable from here
            server.accept()[0].close()
        code = (f"import socket\ntry:\n    socket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
                "    print('CONNECTED')\nexcept OSError as e:\n    print('BLOCKED', e.errno)")
        res = sbx.run_python(code)
        assert res.status == "ok" and res.stdout.startswith("BLOCKED"), res
        with pytest.raises(socket.timeout):
            server.accept()
    finally:
        server.close()


@needs_isolation
def test_writes_outside_sandbox_refused_inside_allowed() -> None:
    outside = tempfile.mkdtemp(prefix="ring1t-outside-")
    os.chmod(outside, 0o777)  # permissions alone would allow it: only the read-only mount can stop it
    target = os.path.join(outside, "evil.txt")
    try:
        code = (f"import errno\ntry:\n    open({target!r}, 'w').write('x')\n    print('WROTE')\n"
                "except OSError as e:\n    print('REFUSED', errno.errorcode[e.errno])\n"
                "open('inside.txt', 'w').write('hello')\nprint(open('inside.txt').read())")
        res = sbx.run_python(code)
        assert res.status == "ok", res
        assert res.stdout.splitlines() == ["REFUSED EROFS", "hello"]
        assert not os.path.exists(target)
    finally:
        shutil.rmtree(outside, ignore_errors=True)


@needs_isolation
def test_cannot_remount_writable() -> None:
    code = ("import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\n"
            "rc = libc.mount(None, b'/', None, ctypes.c_ulong(32 | 4096), None)\n"
            "print(rc, ctypes.get_errno() == 1, os.getuid() != 0)")
    assert sbx.run_python(code).stdout == "-1 True True\n"


@needs_isolation
def test_fork_bomb_bounded_and_reaped() -> None:
    marker = "41.271828"
    code = ("import os\nn = 0\nfor _ in range(200):\n    try:\n        pid = os.fork()\n    except OSError:\n"
            f"        break\n    if pid == 0:\n        os.execv('/bin/sleep', ['sleep', '{marker}'])\n"
            "    n += 1\nprint(n)")
    res = sbx.run_python(code, limits=L(max_processes=8, wall_seconds=5))
    assert res.status == "ok" and 0 < int(res.stdout) < 8
    time.sleep(0.2)
    leftovers = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if marker.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                leftovers.append(pid)
        except OSError:
            pass
    assert not leftovers  # the PID namespace took the sleeping children down with it


@needs_isolation
def test_parent_environment_not_visible(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RING1T_TEST_SECRET", "hunter2-secret")
    res = sbx.run_python("import os\nprint(sorted(os.environ.items()))\nprint(open('/proc/self/environ').read())")
    assert res.status == "ok" and "hunter2" not in res.stdout and "RING1T_TEST_SECRET" not in res.stdout


@needs_isolation
def test_throwaway_dir_removed() -> None:
    res = sbx.run_python("import os\nopen('junk', 'w').write('x')\nprint(os.getcwd())")
    cwd = res.stdout.strip()
    assert res.status == "ok" and cwd.startswith(tempfile.gettempdir()) and not os.path.exists(cwd)


@needs_isolation
def test_output_is_capped() -> None:
    res = sbx.run_python("while True:\n    print('x' * 1000)", limits=L(max_output_bytes=5000))
    assert res.status == "failed" and len(res.stdout) <= 5000 and "output limit" in res.stderr


@needs_isolation
def test_pool_parallel_and_ordered() -> None:
    codes = [f"import time\ntime.sleep(0.5)\nprint({i})" for i in range(4)]
    with sbx.SandboxPool(max_workers=2) as pool:
        t0 = time.monotonic()
        results = pool.map(codes)
        elapsed = time.monotonic() - t0
        assert [r.stdout for r in results] == ["0\n", "1\n", "2\n", "3\n"]
        assert elapsed < 1.6  # serial would be >= 2.0 s
        echoed = pool.run_many([("print(input())", "a\n"), ("print(input() * 2)", "b\n")])
        assert [r.stdout for r in echoed] == ["a\n", "bb\n"]


def test_fails_closed_without_isolation(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sbx, "UNSHARE", None)
    res = sbx.run_python("print('ran')")
    assert res.status == "error" and "unshare" in res.stderr and res.stdout == ""
    if os.geteuid() == 0:  # namespace creation "fails" (no ready signal) -> refused, not run
        monkeypatch.setattr(sbx, "UNSHARE", "/bin/false")
        res = sbx.run_python("print('ran')")
        assert res.status == "error" and "ran" not in res.stdout


def test_sandbox_module_has_no_sys_modules_dependency() -> None:
    assert "ring1t_sandbox_under_test" not in sys.modules and sbx.SandboxLimits().cpu_seconds == 5
