"""The embedded tiny default (`ring_ext/tiny/`): a model + data pair that needs no hub access.

`build_tiny_default()` builds, offline and deterministically (byte-identical for the same package
versions), a random-init tiny Qwen2 (or Qwen3-MoE) with its own tokenizer, and a synthetic
arithmetic RL dataset in verl's parquet format, scored by `ring_ext.tiny.reward.compute_score`:

    <cache>/tiny-v3/qwen2/      HF model dir: config, bf16 safetensors, tokenizer, chat template
    <cache>/tiny-v3/qwen3moe/   the same with 4 experts, top-2
    <cache>/tiny-v3/qwen2_rm/   a Qwen2 sequence classifier (1 label): the reward model of the RLHF stage
    <cache>/tiny-v3/data/       arith_train.parquet (256 rows), arith_val.parquet (32 rows),
                                longcot_sft.parquet (256 chat rows with worked answers, for SFT),
                                open_prompts.parquet (64 prompts without ground truth, for RLHF)

Each part is built in a temp dir and renamed into place (readers never see half a part), under
a file lock so concurrent callers (Ray workers) build it once. Once built, a call only stats a
few files: nothing heavy (torch, transformers, pyarrow) is imported. Nothing here imports verl.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

__all__ = ["TinyDefault", "build_tiny_default", "default_cache_dir"]

VERSION = "tiny-v3"  # bump when the recipe changes, so stale caches are not reused
CACHE_ENV = "RING_EXT_CACHE"
MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json")
# a classifier cannot generate: transformers writes no generation_config.json for it
REWARD_MODEL_FILES = tuple(f for f in MODEL_FILES if f != "generation_config.json")
DATA_FILES = ("arith_train.parquet", "arith_val.parquet", "longcot_sft.parquet", "open_prompts.parquet")
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TinyDefault:
    model_dir: Path
    train_parquet: Path
    val_parquet: Path
    sft_parquet: Path
    open_prompts_parquet: Path


def default_cache_dir() -> Path:
    """`$RING_EXT_CACHE` if set, else `~/.cache/ring_ext`."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "ring_ext"


def build_tiny_default(
    cache_dir: Path | str | None = None, *, moe: bool = False, reward_model: bool = False, length_tail: bool = True,
    force: bool = False,
) -> TinyDefault:
    """Return the tiny default under `<cache_dir>/tiny-v3/`, building the missing parts first.

    `moe`: the model is the Qwen3-MoE variant; `reward_model`: the sequence-classification reward model.
    `length_tail=False`: the Qwen2 without the scaled EOS embedding (`qwen2_plain/`): short answers, no length tail,
    and a policy that a large learning rate moves without flipping between always and never ending (the tests that
    need the policy to move far, fast, use it).
    """
    if moe + reward_model + (not length_tail) > 1:
        raise ValueError("build_tiny_default: moe, reward_model and length_tail=False are variants: one at a time, "
                         "not both")
    root = Path(cache_dir if cache_dir is not None else default_cache_dir()).expanduser().absolute() / VERSION
    name = "qwen3moe" if moe else "qwen2_rm" if reward_model else "qwen2" if length_tail else "qwen2_plain"
    model_dir, data_dir = root / name, root / "data"
    result = TinyDefault(model_dir, *(data_dir / f for f in DATA_FILES))
    parts: dict[Path, tuple[tuple[str, ...], Callable[[Path], object]]] = {
        model_dir: (REWARD_MODEL_FILES if reward_model else MODEL_FILES, lambda d: _build_model(d, moe, reward_model,
                                                                                         length_tail)),
        data_dir: (DATA_FILES, _build_data),
    }
    if not force and all(_complete(d, files) for d, (files, _) in parts.items()):
        return result  # cheap path
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root.parent / f".{VERSION}.lock"):
        for final, (files, builder) in parts.items():
            if force or not _complete(final, files):  # re-check: another process may have built it
                _atomic_build(final, builder)
    return result


def _build_model(out_dir: Path, moe: bool, reward_model: bool, length_tail: bool) -> None:
    from ring_ext.tiny.model import build_model

    build_model(out_dir, moe=moe, reward_model=reward_model, length_tail=length_tail)


def _build_data(out_dir: Path) -> None:
    from ring_ext.tiny.data import build_data

    build_data(out_dir)


def _complete(d: Path, files: tuple[str, ...]) -> bool:
    return all((d / f).is_file() for f in files)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Exclusive advisory lock; without fcntl (Windows) the atomic rename alone keeps parts whole."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(path, "a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _atomic_build(final: Path, builder: Callable[[Path], object]) -> None:
    log.info("ring_ext.tiny: building %s", final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    old = final.with_name(f".{final.name}.old-{tmp.name.rsplit('-', 1)[-1]}")
    try:
        builder(tmp)
        for p in (tmp, *tmp.rglob("*")):  # mkdtemp/safetensors use 0700/0600; make it shareable
            p.chmod(0o755 if p.is_dir() else 0o644)
        if final.exists():  # os.replace cannot overwrite a non-empty dir: move the old one aside
            os.replace(final, old)
        try:
            os.replace(tmp, final)
        except OSError:
            if not final.is_dir():  # not a lost race with another builder: a real error
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
