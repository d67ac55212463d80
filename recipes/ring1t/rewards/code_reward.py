"""Code reward for the ring1t stage recipes (a verl custom reward function).

Use with ``reward.custom_reward_function.path=recipes/ring1t/rewards/code_reward.py`` and
``name=compute_score``.  Ground truth is JSON: ``{"inputs": [...], "outputs": [...]}``
(stdin/stdout tests) or ``{"asserts": "..."}`` (Python asserts appended to the program, one
test per top-level ``assert``).  The program is the last fenced ```python block (else the
last fenced block, else the whole text).  Every test runs in ``sandbox.py`` (loaded by path
next to this file); score = fraction of tests passed, acc = 1.0 only if all pass.
Optional reward_kwargs: cpu_seconds, memory_mb, wall_seconds, max_workers.
"""

from __future__ import annotations

import ast
import json
import os
import re
import secrets
import threading
from typing import Any

from ring_ext.recipes import load_sibling

_FENCE_PY = re.compile(r"```[ \t]*(?:python3?|py)[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL | re.IGNORECASE)
_FENCE_ANY = re.compile(r"```[^\n`]*\n(.*?)```", re.DOTALL)
_pool_lock = threading.Lock()
_pools: dict[int, Any] = {}


def _sandbox() -> Any:
    return load_sibling(__file__, "sandbox.py")  # this file is itself loaded by path by verl


def _pool(max_workers: int) -> Any:
    sbx = _sandbox()
    with _pool_lock:
        if max_workers not in _pools:
            _pools[max_workers] = sbx.SandboxPool(max_workers=max_workers)
        return _pools[max_workers]


def extract_code(text: str) -> str:
    blocks = _FENCE_PY.findall(text) or _FENCE_ANY.findall(text)
    return blocks[-1] if blocks else text


def _as_text(x: Any) -> str:
    return "\n".join(map(str, x)) if isinstance(x, (list, tuple)) else str(x)


def _norm(out: str) -> list[str]:
    return [line.rstrip() for line in out.strip().splitlines()]


def _assert_bodies(asserts: str) -> list[str]:
    """One program tail per top-level assert (non-assert statements kept as setup)."""
    try:
        stmts = ast.parse(asserts).body
    except SyntaxError:
        return [asserts]
    segs = [ast.get_source_segment(asserts, s) or "" for s in stmts]
    idx = [i for i, s in enumerate(stmts) if isinstance(s, ast.Assert)]
    if not idx:
        return [asserts]
    return ["\n".join(segs[j] for j in range(i + 1) if j == i or not isinstance(stmts[j], ast.Assert)) for i in idx]


def parse_tests(ground_truth: Any) -> tuple[str, list[tuple[str, str]]]:
    """-> (kind, [(program_tail_or_stdin, expected)]); raises ValueError on bad ground truth."""
    gt = json.loads(ground_truth) if isinstance(ground_truth, (str, bytes)) else ground_truth
    if not isinstance(gt, dict):
        raise TypeError("ground truth must be a JSON object")
    if gt.get("asserts"):
        asserts = _as_text(gt["asserts"])
        return "asserts", [(body, "") for body in _assert_bodies(asserts)]
    ins, outs = gt.get("inputs"), gt.get("outputs")
    if gt.get("fn_name"):
        raise ValueError("call-based tests (fn_name) are not supported")
    if not isinstance(ins, list) or not isinstance(outs, list) or not ins or len(ins) != len(outs):
        raise ValueError("need non-empty equal-length 'inputs'/'outputs' lists or 'asserts'")
    return "stdio", [(_as_text(i), _as_text(o)) for i, o in zip(ins, outs)]


def compute_score(data_source: Any, solution_str: Any, ground_truth: Any, extra_info: Any = None,
                  cpu_seconds: int = 5, memory_mb: int = 512, wall_seconds: float = 10,
                  max_workers: int | None = None, **kwargs: Any) -> dict[str, Any]:
    """verl reward: fraction of tests passed in the sandbox (acc 1.0 only if all pass)."""
    out: dict[str, Any] = {"score": 0.0, "acc": 0.0, "passed": 0, "total": 0, "status": "", "error": ""}
    try:
        kind, tests = parse_tests(ground_truth)
    except Exception as e:  # noqa: BLE001  (any malformed ground truth)
        out["error"] = f"invalid ground truth: {e}"[:200]
        return out
    out["total"] = len(tests)
    try:
        code = extract_code(solution_str if isinstance(solution_str, str) else "")
        if not code.strip():
            out["error"] = "no code found"
            return out
        sbx = _sandbox()
        limits = sbx.SandboxLimits(cpu_seconds=cpu_seconds, memory_mb=memory_mb, wall_seconds=wall_seconds)
        nonce = secrets.token_hex(8)  # printed after the asserts: an early exit(0) cannot pass
        if kind == "asserts":
            jobs = [(f"{code}\n\n{body}\nprint({nonce!r})\n", "") for body, _ in tests]
        else:
            jobs = [(code, stdin) for stdin, _ in tests]
        results = _pool(max_workers or min(4, os.cpu_count() or 1)).run_many(jobs, limits, stop_on_timeout=True)
        passed, counts = 0, {}
        for (_, expected), res in zip(tests, results):
            counts[res.status] = counts.get(res.status, 0) + 1
            if res.status != "ok":
                continue
            if kind == "asserts":
                passed += _norm(res.stdout)[-1:] == [nonce]
            else:
                passed += _norm(res.stdout) == _norm(expected)
        errors = [r.stderr.strip()[-200:] for r in results if r.status == "error"]
        out.update(score=passed / len(tests), acc=float(passed == len(tests)), passed=passed,
                   status=",".join(f"{k}={v}" for k, v in sorted(counts.items())),
                   error=f"sandbox error: {errors[0]}" if errors else "")
    except Exception as e:  # noqa: BLE001  (never raise into the trainer)
        out["error"] = f"code reward error: {e!r}"[:200]
    return out
