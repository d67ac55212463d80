"""Where the cut's latency comes from when rollout clients run on another node: one node against two, same run.

Runs `+recipe=ring1t` (the recipe's C3PO++: carry=abort, admission at the poll, Phi 256, Omega 24) for --steps steps
(with --restart-at R: to step R, then resumed from R's checkpoint to --steps in a new process, as README's run)
with two agent-loop workers, once on one node (a local Ray) and once on a two-node Ray cluster on this machine
(`ring_ext.local_cluster`: raylets on 127.0.0.2 and 127.0.0.3, one agent-loop worker per node, the trainer and the
engine on the head). Per step, from the run's own metrics (`phase_stats.py`): `budget_used` (how far past Phi the
phase went), the groups deferred (finished after the batch was taken), `cut_s` (the crossing to every request back
at its client), and `report_delay_s` / `report_delay_max_s` (a segment's return at its client to its report at the
budget gate: how late the gate hears of the completion that crosses Phi). Writes <--out>.json and prints a table.

    python benchmarks/c3po_cut_across_nodes.py --steps 4 --out /tmp/cut/nodes     # ~8 min on 2 cores
    python benchmarks/c3po_cut_across_nodes.py --steps 4 --restart-at 2 --out /tmp/cut/restart   # ~12 min
Not stood in for: network latency (both nodes are one machine's loopback).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path
from typing import Any

from ring_ext.verl_run import run_main_ppo

METRICS = ("c3po/budget_used", "c3po/groups_deferred", "c3po/cut_s", "c3po/report_delay_s",
           "c3po/report_delay_max_s", "c3po/gate_cut", "c3po/sample/cut_s")


def overrides(steps: int, ckpt: Path) -> list[str]:
    # the recipe saves the last step: a second process with more steps resumes from it
    return ["+recipe=ring1t", f"trainer.total_training_steps={steps}", f"trainer.default_local_dir={ckpt}",
            "actor_rollout_ref.rollout.agent.num_workers=2"]


def processes(name: str, steps: int, restart_at: int | None, workdir: Path, extra: Any = lambda name: [],
              env: dict[str, str] | None = None) -> list[dict]:
    """One process to `steps`, or two: to `restart_at`, then resumed to `steps`. Every step's metrics, in order."""
    runs = [(name, restart_at), (f"{name}_resumed", steps)] if restart_at else [(name, steps)]
    out = []
    for run_name, last in runs:
        run = run_main_ppo([*overrides(last, workdir / name), *extra(run_name)], workdir, name=run_name,
                           timeout=900, env=env)
        out += [s["data"] for s in sorted(run.steps, key=lambda s: s["step"])]
    return out


def one_node(steps: int, restart_at: int | None, workdir: Path) -> list[dict]:
    return processes("one_node", steps, restart_at, workdir)


def two_nodes(steps: int, restart_at: int | None, workdir: Path) -> list[dict]:
    from ring_ext.local_cluster import HEAD_IP, WORKER_IP, NodeSpec, two_hosts

    head = NodeSpec(HEAD_IP, num_cpus=8, num_gpus=1)  # trainer and vLLM (C3PO++ is a colocated mode)
    worker = NodeSpec(WORKER_IP, num_cpus=4, num_gpus=0)  # an agent-loop worker
    with two_hosts(head, worker, log_dir=workdir, env={"VERL_LOGGING_LEVEL": "WARN"}) as cluster:
        cluster.tables(want=(HEAD_IP, WORKER_IP))
        # the TaskRunner runs on a node of the cluster: the step log's path travels with the job
        log = lambda run_name: [f"++ray_kwargs.ray_init.runtime_env.env_vars.VERL_FILE_LOGGER_PATH="
                                f"{workdir / f'{run_name}.jsonl'}"]
        return processes("two_nodes", steps, restart_at, workdir, log,
                         {**cluster.client_env(), "VERL_LOGGING_LEVEL": "WARN"})


def summary(steps: list[dict]) -> dict[str, Any]:
    """Per metric: every step's value and the median over steps 2.. (step 1's phase has no cut measured before)."""
    out: dict[str, Any] = {}
    for key in METRICS:
        values = [s.get(key) for s in steps]
        later = [v for v in values[1:] if v is not None]
        out[key] = {"steps": values, "median_from_step_2": statistics.median(later) if later else None}
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=4, help="training steps per run")
    p.add_argument("--restart-at", type=int, default=None, help="stop at this step and resume in a new process")
    p.add_argument("--out", type=Path, required=True, help="output stem (.json)")
    p.add_argument("--workdir", type=Path, default=None, help="run folders and logs (default: a new /tmp folder)")
    args = p.parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="c3po_nodes_"))
    workdir.mkdir(parents=True, exist_ok=True)
    if args.restart_at is not None and not 0 < args.restart_at < args.steps:
        p.error(f"--restart-at must be in [1, --steps): {args.restart_at}")
    restart = f" --restart-at {args.restart_at}" if args.restart_at else ""
    result = {"command": f"python benchmarks/c3po_cut_across_nodes.py --steps {args.steps}{restart} --out {args.out}",
              "one_node": summary(one_node(args.steps, args.restart_at, workdir)),
              "two_nodes": summary(two_nodes(args.steps, args.restart_at, workdir))}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    print(result["command"])
    print(f"{'metric':28s} {'one node':>24s} {'two nodes':>24s}")
    for key in METRICS:
        a, b = (result[n][key]["median_from_step_2"] for n in ("one_node", "two_nodes"))
        fmt = lambda v: "-" if v is None else f"{v:.3f}"
        print(f"{key:28s} {fmt(a):>24s} {fmt(b):>24s}")
    print(f"wrote {args.out.with_suffix('.json')}; runs and logs in {workdir}")


if __name__ == "__main__":
    main()
