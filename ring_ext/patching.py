"""Patching verl and vLLM, the one way ring-ext does it: deferred to the target's import, applied once.

`after_import` runs a function on a module right after it is imported, or now if it already was.
`patch_once` wraps one attribute (a function or a method) and marks the wrapper, so a second call is a no-op.

verl imports ring-ext at `import verl`, long before its trainer, loss and checkpoint modules load.
Registering into those modules eagerly would import them in every process (slow, and circular
while verl itself is still importing); `after_import` defers the work to the moment the target
module finishes executing, before anyone can `from module import name` it.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import threading
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

Hook = Callable[[ModuleType], None]
Wrap = Callable[[Callable[..., Any]], Callable[..., Any]]
PATCHED = "__ring_ext_patched__"  # set on every ring-ext wrapper; tests and `patch_once` look for it

_hooks: dict[str, list[Hook]] = {}
_lock = threading.RLock()


class _RunHooksAfterExec(importlib.abc.Loader):
    def __init__(self, loader: importlib.abc.Loader, name: str) -> None:
        self._loader = loader
        self._name = name

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        with _lock:
            hooks = _hooks.pop(self._name, [])
        for hook in hooks:
            hook(module)


class _PostImportFinder(importlib.abc.MetaPathFinder):
    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in _hooks:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _RunHooksAfterExec(spec.loader, fullname)
                return spec
        return None


_FINDER = _PostImportFinder()


def after_import(module_name: str, hook: Hook) -> None:
    """Call `hook(module)` once `module_name` is imported (immediately if it already is)."""
    with _lock:
        module = sys.modules.get(module_name)
        if module is None:
            _hooks.setdefault(module_name, []).append(hook)
            if _FINDER not in sys.meta_path:
                sys.meta_path.insert(0, _FINDER)
            return
    hook(module)


def patch_once(owner: Any, attr: str, wrap: Wrap) -> bool:
    """Replace `owner.attr` by `wrap(original)` unless a ring-ext wrapper is already there.

    Returns True when it patched now. The wrapper gets `__wrapped__ = original` (what `inspect.unwrap` follows),
    so a patch can always be traced back to the code it changes.
    """
    original = getattr(owner, attr)
    if getattr(original, PATCHED, False):
        return False
    wrapped = wrap(original)
    setattr(wrapped, PATCHED, True)
    if getattr(wrapped, "__wrapped__", None) is None:
        wrapped.__wrapped__ = original  # type: ignore[attr-defined]
    setattr(owner, attr, wrapped)
    return True


def patch_after_import(target: str, wrap: Wrap | str) -> None:
    """`patch_once` on "module:Owner.attr" (or "module:attr") once `module` is imported.

    `wrap` may be "module:function", imported only then, so a plugin's patch code loads in the processes that
    import the target and nowhere else."""
    module_name, _, path = target.partition(":")
    owner_path, _, attr = path.rpartition(".")

    def apply(module: ModuleType) -> None:
        owner: Any = module
        for name in filter(None, owner_path.split(".")):
            owner = getattr(owner, name)
        patch_once(owner, attr, resolve(wrap) if isinstance(wrap, str) else wrap)

    after_import(module_name, apply)


def resolve(spec: str, missing_ok: bool = False) -> Any:
    """"package.module:attr" -> the attribute (importing the module); None if absent and `missing_ok`."""
    import importlib

    module, _, attr = spec.partition(":")
    found = importlib.import_module(module)
    return getattr(found, attr, None) if missing_ok else getattr(found, attr)
