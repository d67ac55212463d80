"""Fixtures of the IcePop tests: verl's real actor loss call site."""

from __future__ import annotations

import pytest
import verl  # noqa: F401  (loads ring-ext and its plugins, as in every verl process)


@pytest.fixture
def ppo_loss():
    from verl.workers.utils import losses

    return losses.ppo_loss
