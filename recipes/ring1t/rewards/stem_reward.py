"""Logic/STEM answer reward for the ring1t stage recipes (a verl custom reward function).

Use with ``reward.custom_reward_function.path=recipes/ring1t/rewards/stem_reward.py`` and
``name=compute_score``.  The ground truth decides the checker:

* a multiple-choice letter (``B``, ``(B)``) -> the letter in the answer ("\\boxed{C}", "(B)",
  "answer: c", "Option D") must match;
* a number (units, ``$``, ``%`` and thousands commas stripped) -> relative tolerance 1e-4
  against the ground truth; if the prediction is not a plain number, math-verify decides;
* otherwise a case/whitespace-insensitive exact match, then math-verify for expressions
  (never for plain words, which sympy would read as commutative symbol products).

The math-verify check is the timeout-guarded one of ``math_reward.py`` (loaded by path).
"""

from __future__ import annotations

import math
import re
from typing import Any

from ring_ext.recipes import load_sibling

REL_TOL = 1e-4
_CHOICE_GT = re.compile(r"\(?\s*([A-Ea-e])\s*\)?\.?")
_CHOICE_PRED = re.compile(r"^\(?([A-Ea-e])\)?(?=$|[\s.):,;])")
_CHOICE_WORD = re.compile(r"\b(?:option|choice)\s*\(?([A-Ea-e])\)?(?![A-Za-z])", re.IGNORECASE)
_ANSWER = re.compile(r"\banswer\b(?:\s+is)?\s*[:=]?", re.IGNORECASE)
_TEXT_CMD = re.compile(r"\\(?:text|textbf|mathrm|mathbf|operatorname)\s*\{([^{}]*)\}")
_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")
_UNIT = re.compile(r"(?:\s*(?:%|°|\\circ|\^\\circ|\s[A-Za-zµμΩ°][A-Za-zµμΩ°/^0-9.·]*))*")
_WORDS = re.compile(r"[A-Za-z][A-Za-z'\-]*(?:\s+[A-Za-z][A-Za-z'\-]*)*")


def _math_reward() -> Any:
    return load_sibling(__file__, "math_reward.py")


def _clean(s: str) -> str:
    s = _TEXT_CMD.sub(lambda m: f" {m.group(1)} ", s)
    s = s.replace("\\$", "").replace("$", "").replace("\\%", "%").replace("\\,", "").replace("\\!", "")
    s = s.replace("\\left", "").replace("\\right", "")
    return " ".join(s.split()).strip().rstrip(".").strip()


def to_number(s: str) -> float | None:
    """Parse '1,234.5', '12 cm', '5%', '3.2 \\times 10^{-3}' as a float; None if not a plain number."""
    s = _clean(s)
    if len(s) > 100:
        return None
    s = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", s)
    s = re.sub(r"\s*(?:\\times|\\cdot|x|\*)\s*10\^\{?([-+]?\d+)\}?", r"e\1", s)
    m = _NUMBER.match(s)
    if not m or not _UNIT.fullmatch(s[m.end():]):
        return None
    try:
        value = float(m.group(0))
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def extract_answer(text: str) -> str:
    """Last \\boxed{}, else the text after the last 'answer is'/'answer:', else the last line."""
    boxed = _math_reward().last_boxed(text)
    if boxed is not None:
        return boxed
    found = list(_ANSWER.finditer(text))
    if found:
        return text[found[-1].end():].strip().split("\n")[0].strip()
    for marker in ("####",):
        if marker in text:
            return text.rsplit(marker, 1)[1].strip().split("\n")[0].strip()
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1].strip() if lines else ""


def _choice(ans: str) -> str | None:
    ans = _clean(ans)
    m = _CHOICE_PRED.match(ans) or _CHOICE_WORD.search(ans)
    return m.group(1).upper() if m else None


def _check_one(gt: str, pred: str, timeout_s: float) -> tuple[bool, str, str]:
    """-> (correct, kind, error)."""
    m = _CHOICE_GT.fullmatch(gt.strip())
    if m:
        return _choice(pred) == m.group(1).upper(), "choice", ""
    g = to_number(gt)
    if g is not None:
        p = to_number(pred)
        if p is not None:
            return abs(p - g) <= REL_TOL * abs(g) + 1e-12, "numeric", ""
        ok, err = _math_reward().check_equivalent(_clean(gt), _clean(pred), timeout_s)
        return ok, "numeric", err
    if _clean(gt).casefold() == _clean(pred).casefold():
        return True, "text", ""
    if _WORDS.fullmatch(_clean(gt)) and re.search(r"[A-Za-z]{2}", gt):
        return False, "text", ""
    ok, err = _math_reward().check_equivalent(_clean(gt), _clean(pred), timeout_s)
    return ok, "math", err


def compute_score(data_source: Any, solution_str: Any, ground_truth: Any, extra_info: Any = None,
                  timeout_s: float = 10.0, **kwargs: Any) -> dict[str, Any]:
    """verl reward: 1.0 if the answer matches (any of) the ground truth(s), else 0.0."""
    out: dict[str, Any] = {"score": 0.0, "acc": 0.0, "pred": "", "kind": "", "error": ""}
    gts = list(ground_truth) if isinstance(ground_truth, (list, tuple)) else [ground_truth]
    gts = [str(g) for g in gts if isinstance(g, (str, int, float)) and not isinstance(g, bool) and str(g).strip()]
    if not gts:
        out["error"] = f"invalid ground truth: {ground_truth!r}"[:200]
        return out
    try:
        pred = extract_answer(solution_str) if isinstance(solution_str, str) else ""
        out["pred"] = pred[:200]
        if not pred:
            out["error"] = "no answer found"
            return out
        for gt in gts:
            ok, kind, err = _check_one(gt, pred, timeout_s)
            out.update(kind=kind, error=err)
            if ok:
                out.update(score=1.0, acc=1.0)
                break
    except Exception as e:  # noqa: BLE001  (never raise into the trainer)
        out["error"] = f"stem reward error: {e!r}"[:200]
    return out
