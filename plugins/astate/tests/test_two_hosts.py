"""End to end across two hosts, stood in for by two Ray nodes on one machine (loopback addresses 127.0.0.2
and 127.0.0.3, each raylet started by `ray start`): verl's unchanged main_ppo attaches to the cluster
(RAY_ADDRESS) and runs `separate_async` with the trainer on one node and the standalone vLLM replica on the
other. Every weight update crosses between them through astate's multi-host transport (`dist`: gloo point to
point + ZeroMQ over TCP) and then lands in vLLM's parameters in place.

Placement follows from resources, not chance: each node declares one logical GPU and the trainer pool and the
rollout pool need one each, so they cannot share a node. Each node also carries a custom resource naming it,
read back from the GCS. What ran where comes from Ray's actor table in the GCS. The log-prob checks are
test_e2e_astate.py's, on 2 steps.

Not stood in for: separate file systems and clocks, network latency, and gloo's pairs (whose device is the
host name's address, 127.0.0.1 here, on both nodes).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import pytest
from safetensors.torch import load_file
from test_e2e_astate import MAX_LOG_PPL_GAP, MIN_PEARSON, OVERRIDES, policy_versions

from ring_ext.local_cluster import HEAD_IP, WORKER_IP, NodeSpec, two_hosts
from ring_ext.tiny import build_tiny_default
from ring_ext.verl_run import run_main_ppo

pytestmark = pytest.mark.e2e  # ~6.5 min on 2 cores (cluster start, 2 steps, stop)

STEPS = 2
HEAD = NodeSpec(HEAD_IP, num_cpus=8, num_gpus=1, resources={"ring_ext_host_a": 1})
# CPUs: the rollout bundle holds 2, vLLM's server needs 1 free to be placed, a TransferQueue unit may hold 1
WORKER = NodeSpec(WORKER_IP, num_cpus=4, num_gpus=1, resources={"ring_ext_host_b": 1})
NAME = "two_hosts"
REPLACED = ("trainer.total_training_steps", "ray_kwargs.ray_init.num_gpus",
            "+actor_rollout_ref.rollout.checkpoint_engine.engine_kwargs")


def _overrides(workdir: Path) -> list[str]:
    # test_e2e_astate's run: separate_async, hybrid_engine=False, one sync per optimizer step, lr 3e-2 ...
    return [*(o for o in OVERRIDES if not o.startswith(REPLACED)), f"trainer.total_training_steps={STEPS}",
            # ... across hosts: astate's multi-host transport, every byte verified
            "+actor_rollout_ref.rollout.checkpoint_engine.engine_kwargs.astate.transport=dist",
            "+actor_rollout_ref.rollout.checkpoint_engine.engine_kwargs.astate.verify=always",
            # attached to a cluster, whose nodes declare the GPUs: ray.init refuses num_gpus (and num_cpus,
            # which the recipe's ${ring_ext.local_ray:8} leaves null by itself)
            "ray_kwargs.ray_init.num_gpus=null",
            f"trainer.default_local_dir={workdir / 'ckpt'}",
            f"actor_rollout_ref.model.path={build_tiny_default(length_tail=False).model_dir}"]


def _where(job_actors: list[dict[str, Any]]) -> dict[str, set[str]]:
    """Node IPs of the trainer rank, the standalone rollout worker and vLLM's server (verl's actor names)."""
    roles: dict[str, set[str]] = {"trainer": set(), "rollout_worker": set(), "vllm_server": set()}
    for a in job_actors:
        name, ip = a["Name"], a["Address"]["IPAddress"]
        if name.startswith("rollout_standalone_"):
            roles["rollout_worker"].add(ip)
        elif re.search(r"server_\d+_\d+$", name):
            roles["vllm_server"].add(ip)
        elif re.search(r"WorkerDict_\d+:\d+$", name):
            roles["trainer"].add(ip)
    return roles


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    workdir = tmp_path_factory.mktemp("two_hosts")
    # verl's TaskRunner runs on a node of the cluster, in its raylet's environment, not in this driver's: what
    # it reads from the environment is set on the nodes (or, per job, under ray_kwargs.ray_init.runtime_env.env_vars)
    node_env = {"VERL_FILE_LOGGER_PATH": str(workdir / f"{NAME}.jsonl"), "VERL_LOGGING_LEVEL": "WARN"}
    with two_hosts(HEAD, WORKER, log_dir=workdir, env=node_env) as cluster:
        tables = cluster.tables(want=(HEAD_IP, WORKER_IP))
        nodes = {n["NodeManagerAddress"]: n for n in tables["nodes"] if n["Alive"]}
        result = run_main_ppo(_overrides(workdir), workdir, name=NAME, timeout=600,
                              env={**cluster.client_env(), "VERL_LOGGING_LEVEL": "WARN"})
        actors = cluster.tables()["actors"]  # the run's, dead now: the GCS keeps where each ran
    for s in result.steps:
        d = s["data"]
        print(f"step {s['step']}: version={d['astate/version']} bytes={d['astate/bytes_per_sender']} "
              f"gap={d['rollout_corr/log_ppl_abs_diff']:.4f} "
              f"pearson={d['training/rollout_actor_probs_pearson_corr']:.4f}")
    for a in actors:
        print(f"actor {a['Name'] or a['ActorClassName']}: {a['Address']['IPAddress']} {a['State']}")
    return {"steps": {s["step"]: s["data"] for s in result.steps}, "log": result.log, "nodes": nodes,
            "ckpt": workdir / "ckpt", "where": _where(actors)}


def test_the_cluster_has_two_nodes_at_distinct_addresses_with_their_own_resources(run: dict) -> None:
    nodes = run["nodes"]
    assert set(nodes) == {HEAD_IP, WORKER_IP}
    for spec in (HEAD, WORKER):
        resources = nodes[spec.ip]["Resources"]
        assert resources["GPU"] == spec.num_gpus and resources["CPU"] == spec.num_cpus, resources
        assert all(resources[k] == v for k, v in spec.resources.items()), resources


def test_trainer_and_rollout_ran_on_different_nodes(run: dict) -> None:
    where = run["where"]
    print(f"placement: {where}")
    assert len(where["trainer"]) == 1, where  # one trainer rank
    assert where["rollout_worker"] == where["vllm_server"] and len(where["rollout_worker"]) == 1, where
    assert where["trainer"] | where["rollout_worker"] == {HEAD_IP, WORKER_IP}, where  # one on each host
    assert "'transport': 'dist'" in run["log"] and "'trainer_mode': 'separate_async'" in run["log"]


def test_every_step_synced_across_hosts_and_logs_finite_metrics(run: dict) -> None:
    steps = run["steps"]
    assert sorted(steps) == list(range(1, STEPS + 1))
    model = build_tiny_default(length_tail=False).model_dir / "model.safetensors"
    model_bytes = sum(t.nbytes for t in load_file(model).values())
    for step, d in steps.items():
        for key in ("actor/pg_loss", "actor/grad_norm", "timing_s/update_weights",
                    "rollout_corr/training_log_ppl"):
            assert math.isfinite(float(d[key])), (step, key)
        assert d["astate/version"] == step + 1, step  # version 1: the initial sync; step k ends with k + 1
        # version 1 is staged (it sets the worker's in-place engine up); then the trainer rank cuts the worker's
        # slices and the dist transport carries them into vLLM's parameters: exactly the worker's bytes cross
        assert d["astate/direct"] == 1.0 and d["astate/bytes_per_sender"] == model_bytes, step
    carried = re.findall(r"sync (\d+) into rollout worker 0 in place: .* from the trainer ranks' slices across hosts",
                         run["log"])
    # each line once or twice (two nodes on one machine; Ray's de-duplication of repeated lines is timing-dependent):
    # each version once, in order
    assert list(dict.fromkeys(carried)) == [str(v) for v in range(2, STEPS + 2)], carried
    # the receiver logs a failed sync (and keeps vLLM's previous weights) instead of raising
    assert "Traceback" not in run["log"] and "astate: weight sync" not in run["log"]


def test_rollout_logprobs_follow_the_trainer_after_every_sync(run: dict) -> None:
    """vLLM, on the other host, scores its tokens as the trainer does on the same weights, while each step
    moves the policy far beyond that gap: a rollout left one version behind would fail the gap."""
    for step, d in run["steps"].items():
        assert d["training/off_policy/trajectory_staleness/max"] == 0, step  # generated after the last sync
        assert d["training/rollout_actor_probs_pearson_corr"] >= MIN_PEARSON, step
        assert d["rollout_corr/log_ppl_abs_diff"] <= MAX_LOG_PPL_GAP, step
    moves = _policy_moves(run["ckpt"])
    print(f"mean |log-ppl| change per step on fixed sequences: {[round(m, 4) for m in moves]}")
    # a step whose groups all tie on reward has no gradient: one of the two steps must move
    assert max(moves) > 3 * MAX_LOG_PPL_GAP, f"policy barely moved ({moves}): the sync check proves nothing"


def _policy_moves(ckpt: Path) -> list[float]:
    """How far each step moved the per-sequence log-probs of fixed prompts + answers (as test_e2e_astate)."""
    versions = policy_versions(ckpt, STEPS)
    return [(versions[k] - versions[k - 1]).abs().mean().item() for k in range(1, STEPS + 1)]
