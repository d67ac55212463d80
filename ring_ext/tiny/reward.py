"""Rule reward for the tiny arithmetic data (`ring_ext/tiny/reward.py`).

Use as verl's `reward.custom_reward_function` (path = this file, name = `compute_score`); the
signature is the one verl's reward managers call. Stdlib only, so any worker can import it.
"""

from __future__ import annotations

import math
import re
from decimal import Decimal
from typing import Any

CORRECT = 1.0
FORMAT_BONUS = 0.1
SHAPED_MAX = 0.1
_NUM = r"-?\d+(?:\.\d+)?"
_ANSWER_RE = re.compile(r"####\s*(" + _NUM + r")", re.ASCII)
_NUM_RE = re.compile(_NUM, re.ASCII)


def _last(pattern: re.Pattern[str], text: str) -> Decimal | None:
    last = None
    for last in pattern.finditer(text):
        pass
    return None if last is None else Decimal(last.group(last.lastindex or 0))


def closeness(pred: Decimal, gt: Decimal) -> float:
    """SHAPED_MAX * exp(-|pred - gt| / max(1, |gt|)), in [0, SHAPED_MAX]; 0 when it overflows."""
    # The difference is exact in Decimal; the ratio is taken in float so small cases equal the
    # plain-float formula. Huge numbers give inf (or inf/inf = nan) -> no credit.
    ratio = float(abs(pred - gt)) / max(1.0, float(abs(gt)))
    return SHAPED_MAX * math.exp(-ratio) if math.isfinite(ratio) else 0.0


def compute_score(
    data_source: Any, solution_str: Any, ground_truth: Any, extra_info: Any = None, **kwargs: Any
) -> dict[str, float]:
    """Score one response against an integer ground truth `gt`; never raises.

    `pred` is the number after the LAST `####` (spaces and a `-` allowed; decimals are parsed so
    "#### 7.5" is not read as 7, and "#### 7.0" counts as 7); without any `#### <number>`, the
    last number anywhere in the text. With m = max(1, abs(gt)):

    | response                                      | score                             | acc | format |
    |-----------------------------------------------|-----------------------------------|-----|--------|
    | last `#### pred`, pred == gt                  | 1.0                               | 1.0 | 1.0    |
    | last `#### pred`, pred != gt                  | 0.1 + 0.1 * exp(-abs(pred-gt)/m)  | 0.0 | 1.0    |
    | no `#### <number>`; last number in text: pred | 0.1 * exp(-abs(pred-gt)/m)        | 0.0 | 0.0    |
    | no number / empty / None / not a str          | 0.0                               | 0.0 | 0.0    |
    | ground truth not a finite number              | 0.0                               | 0.0 | 0.0    |

    (numbers too large for a float get no shaped term). Partial credit stays in [0, 0.2], far
    below a correct answer, and gives a random untrained policy non-constant rewards, so GRPO
    group advantages are not all zero.
    """
    zero = {"score": 0.0, "acc": 0.0, "format": 0.0}
    try:
        if not isinstance(solution_str, str) or not solution_str:
            return zero
        gt = Decimal(str(ground_truth).strip())
        if not gt.is_finite():
            return zero
        pred = _last(_ANSWER_RE, solution_str)
        if pred is not None:
            if pred == gt:
                return {"score": CORRECT, "acc": 1.0, "format": 1.0}
            return {"score": FORMAT_BONUS + closeness(pred, gt), "acc": 0.0, "format": 1.0}
        pred = _last(_NUM_RE, solution_str)
        return zero if pred is None else {"score": closeness(pred, gt), "acc": 0.0, "format": 0.0}
    except Exception:  # a reward must never kill a rollout worker: anything odd scores 0
        return zero
