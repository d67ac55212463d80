"""C3PO++ with two trainer ranks (data-parallel size 2, FSDP on gloo, one vLLM replica each): the loop trains through
verl's padding rows.

verl pads a batch that does not divide among the ranks with rows built by
`verl/trainer/ppo/padding_utils.py:construct_minimal_padding_template`, which cuts the per-token fields it knows to
one token; C3PO++'s per-token `rollout_policy_lag` is cut with them (the plugin's patch, `padding.py`), else IcePop's
per-lag diagnostics refuse the batch. The run makes a padding row certain at every step: groups of rollout.n = 3,
Omega = 1 group and Phi = 1 token, so each step trains exactly one group, 3 samples, which 2 ranks cannot split.
"""

from __future__ import annotations

import math
import re

import pytest

pytestmark = pytest.mark.e2e

STEPS, N = 2, 3


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory):
    from ring_ext.verl_run import run_main_ppo

    workdir = tmp_path_factory.mktemp("c3po_dp2")
    return run_main_ppo([
        "+recipe=ring1t", "trainer.n_gpus_per_node=2", f"actor_rollout_ref.rollout.n={N}",
        f"trainer.total_training_steps={STEPS}", f"trainer.default_local_dir={workdir / 'ckpt'}", "trainer.save_freq=0",
        "trainer.v1.c3po.token_budget=1", "trainer.v1.c3po.pool_prompts=1",
    ], workdir, name="dp2", timeout=900, env={"VERL_LOGGING_LEVEL": "INFO"})  # verl says where it pads at INFO


def test_two_trainer_ranks_train_through_a_padding_row_every_step(run) -> None:
    steps = {s["step"]: s["data"] for s in run.steps}
    assert sorted(steps) == list(range(1, STEPS + 1))
    assert len(set(re.findall(r"WorkerDict pid=(\d+)", run.log))) == 2  # one trainer rank per logical GPU
    for step, d in steps.items():
        assert d["c3po/groups_trained"] == 1 and d["c3po/trajectories_trained"] == N, step
        # IcePop's diagnostics split by version lag read the lag field of every row, padding rows included
        assert 0.0 <= d["actor/mismatch/lag0/kept_frac"] <= 1.0 and math.isfinite(d["actor/pg_loss"]), step
    padded = re.findall(r"Upsampled batch from (\d+) to (\d+) with (\d+) synthetic padding samples", run.log)
    assert padded and all((int(a), int(b), int(p)) == (N, 2 * N, N) for a, b, p in padded), padded
