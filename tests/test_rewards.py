"""Tests for the ring1t reward functions (recipes/ring1t/rewards/*), loaded by path through verl."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from omegaconf import OmegaConf
from verl.trainer.ppo.reward import get_custom_reward_fn

REWARDS = Path(__file__).resolve().parents[1] / "recipes" / "ring1t" / "rewards"
KEYS = {"math": {"score", "acc", "pred", "error"}, "code": {"score", "acc", "passed", "total", "status", "error"},
        "stem": {"score", "acc", "pred", "kind", "error"}}


def _load(name: str, **reward_kwargs: Any) -> Callable[..., dict[str, Any]]:
    """Exactly verl's loader: reward.custom_reward_function.{path,name,reward_kwargs}."""
    cfg = OmegaConf.create({"reward": {"custom_reward_function": {
        "path": str(REWARDS / f"{name}_reward.py"), "name": "compute_score", "reward_kwargs": reward_kwargs}}})
    fn = get_custom_reward_fn(cfg)
    assert fn is not None

    def call(solution: Any, gt: Any) -> dict[str, Any]:
        # as verl's NaiveRewardManager calls it: keywords, from an executor thread
        with ThreadPoolExecutor(1) as ex:
            job = ex.submit(lambda: fn(data_source=name, solution_str=solution, ground_truth=gt, extra_info={}))
            out = job.result()
        assert set(out) == KEYS[name] and isinstance(out["score"], float)  # same keys every call (verl lists)
        return out

    return call


math_score = _load("math")
code_score = _load("code", wall_seconds=2, cpu_seconds=1)
stem_score = _load("stem")


@pytest.mark.parametrize("solution,gt", [
    ("So the result is \\boxed{0.5}.", "\\frac{1}{2}"),
    ("Expanding, \\boxed{x^2+2x+1}", "(x+1)^2"),
    ("\\boxed{\\sqrt{2}}", "\\sqrt{2}"),
    ("Thus \\boxed{\\frac{a}{b}} and that's it", "a/b"),
    ("first \\boxed{3} then corrected \\boxed{\\frac{1}{2}}", "0.5"),
    ("Natalia sold 48 clips.\n#### 72", "72"),
    ("Therefore, the answer is $\\frac{3}{4}$.", "0.75"),
    ("\\boxed{\\{1,2\\}}", "\\boxed{\\{2,1\\}}"),
])
def test_math_equivalent(solution: str, gt: str) -> None:
    out = math_score(solution, gt)
    assert out["score"] == 1.0 and out["acc"] == 1.0, out


@pytest.mark.parametrize("solution,gt", [
    ("\\boxed{0.33}", "1/3"), ("\\boxed{x-1}", "x+1"), ("\\boxed{3} ... \\boxed{4}", "3"),
])
def test_math_not_equivalent(solution: str, gt: str) -> None:
    assert math_score(solution, gt)["score"] == 0.0


@pytest.mark.parametrize("solution", [None, "", "no answer here", "\\boxed{", "\\boxed{}", "\\boxed{\\frac{1}{", 12345,
                                      "\\boxed{" * 500 + "}" * 3])
def test_math_malformed_outputs_score_zero(solution: Any) -> None:
    assert math_score(solution, "1")["score"] == 0.0


@pytest.mark.parametrize("gt", [None, "", "   ", float("nan"), ["1"], "\\frac{"])
def test_math_bad_ground_truth(gt: Any) -> None:
    out = math_score("\\boxed{1}", gt)
    assert out["score"] == 0.0 and out["error"]


def test_math_pathological_expression_bounded() -> None:
    fn = _load("math", timeout_s=0.5)
    t0 = time.monotonic()
    out = fn("\\boxed{(x+1)^{100000}}", "3")
    assert out["score"] == 0.0 and "timed out" in out["error"] and time.monotonic() - t0 < 3
    assert fn("\\boxed{2}", "2")["score"] == 1.0  # a fresh helper replaced the killed one


ADD_IO = json.dumps({"inputs": ["1 2\n", "3 4\n", "10 20\n", "7 8\n"], "outputs": ["3\n", "7\n", "30", "15\n"]})


def test_code_correct_solution() -> None:
    sol = "Sure:\n```python\na, b = map(int, input().split())\nprint(a + b)\n```\nDone."
    out = code_score(sol, ADD_IO)
    assert (out["score"], out["acc"], out["passed"], out["total"]) == (1.0, 1.0, 4, 4)


def test_code_half_correct() -> None:
    sol = "```python\na, b = map(int, input().split())\nprint(a + b if a < 5 else a * b)\n```"
    out = code_score(sol, ADD_IO)
    assert (out["score"], out["acc"]) == (0.5, 0.0)


def test_code_infinite_loop_bounded() -> None:
    t0 = time.monotonic()
    out = code_score("```python\nwhile True:\n    pass\n```", ADD_IO)
    assert out["score"] == 0.0 and "timeout" in out["status"] and time.monotonic() - t0 < 8


def test_code_asserts_style() -> None:
    gt = json.dumps({"asserts": "assert add(1, 2) == 3\nx = add(2, 2)\nassert x == 4\nassert add(-1, 1) == 0"})
    assert code_score("```python\ndef add(a, b):\n    return a + b\n```", gt)["score"] == 1.0
    partial = code_score("```python\ndef add(a, b):\n    return a + b if a > 0 else 5\n```", gt)
    assert partial["score"] == pytest.approx(2 / 3) and partial["acc"] == 0.0
    assert code_score("```python\nimport sys\nsys.exit(0)\n```", gt)["score"] == 0.0  # early exit is no pass


@pytest.mark.parametrize("gt", [None, "", "{", "[1, 2]", json.dumps({"inputs": ["1"], "outputs": []})])
def test_code_bad_ground_truth(gt: Any) -> None:
    out = code_score("print(1)", gt)
    assert out["score"] == 0.0 and out["error"].startswith("invalid ground truth")


@pytest.mark.parametrize("solution", [None, "", "```python\n```", "```python\ndef f(:\n```"])
def test_code_malformed_outputs(solution: Any) -> None:
    assert code_score(solution, ADD_IO)["score"] == 0.0


@pytest.mark.parametrize("solution,gt,score", [
    ("The answer is (B).", "B", 1.0), ("answer: c", "C", 1.0), ("\\boxed{D}", "(D)", 1.0),
    ("Final: \\boxed{\\text{(B)}}", "B", 1.0), ("The answer is (B).", "C", 0.0), ("Answer: A", "E", 0.0),
    ("The answer is 100.0099", "100", 1.0), ("The answer is 100.0101", "100", 0.0),
    ("\\boxed{-2.00019}", "-2", 1.0), ("\\boxed{-2.00021}", "-2", 0.0),
    ("\\boxed{1,234.5 m}", "1234.5", 1.0), ("answer: $12\\text{ cm}$", "12", 1.0), ("\\boxed{5\\%}", "5", 1.0),
    ("\\boxed{\\frac{1}{2}}", "0.5", 1.0), ("\\boxed{2x}", "2", 0.0),
    ("The answer is  new   YORK city.", "New York City", 1.0), ("\\boxed{sPari}", "Paris", 0.0),
    ("answer: True", "true", 1.0), ("\\boxed{x^2+2x+1}", "(x+1)^2", 1.0),
])
def test_stem(solution: str, gt: str, score: float) -> None:
    assert stem_score(solution, gt)["score"] == score


@pytest.mark.parametrize("solution,gt", [(None, "A"), ("", "5"), ("x", None), ("x", []), ("x", True)])
def test_stem_malformed(solution: Any, gt: Any) -> None:
    out = stem_score(solution, gt)
    assert out["score"] == 0.0 and out["error"]
