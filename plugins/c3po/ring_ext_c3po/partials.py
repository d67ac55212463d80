"""Partial trajectories that survive a restart: no verl.

C3PO++ carries unfinished trajectories across policy updates; a checkpoint must carry them too, tokens and all,
or a restart regenerates what was already decoded. `PartialSpool` keeps one file per request that an abort cut
short (`live/<request>.jsonl`), appended to by the rollout clients after every aborted segment and removed when
the request ends. At a checkpoint the trainer `snapshot()`s them into the checkpoint; on resume it `stage()`s that
snapshot (`restore/<group>/<session>.json`) and each re-issued request `claim()`s its own partial, exclusively
across processes (a rename), and continues from its tokens, log-probs, segments and retention.

The live files are append-only: a cut writes one line holding only what was decoded since the request's previous
cut (its new tokens, log-probs, routed experts and segments) plus the current retention, never the trajectory
again. Rewriting every partial whole at every abort costs the tokens already held, per request and per cut (about
13 GB a cut at the paper's scale: 64K-token responses, thousands of requests in flight); appending costs only the
new tokens. `snapshot()` concatenates the lines. A line is one `write`, so a crash leaves at most a torn last
line, which `snapshot()` ignores (the request is carried as of its previous cut); anything else unreadable is
refused by file and line.

Identity is verl's: the group is the prompt's uid and the session the sample's index in it (`identity.py`), not the
prompt's token ids, because a dataset that repeats a prompt, or a dataloader cycling past an epoch, puts two groups
of one prompt in flight at once and each must get back its own samples. verl re-issues a checkpoint's pending and
running prompts with the uid they were saved under (trainer_base `_reissue_inflight_prompts` reads the prompt
fields, `uid` among them, back from TransferQueue's checkpoint under the same keys) and runs sessions 0..n-1 again
(agent_loop_tq `_run_prompt`), so a re-issued request finds its partial by (group, session). The prompt key (a hash
of the prompt ids) is kept as a check: a partial is claimed only by a request with the same prompt (a multi-turn
agent loop restarts at its first turn, whose prompt is not the cut turn's). A client used outside verl's agent loop
has no uid: its group is the prompt key and its session None, and any partial of that group fits. The spool sits
on a file system every client and the trainer see (the checkpoint directory; on several nodes, a shared one).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


def prompt_key(prompt_ids: list[int]) -> str:
    return hashlib.sha256(json.dumps([int(t) for t in prompt_ids]).encode()).hexdigest()[:32]


@dataclass(frozen=True)
class Partial:
    group: str  # verl's uid of the prompt group; the prompt key for a client outside verl's agent loop
    session: str | None  # verl's session id (the sample's index in its group); None outside the agent loop
    prompt_key: str  # `prompt_key(prompt ids)`: a claim checks it
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
            raise ValueError(f"C3PO++ partial for group {self.group} session {self.session}: "
                             + "; ".join(p for p in problems if p))

    @property
    def identity(self) -> tuple[str, str | None, str]:
        return self.group, self.session, self.prompt_key


def _write(path: Path, payload: Any) -> None:
    """Atomic: a reader sees the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(json.dumps(payload))
    os.replace(tmp, path)


# One live line: the request's identity first, so an append checks it from the head of the first line alone.
_ID_KEYS = ("group", "session", "prompt_key")
_LINE_KEYS = (*_ID_KEYS, "start", "retention", "segments", "token_ids", "log_probs", "routed_experts")
_STR = rb'"(?:[^"\\]|\\.)*"'
_ID_HEAD = re.compile(rb'\{"group":(' + _STR + rb'),"session":(null|' + _STR + rb'),"prompt_key":(' + _STR + rb'),')


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))  # ASCII (ensure_ascii): one byte per character


def _first_identity(path: Path) -> tuple | None:
    """(group, session, prompt key) of the file's first line; None if that line is not one of ours."""
    with open(path, "rb") as f:
        head = f.readline(4096)  # enough for any identity: a line need not be read whole
        match = _ID_HEAD.match(head)
        if match:
            return tuple(json.loads(value) for value in match.groups())
        if head.endswith(b"\n"):
            return None
        f.seek(0)  # an identity longer than the head: read the line
        try:
            entry = json.loads(f.readline())
        except ValueError:
            return None
        return tuple(entry.get(k) for k in _ID_KEYS) if isinstance(entry, dict) else None


def _plain(name: str, what: str) -> str:
    """A group or session id used as a file name in the restore folder."""
    if not name or name in (".", "..") or Path(name).name != name or name.startswith("."):
        raise ValueError(f"C3PO++ spool: {what} {name!r} is not a plain file name")
    return name


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
            held = _first_identity(path)
            if held != partial.identity:
                raise ValueError(f"{name}: (group, session, prompt key) {partial.identity} but {path} holds {held}")
        line = {"group": partial.group, "session": partial.session, "prompt_key": partial.prompt_key,
                "start": written, "retention": int(partial.retention),
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

    def claim(self, group: str, session: str | None, prompt_key: str) -> Partial | None:
        """This request's staged partial (with `session` None: any of the group's), or None. Two processes never get
        the same one; one of another prompt (a later turn's) stays staged for the request it belongs to."""
        folder = self.restore / _plain(group, "group")
        if session is None:
            paths = sorted(folder.glob("*.json")) if folder.is_dir() else []
        else:
            paths = [folder / f"{_plain(session, 'session')}.json"]
        for path in paths:
            mine = path.with_name(f".{path.stem}.claimed-{uuid.uuid4().hex}")
            try:
                os.rename(path, mine)  # atomic: exactly one claimer wins
            except FileNotFoundError:
                continue
            try:
                partial = Partial(**json.loads(mine.read_text()))
            except (ValueError, TypeError) as e:  # not JSON, or not a partial's fields
                raise ValueError(f"C3PO++ partial {path} is unreadable ({e}); kept as {mine.name}") from None
            if partial.prompt_key != prompt_key:
                os.rename(mine, path)  # not this request's prompt: back for the one it belongs to
                continue
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
                problem = _line_problem(entry, len(tokens), None if last is None else _identity(last))
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
        return Partial(*_identity(last), tokens, log_probs, segments, last["retention"], routed)

    def stage(self, partials: list[dict]) -> int:
        """Start from a checkpoint's partials: stale live files (of the process that stopped) are gone. Partials of
        a checkpoint written before they were keyed by verl's uid are dropped, with a warning (their requests decode
        again from the prompt)."""
        shutil.rmtree(self.root, ignore_errors=True)
        legacy = [entry for entry in partials if "group" not in entry]
        if legacy:
            logger.warning("C3PO++: %d partial trajectories of the checkpoint are keyed by prompt alone (written "
                           "before they were keyed by verl's uid): dropped, their requests decode again",
                           len(legacy))
        for i, entry in enumerate(e for e in partials if "group" in e):
            partial = Partial(**entry)
            name = f"{i:06d}" if partial.session is None else partial.session
            path = self.restore / _plain(partial.group, "group") / f"{_plain(name, 'session')}.json"
            if path.exists():
                raise ValueError(f"C3PO++ checkpoint: two partials of group {partial.group} session {partial.session}")
            _write(path, entry)
        return len(partials) - len(legacy)

    def unclaimed(self) -> int:
        return sum(1 for _ in self.restore.glob("*/*.json"))


def _identity(entry: dict) -> tuple:
    return tuple(entry[k] for k in _ID_KEYS)


def _line_problem(entry: Any, held: int, key: tuple | None) -> str:
    """What makes one live line unusable after `held` tokens of a request identified by `key` (group, session,
    prompt key); "" if nothing."""
    if not isinstance(entry, dict) or set(entry) != set(_LINE_KEYS):
        return f"not a live partial's line (fields {sorted(entry) if isinstance(entry, dict) else type(entry)})"
    n = len(entry["token_ids"]) if isinstance(entry["token_ids"], list) else -1
    problems = [
        "token_ids is not a list" if n < 0 else "",
        f"starts at token {entry['start']} but the lines before hold {held}" if entry["start"] != held else "",
        f"request {_identity(entry)} after {key}" if key is not None and _identity(entry) != key else "",
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
