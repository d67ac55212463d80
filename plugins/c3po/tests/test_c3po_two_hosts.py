"""C3PO++ across two hosts, stood in for by two Ray nodes on one machine (`ring_ext.local_cluster`, raylets on
127.0.0.2 and 127.0.0.3): verl's unchanged main_ppo attaches to the cluster and runs `+recipe=ring1t` with two
agent-loop workers, which verl places one per node (round robin over the nodes with CPUs). They run C3PO++'s
rollout clients, which spool partial trajectories where the trainer (with the colocated vLLM engine, on the node
with the logical GPU) snapshots them. The same run with its checkpoint directory on a disk the worker node has of
its own (a tmpfs in that raylet's mount namespace over the same path) is refused before any worker starts, naming
the node that does not see it. The loop's own checks (budget, restart, per-lag IcePop) run on one node:
test_c3po_e2e.py; across two nodes the cut is looser (docs/c3po.md).
The trained run is also the case that used to hang (plugins/c3po/tests/test_c3po_e2e.py checks it from here): a pool
of 8 groups holds fewer than Phi tokens, so a phase ends only if finished groups are replaced while the engine
decodes; an IcePop band of [0.98, 1.02] rejects tokens; every version's HF weights and every trained request's
tokens and rollout log-probs are kept, so each segment is checked against the weights that decoded it.
Not stood in for: network latency, and a network file system (both nodes see this machine's disk).
"""

from __future__ import annotations

import re

import pytest

from shared_runs import C3PO_TWO_HOSTS_BUDGET as BUDGET
from shared_runs import C3PO_TWO_HOSTS_STEPS as STEPS
from shared_runs import ROOT

from ring_ext.local_cluster import HEAD_IP, WORKER_IP

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def run(c3po_two_hosts_run: dict) -> dict:
    return c3po_two_hosts_run  # tests/shared_runs.py


@pytest.mark.skipif(not ROOT, reason="a disk of one node's own needs a mount namespace (root)")
def test_a_checkpoint_directory_one_host_has_of_its_own_is_refused_at_start(run: dict) -> None:
    log, unshared = run["refused"], run["unshared"]
    assert log is not None, "a run spooling to a directory one node cannot see was accepted"
    print(log[-1500:])
    assert f"trainer.default_local_dir={str(unshared)!r} must be one file system for every node" in log
    # the marker went to the disk of the node the trainer process ran on: the other node does not see it
    nodes = f"({re.escape(HEAD_IP)}|{re.escape(WORKER_IP)})"
    assert len(set(re.findall(rf"node {nodes} does not see {re.escape(str(unshared))}", log))) == 1
    steps = unshared.parent / f"{unshared.name}.jsonl"  # refused before any step: no step logged
    assert not steps.exists() or not steps.read_text().strip()


def test_the_loop_trains_with_rollout_clients_on_both_hosts(run: dict) -> None:
    print(f"agent-loop workers ran on {sorted(run['agent_nodes'])}, the trainer on {sorted(run['trainer_nodes'])}")
    assert run["agent_nodes"] == {HEAD_IP, WORKER_IP}
    assert run["trainer_nodes"] == {HEAD_IP}  # the only node with a (logical) GPU
    assert [s["step"] for s in run["steps"]] == list(range(1, STEPS + 1))
    for s in run["steps"]:
        assert s["data"]["c3po/tokens_trained"] >= BUDGET, s["step"]
