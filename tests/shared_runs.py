"""`main_ppo` runs that several test modules check: each starts Ray, TransferQueue, the trainer's workers and a vLLM
server (about 2.5 min of start-up on 2 cores before its first step), so a run whose log, metrics and checkpoints
answer several modules runs once per session (the fixtures are registered by the repository's conftest.py).
docs/testing.md maps every check to the run it reads.

- `grpo_run`: plain GRPO (`+recipe=ring1t ring1t_loop=grpo`) with IcePop as one override, a large learning rate,
  6 steps, the HF weights at the end (tests/test_e2e_cpu.py, plugins/icepop/tests/test_e2e_icepop.py).
- `ring1t_run`: README's set-up command as written (3 steps of the loop, wandb on), then a second process that
  resumes it from its final checkpoint to step 6 with IcePop's band set per version lag (tests/test_readme_commands.py,
  plugins/c3po/tests/test_c3po_e2e.py).
- `c3po_two_hosts_run`: the loop on a two-node Ray cluster on one machine, with a pool that finishes under the
  budget and a band that masks, every version's HF weights kept (plugins/c3po/tests/test_c3po_two_hosts.py and the
  refill checks of test_c3po_e2e.py); as root, first the same run refused for a checkpoint dir one node lacks.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

GRPO_STEPS = 6
RING1T_FIRST, RING1T_STEPS = 3, 6  # README's command trains 3 steps (the recipe's total); the resume goes on to 6
RING1T_OVERRIDES = ("+recipe=ring1t",)  # README's set-up command 1: `python -m verl.trainer.main_ppo +recipe=ring1t`
# 5 steps (4 syncs): under admission=completion with the adaptive cut few requests are mid-decode at a cut; 4, 4, 4
# and 1 trained requests were kept across a sync in runs of 3-4 steps: more syncs make a run with none (the keep
# check's failure) less likely
C3PO_TWO_HOSTS_STEPS = 5
# Phi and Omega of the two-host run: 8 groups (~400 tokens, at most 1024) rarely hold Phi, and with 16 requests in
# flight a cut nearly always finds some mid-decode (with 4 groups the engine was empty at some cuts: CI's run kept
# nothing across a sync)
C3PO_TWO_HOSTS_BUDGET, C3PO_TWO_HOSTS_POOL = 768, 8
# its engine batch, below Omega's 16 requests: under admission=completion the gate holds 2 groups back
C3PO_TWO_HOSTS_SEQS = 12
LAG_BANDS = "{0: [0.5, 5.0], 1: [0.3, 8.0]}"  # the resumed process's IcePop band per version lag
ROOT = os.geteuid() == 0  # a disk of one node's own needs a mount namespace (root); the rest runs without


@dataclass(frozen=True)
class Run:
    workdir: Path
    ckpt: Path  # trainer.default_local_dir
    steps: dict[int, dict]  # step -> verl's file-logger metrics
    log: str  # the (first) process's stdout + stderr


@dataclass(frozen=True)
class ResumedRun(Run):
    records: list[dict]  # verl's file-logger records of both processes, in the order logged
    first_steps: list[int]
    second_steps: list[int]
    second_log: str
    restart_s: float  # wall clock between the two processes


@pytest.fixture(scope="session")
def grpo_run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    """On-policy GRPO on the tiny Qwen2 without the length tail (its scaled EOS row flips the policy between always
    and never ending at this learning rate: tests/test_e2e_cpu.py), IcePop [0.5, 5] by one override."""
    from ring_ext.tiny import build_tiny_default
    from ring_ext.verl_run import run_main_ppo

    workdir = tmp_path_factory.mktemp("grpo")
    run = run_main_ppo([
        "+recipe=ring1t",
        "ring1t_loop=grpo",  # every rollout token is decoded by the weights just synced
        "actor_rollout_ref.actor.policy_loss.loss_mode=icepop",
        f"trainer.total_training_steps={GRPO_STEPS}",
        f"trainer.save_freq={GRPO_STEPS}",
        f"trainer.default_local_dir={workdir / 'ckpt'}",
        "actor_rollout_ref.actor.optim.lr=3e-2",
        f"actor_rollout_ref.model.path={build_tiny_default(length_tail=False).model_dir}",
        "actor_rollout_ref.actor.checkpoint.save_contents=[model,hf_model]",
    ], workdir, name="grpo")  # fmt: skip
    return Run(workdir, workdir / "ckpt", {s["step"]: s["data"] for s in run.steps}, run.log)


@pytest.fixture(scope="session")
def ring1t_run(tmp_path_factory: pytest.TempPathFactory) -> ResumedRun:
    """README's command as written (its loggers, console and wandb, plus verl's file logger to read the steps), from
    a fresh directory: the recipe's own checkpoint dir, relative to it. The recipe saves the last step, so a second
    process with only `trainer.total_training_steps` raised resumes it (resume_mode=auto): partial trajectories,
    TransferQueue pools and the C3PO++ spool cross the restart."""
    from ring_ext.verl_run import run_main_ppo

    workdir = tmp_path_factory.mktemp("ring1t")
    first = run_main_ppo(list(RING1T_OVERRIDES), workdir, name="readme_main", timeout=900,
                         loggers=("console", "wandb"))
    restart_s = time.time()
    second = run_main_ppo([*RING1T_OVERRIDES, f"trainer.total_training_steps={RING1T_STEPS}",
                           f"+actor_rollout_ref.actor.policy_loss.icepop_lag_bands={LAG_BANDS}"], workdir,
                          name="resumed", timeout=900)
    steps = {s["step"]: s["data"] for s in first.steps + second.steps}
    return ResumedRun(workdir, workdir / "checkpoints" / "ring_ext" / "ring1t_tiny", steps, first.log,
                      first.steps + second.steps, [s["step"] for s in first.steps], [s["step"] for s in second.steps],
                      second.log, restart_s)


def _c3po_two_hosts_main_ppo(cluster, workdir: Path, ckpt: Path):
    from ring_ext.verl_run import run_main_ppo

    return run_main_ppo([
        "+recipe=ring1t", f"trainer.total_training_steps={C3PO_TWO_HOSTS_STEPS}", f"trainer.default_local_dir={ckpt}",
        "actor_rollout_ref.rollout.agent.num_workers=2",
        # the pool that finishes under the budget (8 groups hold ~400 tokens < Phi), a band that masks, and what the
        # per-segment check reads: every version's HF weights, every trained request's tokens and log-probs
        f"trainer.v1.c3po.token_budget={C3PO_TWO_HOSTS_BUDGET}", f"trainer.v1.c3po.pool_prompts={C3PO_TWO_HOSTS_POOL}",
        "+trainer.v1.c3po.timeline_tokens=true",
        "actor_rollout_ref.actor.policy_loss.icepop_alpha=0.98", "actor_rollout_ref.actor.policy_loss.icepop_beta=1.02",
        "trainer.save_freq=1", "actor_rollout_ref.actor.checkpoint.save_contents=[model,optimizer,extra,hf_model]",
        # the cut that keeps requests in the engine (README's run checks carry=abort, the recipe's default)
        "trainer.v1.c3po.carry=keep", "actor_rollout_ref.rollout.enable_prefix_caching=false",
        "trainer.v1.c3po.adaptive_cut=true",  # at each crossing the gate decides to cut or let the requests finish
        # a freed engine slot goes to the next group at once; more groups submitted than the engine decodes at once
        "trainer.v1.c3po.admission=completion", f"actor_rollout_ref.rollout.max_num_seqs={C3PO_TWO_HOSTS_SEQS}",
        # the TaskRunner runs on a node of the cluster: what it reads from the environment travels with the job
        f"++ray_kwargs.ray_init.runtime_env.env_vars.VERL_FILE_LOGGER_PATH={workdir / f'{ckpt.name}.jsonl'}",
    ], workdir, name=ckpt.name, timeout=900, env={**cluster.client_env(), "VERL_LOGGING_LEVEL": "WARN"})  # fmt: skip


@pytest.fixture(scope="session")
def c3po_two_hosts_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from ring_ext.local_cluster import HEAD_IP, WORKER_IP, NodeSpec, two_hosts
    from ring_ext.verl_run import VerlRunError

    workdir = tmp_path_factory.mktemp("c3po_two_hosts")
    unshared = workdir / "unshared"
    head = NodeSpec(HEAD_IP, num_cpus=8, num_gpus=1)  # trainer and vLLM, colocated (C3PO++ is a colocated mode)
    # an agent-loop worker, maybe a reward worker or a TransferQueue unit
    worker = NodeSpec(WORKER_IP, num_cpus=4, num_gpus=0, private_dirs=(unshared,) if ROOT else ())
    with two_hosts(head, worker, log_dir=workdir, env={"VERL_LOGGING_LEVEL": "WARN"}) as cluster:
        cluster.tables(want=(HEAD_IP, WORKER_IP))
        refused = None
        if ROOT:
            try:
                _c3po_two_hosts_main_ppo(cluster, workdir, unshared)
            except VerlRunError:
                refused = (workdir / f"{unshared.name}.log").read_text()
        ckpt = workdir / "ckpt"
        run = _c3po_two_hosts_main_ppo(cluster, workdir, ckpt)
        actors = cluster.tables()["actors"]  # the run's actors, dead now: the GCS keeps where each ran
    where = lambda pattern: {a["Address"]["IPAddress"] for a in actors if re.search(pattern, a["Name"] or "")}
    timeline = [json.loads(line) for line in (ckpt / "c3po_timeline.jsonl").read_text().splitlines()]
    return {"steps": run.steps, "log": run.log, "agent_nodes": where(r"^agent_loop_worker_\d+_"),
            "trainer_nodes": where(r"WorkerDict_\d+:\d+$"), "unshared": unshared, "refused": refused,
            "timeline": timeline, "ckpt": ckpt}
