"""Typed knobs: one validation rule set, errors that name the knob as the user writes it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import pytest

from ring_ext.knobs import check_knobs, from_mapping, knob


@dataclass(frozen=True)
class Knobs:
    budget: int = knob(ge=1)
    rate: float = knob(0.5, gt=0)
    mode: Literal["audit", "always"] = "audit"
    flag: bool = False
    limit: int | None = None

    def __post_init__(self) -> None:
        check_knobs(self, "x.y")


def test_valid_values_pass_and_ints_count_as_numbers() -> None:
    assert Knobs(budget=1, rate=2, mode="always", flag=True, limit=3).rate == 2


@pytest.mark.parametrize("kwargs, message", [
    ({"budget": 0}, "x.y.budget must be an integer >= 1, got 0"),
    ({"budget": 1.0}, "x.y.budget must be an integer >= 1, got 1.0"),
    ({"budget": True}, "x.y.budget must be an integer >= 1, got True"),
    ({"budget": 2, "rate": 0}, "x.y.rate must be a number > 0, got 0"),
    ({"budget": 2, "rate": float("nan")}, "x.y.rate must be a finite number, got nan"),
    ({"budget": 2, "rate": "1"}, "x.y.rate must be a number > 0, got '1'"),
    ({"budget": 2, "mode": "sometimes"}, "x.y.mode must be one of ('audit', 'always'), got 'sometimes'"),
    ({"budget": 2, "flag": 1}, "x.y.flag must be true or false, got 1"),
    ({"budget": 2, "limit": 1.5}, "x.y.limit must be an integer, got 1.5"),
])
def test_each_bad_value_is_refused_naming_the_knob(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError) as info:
        Knobs(**kwargs)
    assert str(info.value) == message


def test_from_mapping_refuses_unknown_and_missing_keys() -> None:
    with pytest.raises(ValueError, match=r"unknown x.y key\(s\) \['buget'\]; known: \['budget', 'flag', 'limit'"):
        from_mapping(Knobs, {"buget": 3}, "x.y")
    with pytest.raises(ValueError, match="x.y: budget required"):
        from_mapping(Knobs, {"rate": 1.0}, "x.y")
    assert from_mapping(Knobs, {"budget": 3}, "x.y") == Knobs(budget=3)

