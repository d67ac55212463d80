"""Partial trajectories that survive a restart: no verl.

C3PO++ carries unfinished trajectories across policy updates; a checkpoint must carry them too, tokens and all,
or a restart regenerates what was already decoded. `PartialSpool` keeps one file per request that an abort cut
short (`live/`), written by the rollout clients after every aborted segment and removed when the request ends.
At a checkpoint the trainer `snapshot()`s them into the checkpoint; on resume it `stage()`s that snapshot
(`restore/<prompt key>/`) and each re-issued request `claim()`s one partial with its prompt, exclusively across
processes (a rename), and continues from its tokens, log-probs, segments and retention.

Identity is the prompt's token ids: the samples of a group share their prompt and are interchangeable, and the
clients see no other stable key (verl's request ids are random per call). The spool sits on a file system every
client and the trainer see (the checkpoint directory; on several nodes, a shared one).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


def prompt_key(prompt_ids: list[int]) -> str:
    return hashlib.sha256(json.dumps([int(t) for t in prompt_ids]).encode()).hexdigest()[:32]


@dataclass(frozen=True)
class Partial:
    prompt_key: str
    token_ids: list[int]
    log_probs: list[float] | None
    segments: list[list[float | int]]  # resume.Segment.to_list() per segment
    retention: int
    routed_experts: list | None = None  # MoE routing replay, per token, when the engine returns it

    def check(self, max_response_length: int, max_retention: int) -> None:
        """Refuse a partial that could not have been carried: it would corrupt the trajectory it resumes."""
        tokens = sum(int(s[1]) for s in self.segments)
        problems = [
            f"{len(self.token_ids)} token ids but segments of {tokens} tokens" if len(self.token_ids) != tokens else "",
            f"{len(self.log_probs)} log-probs for {tokens} tokens"
            if self.log_probs is not None and len(self.log_probs) != tokens else "",
            f"{tokens} tokens: none or the whole budget of {max_response_length} (finished, not carried)"
            if not 0 < tokens < max_response_length else "",
            f"retention {self.retention} outside [1, sigma={max_retention}]"
            if not 1 <= self.retention <= max_retention else "",
        ]
        if any(problems):
            raise ValueError(f"C3PO++ partial for prompt {self.prompt_key}: " + "; ".join(p for p in problems if p))


def _write(path: Path, payload: Any) -> None:
    """Atomic: a reader sees the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(json.dumps(payload))
    os.replace(tmp, path)


class PartialSpool:
    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.live, self.restore = self.root / "live", self.root / "restore"

    # rollout clients
    def put(self, request_id: str, partial: Partial) -> None:
        _write(self.live / f"{request_id}.json", asdict(partial))

    def drop(self, request_id: str) -> None:
        (self.live / f"{request_id}.json").unlink(missing_ok=True)

    def claim(self, key: str) -> Partial | None:
        """One staged partial with this prompt, or None; two processes never get the same one."""
        folder = self.restore / key
        for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
            mine = path.with_name(f".{path.stem}.claimed-{uuid.uuid4().hex}")
            try:
                os.rename(path, mine)  # atomic: exactly one claimer wins
            except FileNotFoundError:
                continue
            try:
                partial = Partial(**json.loads(mine.read_text()))
            except (ValueError, TypeError) as e:  # not JSON, or not a partial's fields
                raise ValueError(f"C3PO++ partial {path} is unreadable ({e}); kept as {mine.name}") from None
            mine.unlink()
            return partial
        return None

    # trainer
    def snapshot(self) -> list[dict]:
        """Every request currently cut short, for the checkpoint."""
        return [json.loads(p.read_text()) for p in sorted(self.live.glob("*.json"))]

    def stage(self, partials: list[dict]) -> int:
        """Start from a checkpoint's partials: stale live files (of the process that stopped) are gone."""
        shutil.rmtree(self.root, ignore_errors=True)
        for i, entry in enumerate(partials):
            partial = Partial(**entry)
            _write(self.restore / partial.prompt_key / f"{i:06d}.json", entry)
        return len(partials)

    def unclaimed(self) -> int:
        return sum(1 for _ in self.restore.glob("*/*.json"))
