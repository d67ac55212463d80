"""The partial-trajectory spool: what a checkpoint holds, what a resumed request gets back, exclusive claims across
processes, and partials that could not have been carried refused by name."""

from __future__ import annotations

import multiprocessing as mp
from dataclasses import asdict
from pathlib import Path

import pytest
from ring_ext_c3po.partials import Partial, PartialSpool, prompt_key
from ring_ext_c3po.resume import Next, ResumeTracker

MAX_LEN, SIGMA = 16, 2


def _partial(prompt: list[int], tokens: int, version: int = 3, retention: int = 1) -> Partial:
    return Partial(prompt_key(prompt), list(range(100, 100 + tokens)), [-0.5] * tokens,
                   [[version, tokens, 1.0, 2.0]], retention)


def test_live_partials_are_what_the_checkpoint_holds(tmp_path: Path):
    spool = PartialSpool(tmp_path)
    spool.put("req-a", _partial([1, 2], 5))
    spool.put("req-b", _partial([1, 2], 3))
    spool.put("req-a", _partial([1, 2], 7))  # a later abort of the same request replaces its entry
    spool.drop("req-b")  # finished or purged: nothing to carry
    spool.drop("req-never-spooled")
    assert [len(p["token_ids"]) for p in spool.snapshot()] == [7]


def test_staged_partials_are_claimed_once_each_by_prompt(tmp_path: Path):
    spool = PartialSpool(tmp_path)
    spool.put("stale", _partial([9], 2))  # a live file of the process that stopped
    saved = [asdict(_partial([1, 2], 5)), asdict(_partial([1, 2], 6)), asdict(_partial([3], 4))]
    assert spool.stage(saved) == 3 and spool.snapshot() == []
    assert spool.claim(prompt_key([7, 7])) is None  # another prompt gets nothing
    got = [spool.claim(prompt_key([1, 2])), spool.claim(prompt_key([1, 2])), spool.claim(prompt_key([1, 2]))]
    assert sorted(len(p.token_ids) for p in got[:2]) == [5, 6] and got[2] is None
    assert spool.unclaimed() == 1 and spool.claim(prompt_key([3])).token_ids == list(range(100, 104))
    assert spool.unclaimed() == 0


def _claim_all(root: str, key: str, out) -> None:
    spool, got = PartialSpool(root), []
    while (p := spool.claim(key)) is not None:
        got.append(len(p.token_ids))
    out.put(got)


def test_two_processes_never_claim_the_same_partial(tmp_path: Path):
    spool = PartialSpool(tmp_path)
    spool.stage([asdict(_partial([5], n)) for n in range(1, 15)] * 3)  # 42 partials of one prompt
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_claim_all, args=(str(tmp_path), prompt_key([5]), out)) for _ in range(3)]
    for p in procs:
        p.start()
    lengths = [n for _ in procs for n in out.get(timeout=60)]
    for p in procs:
        p.join()
    assert sorted(lengths) == sorted(list(range(1, 15)) * 3)  # every partial exactly once over the processes


@pytest.mark.parametrize(("change", "message"), [
    ({"token_ids": [1, 2]}, "2 token ids but segments of 5 tokens"),
    ({"log_probs": [0.0]}, "1 log-probs for 5 tokens"),
    ({"token_ids": list(range(16)), "log_probs": None, "segments": [[1, 16, 0.0, 1.0]]}, "the whole budget of 16"),
    ({"retention": 3}, "retention 3 outside [1, sigma=2]"),
    ({"retention": 0}, "retention 0 outside"),
])
def test_a_partial_that_could_not_have_been_carried_is_refused(change: dict, message: str):
    bad = Partial(**{**asdict(_partial([1], 5)), **change})
    with pytest.raises(ValueError, match="C3PO\\+\\+ partial for prompt .*" + message.replace("[", "\\[")):
        bad.check(MAX_LEN, SIGMA)


def test_a_resumed_tracker_continues_where_the_saved_one_stopped():
    saved = _partial([1], 5, version=3, retention=1)
    saved.check(MAX_LEN, SIGMA)
    tracker = ResumeTracker.resumed(MAX_LEN, SIGMA, saved.segments, saved.retention)
    assert tracker.remaining == 11 and tracker.retention == 1  # asks only for what is left
    assert tracker.record(4, 6, "aborted", 3.0, 4.0) is Next.RESUME and tracker.retention == 2
    assert tracker.record(5, 5, "stop", 5.0, 6.0) is Next.FINISHED
    assert tracker.token_versions() == [3] * 5 + [4] * 6 + [5] * 5  # lines up with the 16 tokens
    again = ResumeTracker.resumed(MAX_LEN, SIGMA, saved.segments, 2)
    assert again.record(4, 1, "aborted", 3.0, 4.0) is Next.PURGED  # the restart does not reset retention


def test_an_unreadable_staged_partial_is_named_not_skipped(tmp_path: Path):
    spool = PartialSpool(tmp_path)
    spool.stage([asdict(_partial([1], 5))])
    (staged,) = (tmp_path / "restore" / prompt_key([1])).glob("*.json")
    staged.write_text('{"prompt_key": "x", "tokens": [1]}')  # a partial's fields it is not
    with pytest.raises(ValueError, match=f"C3PO\\+\\+ partial {staged} is unreadable"):
        spool.claim(prompt_key([1]))
