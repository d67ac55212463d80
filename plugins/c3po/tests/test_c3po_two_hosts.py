"""C3PO++ across two hosts, stood in for by two Ray nodes on one machine (`ring_ext.local_cluster`, raylets on
127.0.0.2 and 127.0.0.3): verl's unchanged main_ppo attaches to the cluster and runs `+recipe=ring1t` with two
agent-loop workers, which verl places one per node (round robin over the nodes with CPUs). They run C3PO++'s
rollout clients, which spool partial trajectories where the trainer (with the colocated vLLM engine, on the node
with the logical GPU) snapshots them. The same run with its checkpoint directory on a disk the worker node has of
its own (a tmpfs in that raylet's mount namespace over the same path) is refused before any worker starts, naming
the node that does not see it. The loop's own checks (budget, restart, per-lag IcePop) run on one node:
test_c3po_e2e.py; across two nodes the cut is looser (docs/c3po.md).
Not stood in for: network latency, and a network file system (both nodes see this machine's disk).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from ring_ext.local_cluster import HEAD_IP, WORKER_IP, NodeSpec, TwoHosts, two_hosts
from ring_ext.verl_run import VerlRun, VerlRunError, run_main_ppo

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(os.geteuid() != 0, reason="a disk of one node's own needs a "
                                                                            "mount namespace (root)")]

BUDGET, STEPS = 256, 1
HEAD = NodeSpec(HEAD_IP, num_cpus=8, num_gpus=1)  # trainer and vLLM, colocated (C3PO++ is a colocated mode)
WORKER_CPUS = 4  # an agent-loop worker, maybe a reward worker or a TransferQueue unit


def _main_ppo(cluster: TwoHosts, workdir: Path, ckpt: Path) -> VerlRun:
    return run_main_ppo([
        "+recipe=ring1t", f"trainer.total_training_steps={STEPS}", f"trainer.default_local_dir={ckpt}",
        "actor_rollout_ref.rollout.agent.num_workers=2",
        # the TaskRunner runs on a node of the cluster: what it reads from the environment travels with the job
        f"++ray_kwargs.ray_init.runtime_env.env_vars.VERL_FILE_LOGGER_PATH={workdir / f'{ckpt.name}.jsonl'}",
    ], workdir, name=ckpt.name, timeout=900, env={**cluster.client_env(), "VERL_LOGGING_LEVEL": "WARN"})  # fmt: skip


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    workdir = tmp_path_factory.mktemp("c3po_two_hosts")
    unshared = workdir / "unshared"
    worker = NodeSpec(WORKER_IP, num_cpus=WORKER_CPUS, num_gpus=0, private_dirs=(unshared,))
    with two_hosts(HEAD, worker, log_dir=workdir, env={"VERL_LOGGING_LEVEL": "WARN"}) as cluster:
        cluster.tables(want=(HEAD_IP, WORKER_IP))
        refused = None
        try:
            _main_ppo(cluster, workdir, unshared)
        except VerlRunError:
            refused = (workdir / f"{unshared.name}.log").read_text()
        steps = _main_ppo(cluster, workdir, workdir / "ckpt").steps
        actors = cluster.tables()["actors"]  # the run's actors, dead now: the GCS keeps where each ran
    where = lambda pattern: {a["Address"]["IPAddress"] for a in actors if re.search(pattern, a["Name"] or "")}
    return {"steps": steps, "agent_nodes": where(r"^agent_loop_worker_\d+_"),
            "trainer_nodes": where(r"WorkerDict_\d+:\d+$"), "unshared": unshared, "refused": refused}


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
