"""The partial-trajectory spool: what a checkpoint holds, what a resumed request gets back (its own partial, by verl's
uid and session, where two groups of one prompt were in flight), exclusive claims across processes, live files that
grow by what each cut adds (not by what the request already holds), torn writes, and partials that could not have
been carried refused by name."""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import re
from dataclasses import asdict, replace
from pathlib import Path

import pytest
from ring_ext_c3po.partials import Partial, PartialSpool, prompt_key
from ring_ext_c3po.resume import Next, ResumeTracker

MAX_LEN, SIGMA = 16, 2


def _partial(prompt: list[int], tokens: int, version: int = 3, retention: int = 1, group: str | None = None,
             session: str | None = None) -> Partial:
    """A request's partial; without a group, one of a client outside verl's agent loop (keyed by its prompt)."""
    return Partial(group or prompt_key(prompt), session, prompt_key(prompt), list(range(100, 100 + tokens)),
                   [-0.5] * tokens, [[version, tokens, 1.0, 2.0]], retention)


def _empty(prompt: list[int], retention: int, routed: list | None = None) -> Partial:
    return Partial(prompt_key(prompt), None, prompt_key(prompt), [], [], [], retention, routed)


def test_live_partials_are_what_the_checkpoint_holds(tmp_path: Path):
    spool = PartialSpool(tmp_path)
    a1, a2, b = _partial([1, 2], 5), _grown(_partial([1, 2], 5), 2, version=4, retention=2), _partial([1, 2], 3)
    assert spool.append("req-a", a1, 0) == 5 and spool.append("req-b", b, 0) == 3
    assert spool.append("req-a", a2, 5) == 7  # a later abort of the same request: the checkpoint holds its latest
    assert spool.snapshot() == [asdict(a2), asdict(b)]  # by file name
    spool.drop("req-b")  # finished or purged: nothing to carry
    spool.drop("req-never-spooled")
    assert spool.snapshot() == [asdict(a2)]
    assert sorted(p.name for p in (tmp_path / "live").iterdir()) == ["req-a.jsonl"]


def _grown(p: Partial, tokens: int, version: int, retention: int, routed: bool = True) -> Partial:
    """`p` after one more cut: `tokens` more decoded by policy `version` (ids continuing, log-probs distinct)."""
    n = len(p.token_ids)
    new_routed = [[t % 7, (t + 1) % 7] for t in range(n, n + tokens)]
    return Partial(*p.identity, p.token_ids + list(range(100 + n, 100 + n + tokens)),
                   None if p.log_probs is None else p.log_probs + [-0.01 * (n + i) for i in range(tokens)],
                   p.segments + [[version, tokens, 10.0 * version, 10.0 * version + 1]], retention,
                   (p.routed_experts or []) + new_routed if routed and (n == 0 or p.routed_experts) else None)


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_each_cut_appends_only_its_new_tokens_and_the_snapshot_is_the_whole(tmp_path: Path):
    spool = PartialSpool(tmp_path)
    cuts = [_grown(_empty([4, 2], 0), 4, version=3, retention=1)]
    cuts.append(_grown(cuts[-1], 3, version=4, retention=2))
    cuts.append(_grown(cuts[-1], 5, version=5, retention=3))
    written = 0
    for cut in cuts:
        written = spool.append("req", cut, written)
        assert written == len(cut.token_ids)
        assert spool.snapshot() == [asdict(cut)]  # after every cut: the whole partial, tokens and all
    lines = _lines(tmp_path / "live" / "req.jsonl")
    assert [len(line["token_ids"]) for line in lines] == [4, 3, 5]  # only the new tokens each time
    assert [line["token_ids"] for line in lines] == [cuts[0].token_ids, cuts[1].token_ids[4:], cuts[2].token_ids[7:]]
    assert [len(line["log_probs"]) for line in lines] == [4, 3, 5] == [len(line["routed_experts"]) for line in lines]
    assert [line["segments"] for line in lines] == [[s] for s in cuts[2].segments]  # each segment once
    assert [line["retention"] for line in lines] == [1, 2, 3]
    whole = spool.snapshot()[0]
    assert whole["routed_experts"] == cuts[2].routed_experts and whole["log_probs"] == cuts[2].log_probs
    Partial(**whole).check(MAX_LEN, 3)  # what the checkpoint holds is a partial that can be carried


def test_a_cut_that_adds_no_tokens_still_records_the_retention(tmp_path: Path):
    spool, p = PartialSpool(tmp_path), _partial([1], 5, retention=1)
    spool.append("req", p, 0)
    assert spool.append("req", replace(p, retention=2), 5) == 5  # cut again before decoding anything new
    assert spool.snapshot() == [asdict(replace(p, retention=2))]
    assert len(_lines(tmp_path / "live" / "req.jsonl")[1]["token_ids"]) == 0


def test_a_cut_without_log_probs_or_routing_leaves_the_whole_without_them(tmp_path: Path):
    spool, first = PartialSpool(tmp_path), _grown(_empty([1], 0), 4, 3, 1)
    second = replace(_grown(first, 3, 4, 2, routed=False), log_probs=None)
    assert spool.append("req", first, 0) == 4 and spool.append("req", second, 4) == 7
    (got,) = spool.snapshot()
    assert got["token_ids"] == second.token_ids and got["log_probs"] is None and got["routed_experts"] is None
    assert got == asdict(second)


def test_an_append_writes_bytes_for_the_new_tokens_not_for_those_held(tmp_path: Path):
    spool, p = PartialSpool(tmp_path), _empty([3], 1, [])
    path, written, deltas = tmp_path / "live" / "req.jsonl", 0, []
    for cut in range(40):  # 40 cuts of 50 tokens: the request ends up holding 2000
        n = len(p.token_ids)
        p = Partial(*p.identity, p.token_ids + [12345] * 50, p.log_probs + [-0.125] * 50,
                    p.segments + [[7, 50, 1.5, 2.5]], 1, p.routed_experts + [[3, 4]] * 50)
        before = path.stat().st_size if path.exists() else 0
        written = spool.append("req", p, written)
        deltas.append(path.stat().st_size - before)
        assert written == n + 50
    assert max(deltas) - min(deltas) <= 4  # only "start" grows, by its digits; a whole rewrite grows 40-fold
    assert deltas[-1] * 10 < len(json.dumps(asdict(p)))
    assert spool.snapshot() == [asdict(p)]


def test_a_torn_last_line_is_ignored_and_a_torn_middle_line_is_named(tmp_path: Path):
    spool, path = PartialSpool(tmp_path), tmp_path / "live" / "req.jsonl"
    first = _partial([1, 2], 5)
    second = _grown(first, 2, version=4, retention=2, routed=False)
    spool.append("req", first, 0)
    spool.append("req", second, 5)
    whole = path.read_bytes()
    with open(path, "ab") as f:  # a crash in the middle of the third cut's write
        f.write(json.dumps({"prompt_key": first.prompt_key, "start": 7, "token_ids": [1, 2, 3]}).encode()[:-9])
    assert spool.snapshot() == [asdict(second)]  # carried as of its previous cut
    with pytest.raises(ValueError, match="ends in a torn line"):  # appending would bury it in the middle
        spool.append("req", _grown(second, 1, 5, 3), 7)
    lines = whole.split(b"\n")
    path.write_bytes(lines[0] + b"\n" + lines[1][:-20] + b"\n" + lines[1] + b"\n")
    with pytest.raises(ValueError, match=f"C3PO\\+\\+ live partial {path} line 2 is unreadable"):
        spool.snapshot()
    path.write_bytes(lines[0][:30])  # torn in its first write: nothing of it is held yet
    spool.append("other", first, 0)
    assert spool.snapshot() == [asdict(first)]


def test_an_append_that_does_not_fit_the_spooled_request_is_refused(tmp_path: Path):
    spool, p = PartialSpool(tmp_path), _partial([1, 2], 5, group="uid-a", session="0")
    spool.append("req-a", p, 0)
    more = _grown(p, 3, version=4, retention=2)
    for other in (replace(more, prompt_key=prompt_key([9])), replace(more, session="1"), replace(more, group="b")):
        with pytest.raises(ValueError, match=re.escape(f"request req-a: (group, session, prompt key) {other.identity}"
                                                       f" but {tmp_path / 'live' / 'req-a.jsonl'} holds "
                                                       f"{p.identity}")):
            spool.append("req-a", other, 5)
    with pytest.raises(ValueError, match="request req-a: written=9 but the partial holds 8 tokens"):
        spool.append("req-a", more, 9)
    with pytest.raises(ValueError, match="request req-a: written=-1"):
        spool.append("req-a", more, -1)
    with pytest.raises(ValueError, match=r"request req-a: segment \[4, 3, 40.0, 41.0\] \(tokens 5..8\) straddles "
                                         "written=6"):
        spool.append("req-a", more, 6)
    with pytest.raises(ValueError, match="request req-a: written=0 but .* already holds its earlier cuts"):
        spool.append("req-a", more, 0)  # would spool its first 5 tokens twice
    with pytest.raises(ValueError, match="request req-b: written=5 but nothing is spooled for it"):
        spool.append("req-b", more, 5)
    with pytest.raises(ValueError, match="request req-a: 8 token ids but segments of 5 tokens"):
        spool.append("req-a", replace(more, segments=p.segments), 5)
    with pytest.raises(ValueError, match="request req-a: 7 log-probs for 8 tokens"):
        spool.append("req-a", replace(more, log_probs=more.log_probs[:-1]), 5)
    with pytest.raises(ValueError, match="request req-a: 2 routed experts for 8 tokens"):
        spool.append("req-a", replace(more, routed_experts=[[1, 2]] * 2), 5)
    with pytest.raises(ValueError, match="not a plain file name"):
        spool.append("../req-a", more, 5)
    assert spool.snapshot() == [asdict(p)]  # nothing refused reached the file
    assert spool.append("req-a", more, 5) == 8 and spool.snapshot() == [asdict(more)]


def test_a_live_file_whose_lines_do_not_add_up_is_named(tmp_path: Path):
    spool, path = PartialSpool(tmp_path), tmp_path / "live" / "req.jsonl"
    spool.append("req", _partial([1], 5), 0)
    line = _lines(path)[0]
    path.write_text(json.dumps({**line, "segments": [[3, 6, 1.0, 2.0]]}) + "\n")
    with pytest.raises(ValueError, match=f"live partial {path}: 5 token ids but segments of 6 tokens"):
        spool.snapshot()
    path.write_text(json.dumps(line) + "\n" + json.dumps({**line, "start": 4}) + "\n")  # overlaps the first
    with pytest.raises(ValueError, match=f"live partial {path} line 2: starts at token 4 but the lines before hold 5"):
        spool.snapshot()
    for field in ("group", "session", "prompt_key"):
        path.write_text(json.dumps(line) + "\n" + json.dumps({**line, "start": 5, field: "x"}) + "\n")
        with pytest.raises(ValueError, match=f"live partial {path} line 2: request .*'x'.* after"):
            spool.snapshot()


def test_a_restored_partial_is_spooled_whole_then_appended_to(tmp_path: Path):
    spool = PartialSpool(tmp_path)
    saved = _grown(_grown(replace(_empty([6], 0), group="uid-6", session="3"), 3, 2, 1), 2, 3, 2)  # two segments
    spool.stage([asdict(saved)])
    assert (tmp_path / "restore" / "uid-6" / "3.json").is_file()  # restore/<group>/<session>.json
    claimed = spool.claim("uid-6", "3", prompt_key([6]))
    assert claimed == saved
    assert spool.append("fresh-id", claimed, 0) == 5  # the resumed request's first cut: all of it
    later = _grown(claimed, 4, version=4, retention=3)
    assert spool.append("fresh-id", later, 5) == 9
    path = tmp_path / "live" / "fresh-id.jsonl"
    assert [(len(line["token_ids"]), len(line["segments"])) for line in _lines(path)] == [(5, 2), (4, 1)]
    assert spool.snapshot() == [asdict(later)] and spool.unclaimed() == 0
    spool.drop("fresh-id")  # the request finished
    assert not path.exists() and spool.snapshot() == []


def _claim_by_prompt(spool: PartialSpool, prompt: list[int]) -> Partial | None:
    """What a client outside verl's agent loop claims: any partial of its prompt."""
    return spool.claim(prompt_key(prompt), None, prompt_key(prompt))


def test_outside_the_agent_loop_staged_partials_are_claimed_once_each_by_prompt(tmp_path: Path):
    spool = PartialSpool(tmp_path)
    spool.append("stale", _partial([9], 2), 0)  # a live file of the process that stopped
    saved = [asdict(_partial([1, 2], 5)), asdict(_partial([1, 2], 6)), asdict(_partial([3], 4))]
    assert spool.stage(saved) == 3 and spool.snapshot() == []
    assert _claim_by_prompt(spool, [7, 7]) is None  # another prompt gets nothing
    got = [_claim_by_prompt(spool, [1, 2]) for _ in range(3)]
    assert sorted(len(p.token_ids) for p in got[:2]) == [5, 6] and got[2] is None
    assert spool.unclaimed() == 1 and _claim_by_prompt(spool, [3]).token_ids == list(range(100, 104))
    assert spool.unclaimed() == 0


def test_two_groups_of_one_prompt_each_get_back_their_own_samples(tmp_path: Path):
    """A repeated prompt: groups uid-a and uid-b of the same prompt were both cut short at the checkpoint. Each
    re-issued request (verl re-issues a prompt under its uid, sessions 0..n-1) claims exactly its own partial, and
    a request of that group and session with another prompt (a multi-turn loop's first turn) leaves it staged."""
    spool = PartialSpool(tmp_path)
    mine = {("uid-a", "0"): _partial([1, 2], 5, group="uid-a", session="0"),
            ("uid-b", "1"): _partial([1, 2], 2, version=4, group="uid-b", session="1"),
            ("uid-b", "2"): _partial([1, 2], 7, group="uid-b", session="2")}
    assert spool.stage([asdict(p) for p in mine.values()]) == 3
    assert spool.claim("uid-b", "2", prompt_key([1, 2, 3])) is None  # another turn's prompt: not this one's
    assert spool.unclaimed() == 3
    for group in ("uid-b", "uid-a"):  # uid-b first: it must not take uid-a's partial of the same prompt
        for session in ("0", "1", "2"):
            assert spool.claim(group, session, prompt_key([1, 2])) == mine.get((group, session)), (group, session)
    assert spool.unclaimed() == 0
    with pytest.raises(ValueError, match="two partials of group uid-a session 0"):
        spool.stage([asdict(mine[("uid-a", "0")])] * 2)
    with pytest.raises(ValueError, match="group '../x' is not a plain file name"):
        spool.stage([asdict(replace(mine[("uid-a", "0")], group="../x"))])


def test_a_checkpoint_s_partials_keyed_by_prompt_alone_are_dropped_with_a_warning(tmp_path: Path, caplog):
    spool = PartialSpool(tmp_path)
    kept = asdict(_partial([1], 5, group="uid-a", session="0"))
    legacy = {k: v for k, v in asdict(_partial([1], 3)).items() if k not in ("group", "session")}
    with caplog.at_level(logging.WARNING):
        assert spool.stage([legacy, kept]) == 1
    assert "1 partial trajectories of the checkpoint are keyed by prompt alone" in caplog.text
    assert spool.unclaimed() == 1 and spool.claim("uid-a", "0", prompt_key([1])) == Partial(**kept)


def _claim_all(root: str, key: str, out) -> None:
    spool, got = PartialSpool(root), []
    while (p := spool.claim(key, None, key)) is not None:
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
    with pytest.raises(ValueError, match="C3PO\\+\\+ partial for group .*" + message.replace("[", "\\[")):
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
        _claim_by_prompt(spool, [1])
