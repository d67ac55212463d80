"""wandb in a verl run: files under the run's directory, and a clean end.

verl's trainer logs to wandb from its TaskRunner, a Ray actor. Two defects of that, both fixed here:
- wandb writes `./wandb/` wherever the process runs (the user's working directory);
- at exit the TaskRunner printed a `ConnectionResetError` traceback from wandb's atexit teardown: verl's
  `Tracking.finish` finishes the run but leaves wandb's service process to the atexit hook, which runs after
  that process is already gone. Tearing wandb down right after verl's finish, while it is alive, ends cleanly
  (and unregisters the hook).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

_WANDB_DIR_OURS = "RING_EXT_SET_WANDB_DIR"  # marks a WANDB_DIR this check chose (a user's own is kept)


def _uses_wandb(config: Any) -> bool:
    loggers = config.trainer.get("logger", []) or []
    return "wandb" in ([loggers] if isinstance(loggers, str) else list(loggers))


def keep_wandb_in_the_run_dir(config: Any) -> None:
    """Start-up check: WANDB_DIR = `trainer.default_local_dir`, made absolute. Set in the driver before `ray.init`,
    so the local Ray cluster's processes (the TaskRunner logs to wandb) inherit it. A user's WANDB_DIR wins."""
    if not _uses_wandb(config) or ("WANDB_DIR" in os.environ and not os.environ.get(_WANDB_DIR_OURS)):
        return
    os.environ["WANDB_DIR"] = str(Path(str(config.trainer.default_local_dir)).absolute())  # wandb creates it
    os.environ[_WANDB_DIR_OURS] = "1"


def teardown_after_finish(finish: Callable[..., Any]) -> Callable[..., Any]:
    """Wraps `verl.utils.tracking.Tracking.finish`: wandb's service is torn down while it is still alive."""

    @functools.wraps(finish)
    def finish_and_teardown(self: Any, *args: Any, **kwargs: Any) -> Any:
        result = finish(self, *args, **kwargs)
        if "wandb" in getattr(self, "logger", {}):
            import wandb

            wandb.teardown()
        return result

    return finish_and_teardown
