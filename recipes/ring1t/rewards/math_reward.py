"""Math reward for the ring1t stage recipes (a verl custom reward function).

Use with ``reward.custom_reward_function.path=recipes/ring1t/rewards/math_reward.py`` and
``reward.custom_reward_function.name=compute_score``.  The final answer is the last balanced
``\\boxed{...}`` (else the text after the last ``####`` / "answer is"); it is compared with the
ground truth by math-verify (``verify(parse(gt), parse(pred))``: equivalence of expressions).

verl calls reward functions from executor threads, where math-verify's ``signal.alarm``
timeouts cannot work, and some sympy work (``9^{9^9}``) never returns.  So every check runs
in a persistent helper process (math-verify's own timeouts active in its main thread) and
is bounded by a wall-clock timeout after which the helper is SIGKILLed and replaced.
"""

from __future__ import annotations

import json
import math
import os
import re
import selectors
import subprocess
import sys
import threading
import time
from typing import Any

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
MAX_ANSWER_CHARS = 2000
_ANSWER_IS = re.compile(r"answer\s+is", re.IGNORECASE)

_WORKER_SRC = r"""
import json, resource, sys
resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))
from math_verify import parse, verify
sys.stdout.write("ready\n"); sys.stdout.flush()
for line in sys.stdin:
    job = json.loads(line)
    t = job["t"]
    try:
        gold = parse(job["gt"], parsing_timeout=t)
        pred = parse(job["pred"], parsing_timeout=t)
        gold_ok = any(not isinstance(g, str) for g in gold)  # not just math-verify's string fallback
        out = {"gold_ok": gold_ok, "ok": gold_ok and bool(pred) and bool(verify(gold, pred, timeout_seconds=t))}
    except BaseException as e:
        out = {"gold_ok": True, "ok": False, "error": repr(e)[:200]}
    sys.stdout.write(json.dumps(out) + "\n"); sys.stdout.flush()
"""


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` / ``\\fbox{...}`` with balanced braces."""
    for m in reversed(list(_BOXED.finditer(text))[-8:]):  # bounded work on adversarial text
        depth, i = 1, m.end()
        while i < len(text):
            c = text[i]
            if c == "\\":
                i += 2
                continue
            depth += (c == "{") - (c == "}")
            if depth == 0:
                return text[m.end():i].strip()
            i += 1
    return None


def _strip_math_delims(ans: str) -> str:
    ans = ans.strip().rstrip(".").strip()
    for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if ans.startswith(left) and ans.endswith(right) and len(ans) >= len(left) + len(right):
            return ans[len(left):len(ans) - len(right)].strip()
    return ans


def extract_answer(text: str) -> str | None:
    """Final answer: last balanced \\boxed{}, else after the last '####', else after 'answer is'."""
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed or None
    for marker in ("####", None):
        if marker is not None:
            pos = text.rfind(marker)
            start = pos + len(marker) if pos >= 0 else -1
        else:
            found = list(_ANSWER_IS.finditer(text))
            start = found[-1].end() if found else -1
        if start >= 0:
            ans = text[start:].strip().lstrip(":").strip().split("\n")[0]
            ans = _strip_math_delims(ans)
            if ans:
                return ans
    return None


class _Worker:
    """A math-verify helper process speaking JSON lines."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", _WORKER_SRC], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True)
        self._buf = b""
        if self._readline(time.monotonic() + 120) != b"ready":
            self.kill()
            raise RuntimeError("math-verify helper process failed to start")

    def _readline(self, deadline: float) -> bytes | None:
        assert self.proc.stdout is not None
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            while b"\n" not in self._buf:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not sel.select(remaining):
                    return None
                chunk = os.read(self.proc.stdout.fileno(), 65536)
                if not chunk:
                    return None
                self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line

    def ask(self, job: dict[str, Any], timeout_s: float) -> dict[str, Any] | None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps(job).encode() + b"\n")
            self.proc.stdin.flush()
            line = self._readline(time.monotonic() + timeout_s)
            return json.loads(line) if line else None
        except (OSError, ValueError):
            return None

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()


_idle: list[_Worker] = []
_lock = threading.Lock()


def check_equivalent(gt: str, pred: str, timeout_s: float = 10.0) -> tuple[bool, str]:
    """(equivalent, error) for LaTeX ``gt`` and ``pred``; bounded by ``timeout_s`` wall seconds."""
    if len(pred) > MAX_ANSWER_CHARS or len(gt) > MAX_ANSWER_CHARS:
        return False, f"answer longer than {MAX_ANSWER_CHARS} characters"
    with _lock:
        worker = _idle.pop() if _idle else None
    if worker is None:
        worker = _Worker()
    step_timeout = max(1, int(timeout_s // 3))  # math-verify's own (signal) timeout per parse/verify
    res = worker.ask({"gt": f"${gt}$", "pred": f"${pred}$", "t": step_timeout}, timeout_s)
    if res is None:
        worker.kill()
        return False, f"math-verify timed out after {timeout_s}s (helper killed)"
    with _lock:
        if len(_idle) < 16:
            _idle.append(worker)
            worker = None
    if worker is not None:
        worker.kill()
    if not res.get("gold_ok", True):
        return False, "ground truth could not be parsed by math-verify"
    return bool(res["ok"]), str(res.get("error", ""))


def _gt_text(ground_truth: Any) -> str | None:
    if isinstance(ground_truth, bool) or ground_truth is None:
        return None
    if isinstance(ground_truth, (int, float)):
        return None if isinstance(ground_truth, float) and not math.isfinite(ground_truth) else str(ground_truth)
    if isinstance(ground_truth, str) and ground_truth.strip():
        boxed = last_boxed(ground_truth)
        return _strip_math_delims(boxed if boxed else ground_truth) or None
    return None


def compute_score(data_source: Any, solution_str: Any, ground_truth: Any, extra_info: Any = None,
                  timeout_s: float = 10.0, **kwargs: Any) -> dict[str, Any]:
    """verl reward: score/acc 1.0 if the final answer is equivalent to the ground truth, else 0.0."""
    out: dict[str, Any] = {"score": 0.0, "acc": 0.0, "pred": "", "error": ""}
    gt = _gt_text(ground_truth)
    if gt is None:
        out["error"] = f"invalid ground truth: {ground_truth!r}"[:200]
        return out
    try:
        pred = extract_answer(solution_str) if isinstance(solution_str, str) else None
        if not pred:
            out["error"] = "no final answer found"
            return out
        out["pred"] = pred[:200]
        ok, err = check_equivalent(gt, pred, timeout_s)
        out.update(score=float(ok), acc=float(ok), error=err)
    except Exception as e:  # noqa: BLE001  (never raise into the trainer)
        out["error"] = f"math reward error: {e!r}"[:200]
    return out
