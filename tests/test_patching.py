"""The one way ring-ext patches verl: deferred to the target's import, applied once, traceable to the original."""

from __future__ import annotations

import inspect
import sys
import types
from pathlib import Path

import pytest

from ring_ext.patching import PATCHED, patch_after_import, patch_once


def _doubling(original):
    def wrapper(x):
        return 2 * original(x)

    return wrapper


def test_patch_once_wraps_once_marks_the_wrapper_and_keeps_the_original() -> None:
    owner = types.SimpleNamespace(f=lambda x: x + 1)
    original = owner.f
    assert patch_once(owner, "f", _doubling) is True
    assert patch_once(owner, "f", _doubling) is False  # a second plugin load, a second hook run: no double wrap
    assert owner.f(1) == 4  # 2 * (1 + 1), not 2 * 2 * (1 + 1)
    assert getattr(owner.f, PATCHED) is True and inspect.unwrap(owner.f) is original


def test_patch_once_on_a_method_is_seen_by_every_instance() -> None:
    class Worker:
        def score(self, x):
            return x

    before = Worker()
    patch_once(Worker, "score", lambda original: lambda self, x: original(self, x) + 10)
    assert before.score(1) == 11 and Worker().score(2) == 12


def test_patch_after_import_waits_for_the_module_and_resolves_the_wrap_lazily(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "ring_ext_target_mod.py").write_text(
        "class Owner:\n    @staticmethod\n    def ping():\n        return 'pong'\n")
    (tmp_path / "ring_ext_wrap_mod.py").write_text(
        "LOADED = True\n\ndef loud(original):\n    return lambda: original().upper()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("ring_ext_target_mod", "ring_ext_wrap_mod"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    patch_after_import("ring_ext_target_mod:Owner.ping", "ring_ext_wrap_mod:loud")
    assert "ring_ext_wrap_mod" not in sys.modules  # the patch code loads only with its target
    import ring_ext_target_mod

    assert ring_ext_target_mod.Owner.ping() == "PONG"
    patch_after_import("ring_ext_target_mod:Owner.ping", "ring_ext_wrap_mod:loud")  # already imported: now, once
    assert ring_ext_target_mod.Owner.ping() == "PONG"
