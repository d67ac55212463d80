"""Partial trajectories that survive a restart: no verl.

C3PO++ carries unfinished trajectories across policy updates; a checkpoint must carry them too, tokens and all,
or a restart regenerates what was already decoded. `PartialSpool` keeps one file per request that an abort cut
short (`live/<request>.jsonl`), appended to by the rollout clients after every aborted segment and removed when
the request ends. At a checkpoint the trainer `snapshot()`s them into the checkpoint; on resume it `stage()`s that
snapshot (`restore/<prompt key>/`) and each re-issued request `claim()`s one partial with its prompt, exclusively
across processes (a rename), and continues from its tokens, log-probs, segments and retention.

The live files are append-only: a cut writes one line holding only what was decoded since the request's previous
cut (its new tokens, log-probs, routed experts and segments) plus the current retention, never the trajectory
again. Rewriting every partial whole at every abort costs the tokens already held, per request and per cut (about
13 GB a cut at the paper's scale: 64K-token responses, thousands of requests in flight); appending costs only the
new tokens. `snapshot()` concatenates the lines. A line is one `write`, so a crash leaves at most a torn last
line, which `snapshot()` ignores (the request is carried as of its previous cut); anything else unreadable is
refused by file and line.

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


# One live line: "prompt_key" first, so an append checks the request's key from the head of the first line alone.
_LINE_KEYS = ("prompt_key", "start", "retention", "segments", "token_ids", "log_probs", "routed_experts")
_KEY_HEAD = b'{"prompt_key":'


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))  # ASCII (ensure_ascii): one byte per character


def _first_key(path: Path) -> str | None:
    """The prompt key of the file's first line; None if that line is not one of ours."""
    with open(path, "rb") as f:
        head = f.readline(4096)  # enough for any prompt key: a line need not be read whole
        if head.startswith(_KEY_HEAD):
            try:
                key, _ = json.JSONDecoder().raw_decode(head[len(_KEY_HEAD):].decode("ascii"))
                return key if isinstance(key, str) else None
            except ValueError:
                if not head.endswith(b"\n"):  # a key longer than the head: read the line
                    f.seek(0)
                    try:
                        entry = json.loads(f.readline())
                    except ValueError:
                        return None
                    return entry.get("prompt_key") if isinstance(entry, dict) else None
        return None


class PartialSpool:
    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.live, self.restore = self.root / "live", self.root / "restore"

    def _live(self, request: str) -> Path:
        if not request or request in (".", "..") or Path(request).name != request or request.startswith("."):
            raise ValueError(f"C3PO++ spool: request id {request!r} is not a plain file name")
        return self.live / f"{request}.jsonl"

    # rollout clients
    def append(self, request: str, partial: Partial, written: int) -> int:
        """Spool what `partial` (the request's whole current state) holds beyond its first `written` tokens, which
        an earlier append already spooled (0 the first time, also for a partial claimed after a restart: this
        request's file starts with all of it). Returns the tokens now spooled: pass it as `written` next time."""
        path, n = self._live(request), len(partial.token_ids)
        name = f"C3PO++ spool request {request}"
        if not 0 <= written <= n:
            raise ValueError(f"{name}: written={written} but the partial holds {n} tokens")
        for field, values in (("log-probs", partial.log_probs), ("routed experts", partial.routed_experts)):
            if values is not None and len(values) != n:
                raise ValueError(f"{name}: {len(values)} {field} for {n} tokens")
        at, new = 0, []
        for seg in partial.segments:
            tokens = int(seg[1])
            if tokens <= 0:  # starts where the next would: whether it was spooled cannot be told
                raise ValueError(f"{name}: segment {seg} holds no tokens")
            if at < written < at + tokens:
                raise ValueError(f"{name}: segment {seg} (tokens {at}..{at + tokens}) straddles written={written}")
            if at >= written:
                new.append(list(seg))
            at += tokens
        if at != n:
            raise ValueError(f"{name}: {n} token ids but segments of {at} tokens")
        size = path.stat().st_size if path.exists() else 0
        if size == 0 and written:
            raise ValueError(f"{name}: written={written} but nothing is spooled for it ({path})")
        if size and not written:
            raise ValueError(f"{name}: written=0 but {path} already holds its earlier cuts (drop it first)")
        if size:
            with open(path, "rb") as f:
                f.seek(size - 1)
                if f.read(1) != b"\n":  # an earlier append failed mid-line: appending would bury the torn line
                    raise ValueError(f"{name}: {path} ends in a torn line")
            key = _first_key(path)
            if key != partial.prompt_key:
                raise ValueError(f"{name}: prompt key {partial.prompt_key} but {path} holds prompt key {key}")
        line = {"prompt_key": partial.prompt_key, "start": written, "retention": int(partial.retention),
                "segments": new, "token_ids": [int(t) for t in partial.token_ids[written:]],
                "log_probs": None if partial.log_probs is None else [float(x) for x in partial.log_probs[written:]],
                "routed_experts": None if partial.routed_experts is None else partial.routed_experts[written:]}
        text = _dumps(line) + "\n"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="ascii") as f:
            f.write(text)
            f.flush()
        return n

    def drop(self, request: str) -> None:
        self._live(request).unlink(missing_ok=True)

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
        """Every request currently cut short, for the checkpoint (`asdict(Partial)` each, by file name)."""
        out = []
        for path in sorted(self.live.glob("*.jsonl")):
            partial = self._rebuild(path)
            if partial is not None:
                out.append(asdict(partial))
        return out

    @staticmethod
    def _rebuild(path: Path) -> Partial | None:
        """The request's lines concatenated; None if it has none whole (finished meanwhile, or torn at its first)."""
        tokens: list[int] = []
        log_probs: list[float] | None = []
        routed: list | None = []
        segments: list[list[float | int]] = []
        last: dict | None = None
        torn: tuple[int, str] | None = None
        try:
            f = open(path, "rb")
        except FileNotFoundError:  # dropped since the listing: the request ended
            return None
        with f:
            for number, raw in enumerate(f, 1):
                if torn is not None:
                    raise ValueError(f"C3PO++ live partial {path} line {torn[0]} is unreadable ({torn[1]})")
                try:
                    entry = json.loads(raw)
                except ValueError as e:  # torn if it is the last line (a crash mid-append), else corrupt
                    torn = (number, str(e))
                    continue
                problem = _line_problem(entry, len(tokens), None if last is None else last["prompt_key"])
                if problem:
                    raise ValueError(f"C3PO++ live partial {path} line {number}: {problem}")
                tokens.extend(entry["token_ids"])
                # None from the first line without them on: they are not one per token of the whole any more
                if log_probs is not None and entry["log_probs"] is None:
                    log_probs = None
                elif log_probs is not None:
                    log_probs.extend(entry["log_probs"])
                if routed is not None and entry["routed_experts"] is None:
                    routed = None
                elif routed is not None:
                    routed.extend(entry["routed_experts"])
                segments.extend(entry["segments"])
                last = entry
        if last is None:
            return None
        held = sum(int(s[1]) for s in segments)
        if held != len(tokens):
            raise ValueError(f"C3PO++ live partial {path}: {len(tokens)} token ids but segments of {held} tokens")
        return Partial(last["prompt_key"], tokens, log_probs, segments, last["retention"], routed)

    def stage(self, partials: list[dict]) -> int:
        """Start from a checkpoint's partials: stale live files (of the process that stopped) are gone."""
        shutil.rmtree(self.root, ignore_errors=True)
        for i, entry in enumerate(partials):
            partial = Partial(**entry)
            _write(self.restore / partial.prompt_key / f"{i:06d}.json", entry)
        return len(partials)

    def unclaimed(self) -> int:
        return sum(1 for _ in self.restore.glob("*/*.json"))


def _line_problem(entry: Any, held: int, key: str | None) -> str:
    """What makes one live line unusable after `held` tokens of a request with prompt key `key`; "" if nothing."""
    if not isinstance(entry, dict) or set(entry) != set(_LINE_KEYS):
        return f"not a live partial's line (fields {sorted(entry) if isinstance(entry, dict) else type(entry)})"
    n = len(entry["token_ids"]) if isinstance(entry["token_ids"], list) else -1
    problems = [
        "token_ids is not a list" if n < 0 else "",
        f"starts at token {entry['start']} but the lines before hold {held}" if entry["start"] != held else "",
        f"prompt key {entry['prompt_key']} after {key}" if key is not None and entry["prompt_key"] != key else "",
        "segments is not a list of [version, tokens, start_s, end_s]"
        if not isinstance(entry["segments"], list)
        or not all(isinstance(s, list) and len(s) == 4 and isinstance(s[1], int) for s in entry["segments"]) else "",
        f"retention {entry['retention']!r} is not an integer" if not isinstance(entry["retention"], int) else "",
    ]
    for field in ("log_probs", "routed_experts"):
        values = entry[field]
        if values is not None and (not isinstance(values, list) or len(values) != n):
            problems.append(f"{field} is not null nor a list of one per token ({n})")
    return "; ".join(p for p in problems if p)
