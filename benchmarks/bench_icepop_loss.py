"""Forward+backward time and peak memory of the `icepop`, `kpop` and `tis` policy losses against verl's `vanilla`.

Reproduce from the repo root (CPU: under 2 minutes on 2 cores; `--quick` for a smoke run on small inputs):

    python benchmarks/bench_icepop_loss.py                 # CPU, 1 torch thread
    python benchmarks/bench_icepop_loss.py --device cuda   # the same on a GPU

Each loss is the function registered in verl's policy-loss registry (`get_policy_loss_fn(name)`), called exactly as
verl's actor loss (`verl.workers.utils.losses.ppo_loss`) calls it:

    loss_fn(old_log_prob=..., log_prob=..., advantages=..., response_mask=..., loss_agg_mode="token-mean",
            config=actor_config, rollout_is_weights=None)

with the actor config verl's trainer gets (Hydra compose of `ppo_trainer` with `+recipe=ring1t`, converted to its
dataclass); the mismatch losses run inside `rollout_logprobs_context(infer_logp)`, which stands in for ring-ext's
patch of verl's call site. One timed call = forward + `loss.backward()` into a leaf `log_prob` (grad reset each call).

Inputs per B x T (float32, as verl's log-probs): rollout log-probs with mean about -2; trainer log-probs = rollout +
N(0, 0.05^2) noise, with a heavy tail (1% of tokens get N(0, 1)) so that about 0.3% of tokens fall outside the IcePop
band [0.5, 5]; current log-probs = trainer + N(0, 0.05^2); per-token N(0, 1) advantages; right padding of about 10%
of the tokens. Log-probs are clamped to <= 0.

Time: median over interleaved rounds (torch.utils.benchmark.Timer, order rotated each round, warm-up call first) of
the mean time per call, as in bench_icepop_mask.py; ratio = time / vanilla time. The mismatch losses are also split
into (a) `mismatch_weights`, (b) `mismatch_metrics`, (c) the PPO part (verl's `compute_policy_loss_vanilla` with the
weights as `rollout_is_weights`, forward + backward); "glue" = total - (a + b + c).

On CPU the table also gives the minor page faults per call: memory that glibc's malloc handed back to the OS
(heap trimmed, chunks unmapped) and the next call faults in again. At 32 x 8192 a [B, T] float64 tensor is 2 MiB,
right at glibc's dynamic thresholds, and these faults are a large part of every loss's CPU time, vanilla's included.

Peak memory of one forward+backward, as a ratio to vanilla's:
  alloc  peak bytes held by torch tensors above what was held before the call: on CUDA
         torch.cuda.max_memory_allocated() - memory_allocated() (after a warm-up call); on CPU the same quantity from
         torch.profiler's memory events (allocator independent).
  rss    CPU only: a fresh child process (multiprocessing spawn) per (size, loss) builds the inputs, warms the code
         path on a tiny batch, calls malloc_trim(0) and resets the RSS high-water mark (/proc/self/clear_refs),
         runs one forward+backward at full size and reports the growth of the high-water mark (VmHWM of
         /proc/self/status; resource.getrusage(RUSAGE_SELF).ru_maxrss where there is no /proc, but on Linux
         ru_maxrss can keep the imports' peak, about 65 MB above the baseline here, and then reads 0). This is what
         the process really touches, but it depends on glibc's heap reuse, so it is noisier than `alloc`.

Writes benchmarks/results/icepop_loss.json and benchmarks/results/icepop_loss.png.
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import os
import platform
import resource
import statistics
import sys
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils.benchmark import Timer
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
try:
    import ring_ext_icepop  # noqa: F401
except ImportError:  # plain checkout, plugin not installed
    sys.path.insert(0, str(ROOT / "plugins" / "icepop"))

LOSSES = ["vanilla", "icepop", "kpop", "tis"]
MISMATCH = LOSSES[1:]
SIZES = [(8, 4096), (32, 8192)]
QUICK_SIZES = [(2, 512), (8, 1024)]
TARGET = 1.05
INFER_NOISE = 0.05  # std of train_logp - infer_logp on most tokens
TAIL_FRAC, TAIL_NOISE = 0.01, 1.0  # heavy tail: 1% of tokens get std 1.0 (about 0.3% end up outside [0.5, 5])
POLICY_NOISE = 0.05  # std of log_prob - old_log_prob
PAD_FRAC = 0.10  # mean fraction of right padding


def compose_actor() -> Any:
    """verl's actor config as its trainer gets it (same as plugins/icepop/tests/conftest.py::compose_actor)."""
    from verl.utils.config import omega_conf_to_dataclass

    from ring_ext.verl_config import compose_verl

    return omega_conf_to_dataclass(compose_verl(["+recipe=ring1t", "ring1t_loop=grpo"]).actor_rollout_ref.actor)


def make_inputs(b: int, t: int, device: str, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    infer = -torch.empty(b, t).exponential_(0.5, generator=g)  # sampled-token log-probs, mean -2
    tail = torch.rand(b, t, generator=g) < TAIL_FRAC
    noise = torch.randn(b, t, generator=g) * torch.where(tail, TAIL_NOISE, INFER_NOISE)
    old = (infer + noise).clamp(max=0.0)
    new = (old + torch.randn(b, t, generator=g) * POLICY_NOISE).clamp(max=0.0)
    pad = torch.randint(0, int(2 * PAD_FRAC * t) + 1, (b, 1), generator=g)
    mask = (torch.arange(t)[None, :] < t - pad).float()
    adv = torch.randn(b, t, generator=g) * mask
    out = {"infer": infer, "old": old, "new": new, "mask": mask, "adv": adv}
    out = {k: v.to(device) for k, v in out.items()}
    out["new"].requires_grad_(True)
    return out


def loss_step(name: str, x: dict[str, torch.Tensor], actor: Any) -> Callable[[], None]:
    """One forward+backward of the registered loss `name`, called as verl's ppo_loss calls it."""
    from verl.trainer.ppo.core_algos import get_policy_loss_fn

    from ring_ext_icepop.loss import rollout_logprobs_context

    fn = get_policy_loss_fn(name)
    kwargs = dict(old_log_prob=x["old"], log_prob=x["new"], advantages=x["adv"], response_mask=x["mask"])

    def step() -> None:
        if name == "vanilla":
            loss, _ = fn(**kwargs, loss_agg_mode="token-mean", config=actor, rollout_is_weights=None)
        else:
            with rollout_logprobs_context(x["infer"]):
                loss, _ = fn(**kwargs, loss_agg_mode="token-mean", config=actor, rollout_is_weights=None)
        loss.backward()
        x["new"].grad = None

    return step


def part_steps(kind: str, x: dict[str, torch.Tensor], actor: Any) -> dict[str, Callable[[], None]]:
    """The mismatch loss cut in three: (a) weights, (b) metrics, (c) verl's PPO-clip with the weights, fwd+bwd."""
    from verl.trainer.ppo.core_algos import compute_policy_loss_vanilla

    from ring_ext_icepop.config import variant_from_config
    from ring_ext_icepop.metrics import mismatch_metrics
    from ring_ext_icepop.weights import mismatch_weights

    cfg = variant_from_config(kind, actor.policy_loss)
    mask = x["mask"].bool()
    w = mismatch_weights(x["old"], x["infer"], mask, cfg)
    is_weights = w.weight.clone()

    def weights() -> None:
        mismatch_weights(x["old"], x["infer"], mask, cfg)

    def metrics() -> None:
        mismatch_metrics(w, mask, train_logp=x["old"], prefix="mismatch/")

    def ppo() -> None:
        loss, _ = compute_policy_loss_vanilla(
            old_log_prob=x["old"], log_prob=x["new"], advantages=x["adv"], response_mask=x["mask"],
            loss_agg_mode="token-mean", config=actor, rollout_is_weights=is_weights,
        )
        loss.backward()
        x["new"].grad = None

    return {f"{kind}:weights": weights, f"{kind}:metrics": metrics, f"{kind}:ppo": ppo}


def interleaved_medians(steps: dict[str, Callable[[], None]], budget_s: float, rounds: int) -> dict[str, float]:
    """Median seconds per call of each step, sampled in rotating rounds so that load drifting on a shared machine
    hits every step alike (back-to-back blocks would charge it to whichever ran at the time)."""
    timers = {name: Timer(stmt="fn()", globals={"fn": fn}) for name, fn in steps.items()}
    number = {}
    for name, timer in timers.items():  # warm-up and calibration: one sample ~ budget / rounds
        timer.timeit(1)
        per_call = timer.timeit(1).mean
        number[name] = max(1, int(budget_s / rounds / max(per_call, 1e-7)))
    samples: dict[str, list[float]] = {name: [] for name in steps}
    names = list(steps)
    for i in range(rounds):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            samples[name].append(timers[name].timeit(number[name]).mean)
    return {name: statistics.median(values) for name, values in samples.items()}


def _peak_rss_bytes() -> tuple[int, str]:
    """The process's RSS high-water mark: VmHWM of /proc/self/status on Linux (resettable, see below), else
    ru_maxrss. (ru_maxrss is not reliably resettable: the kernel also folds in a process-wide maximum that it
    updates when threads exit, so it can keep the peak of the imports.)"""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024, "VmHWM"
    except OSError:
        pass
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale, "ru_maxrss"


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()
    except OSError:
        return None


def _reset_high_water_mark() -> bool:
    """Hand freed heap memory back to the OS (glibc malloc_trim) and reset the RSS high-water mark (VmHWM) to the
    current RSS (Linux /proc/self/clear_refs). Without both, memory that the imports freed but the process still
    holds would absorb part of the call's allocations, and the imports' peak would hide the call's."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except Exception:
        return False


def torch_alloc_peak(step: Callable[[], None]) -> float:
    """Peak bytes held by torch tensors during one call, above what was held before it (torch.profiler's memory
    events: allocations as each op's self memory, frees as negative [memory] events). Allocator independent."""
    from torch.profiler import ProfilerActivity, profile

    saved = os.dup(2)  # kineto prints profiler_start/stop lines straight to fd 2
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                step()
    finally:
        os.dup2(saved, 2)
        os.close(saved)
    current = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        current += event.self_cpu_memory_usage
        peak = max(peak, current)
    return float(peak)


def _cpu_peak_child(name: str, b: int, t: int, threads: int, actor: Any, queue: Any) -> None:
    try:
        torch.set_num_threads(threads)
        import verl  # noqa: F401  (loads ring-ext's plugins into the registry)

        loss_step(name, make_inputs(2, 64, "cpu", seed=1), actor)()  # warm the code path on a tiny batch
        step = loss_step(name, make_inputs(b, t, "cpu"), actor)
        reset = _reset_high_water_mark()
        base, source = _peak_rss_bytes()
        slack = (base - rss) if (rss := _rss_bytes()) is not None else None  # > 0: part of the peak is hidden
        step()
        rss_peak = _peak_rss_bytes()[0] - base
        queue.put(("ok", {
            "rss": float(rss_peak), "alloc": torch_alloc_peak(step), "hwm_reset": reset, "slack": slack,
            "rss_source": source,
        }))
    except BaseException as exc:  # report, do not hang the parent
        queue.put(("error", f"{type(exc).__name__}: {exc}"))


def cpu_peaks(cells: list[tuple[int, int, str]], threads: int, actor: Any, jobs: int) -> dict:
    """Peak memory of each (B, T, loss) cell, each in its own fresh spawned process, `jobs` at a time."""
    ctx = multiprocessing.get_context("spawn")
    out: dict = {}
    bar = tqdm(total=len(cells), desc="peak memory", unit="loss")
    for i in range(0, len(cells), jobs):
        running = []
        for b, t, name in cells[i : i + jobs]:
            queue = ctx.Queue()
            proc = ctx.Process(target=_cpu_peak_child, args=(name, b, t, threads, actor, queue))
            proc.start()
            running.append(((b, t, name), proc, queue))
        for cell, proc, queue in running:
            status, value = queue.get(timeout=600)
            proc.join()
            if status != "ok":
                raise RuntimeError(f"memory child for {cell} failed: {value}")
            out[cell] = value
            bar.update()
    bar.close()
    return out


def cuda_peak(name: str, b: int, t: int, actor: Any) -> dict:
    step = loss_step(name, make_inputs(b, t, "cuda"), actor)
    step()  # warm-up
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return {"alloc": float(torch.cuda.max_memory_allocated() - base), "rss": None}


def faults_per_call(step: Callable[[], None], calls: int = 5) -> float:
    """Minor page faults per call (CPU): memory the allocator handed back to the OS and has to fault in again."""
    step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(calls):
        step()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / calls


def plot(results: list[dict], sizes: list[tuple[int, int]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("ratio", "time / vanilla time", "loss forward+backward time")]
    if any(r["alloc_ratio"] is not None for r in results):
        panels.append(("alloc_ratio", "peak / vanilla peak", "peak tensor memory (torch allocations)"))
    if any(r["rss_ratio"] is not None for r in results):
        panels.append(("rss_ratio", "peak / vanilla peak", "peak RSS growth (fresh process)"))
    width = 0.8 / len(MISMATCH)
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.5), squeeze=False)
    for ax, (key, ylabel, panel_title) in zip(axes[0], panels):
        for i, loss in enumerate(MISMATCH):
            vals = [next(r[key] for r in results if tuple(r["size"]) == s and r["loss"] == loss) for s in sizes]
            xs = [j + (i - (len(MISMATCH) - 1) / 2) * width for j in range(len(sizes))]
            bars = ax.bar(xs, [v if v is not None else 0.0 for v in vals], width, label=loss)
            ax.bar_label(bars, labels=[f"{v:.2f}" if v is not None else "n/a" for v in vals], fontsize=7)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.axhline(TARGET, color="red", linestyle="--", linewidth=1.0, label=f"target {TARGET}")
        ax.set_xticks(range(len(sizes)), [f"{b}x{t}" for b, t in sizes])
        ax.set_xlabel("B x T")
        ax.set_ylabel(ylabel)
        ax.set_title(panel_title, fontsize=10)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"sizes {QUICK_SIZES}, short timing (smoke run)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds of timing per cell (default 0.8, quick 0.1)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 15, quick 5)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--memory-jobs", type=int, default=2, help="CPU memory child processes at a time (default 2)")
    parser.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device available")
    torch.set_num_threads(args.threads)
    sizes = QUICK_SIZES if args.quick else SIZES
    budget = args.budget or (0.1 if args.quick else 0.8)
    rounds = args.rounds or (5 if args.quick else 15)

    import verl  # noqa: F401  (loads ring-ext's plugins, so get_policy_loss_fn("icepop") works)

    actor = compose_actor()
    results: list[dict] = []
    parts: list[dict] = []
    for b, t in tqdm(sizes, desc="timing", unit="size"):
        x = make_inputs(b, t, args.device)
        steps = {name: loss_step(name, x, actor) for name in LOSSES}
        for kind in MISMATCH:
            steps |= part_steps(kind, x, actor)
        med = interleaved_medians(steps, budget, rounds)
        for name in LOSSES:
            faults = faults_per_call(steps[name]) if args.device == "cpu" else None
            results.append({
                "size": [b, t], "loss": name, "median_s": med[name], "ratio": med[name] / med["vanilla"],
                "minor_faults_per_call": faults,
            })
        for kind in MISMATCH:
            w, m, p = (med[f"{kind}:{part}"] for part in ("weights", "metrics", "ppo"))
            parts.append({
                "size": [b, t], "loss": kind, "total_s": med[kind], "weights_s": w, "metrics_s": m, "ppo_s": p,
                "glue_s": med[kind] - w - m - p, "vanilla_s": med["vanilla"],
            })
        del x, steps

    cells = [(b, t, name) for b, t in sizes for name in LOSSES]
    if args.no_memory:
        peaks = {cell: {"alloc": None, "rss": None} for cell in cells}
    elif args.device == "cuda":
        peaks = {(b, t, name): cuda_peak(name, b, t, actor) for b, t, name in tqdm(cells, desc="peak memory")}
    else:
        peaks = cpu_peaks(cells, args.threads, actor, max(1, args.memory_jobs))
    for r in results:
        b, t = r["size"]
        peak, vanilla = peaks[(b, t, r["loss"])], peaks[(b, t, "vanilla")]
        for key in ("alloc", "rss"):
            r[f"{key}_peak_bytes"] = peak[key]
            r[f"{key}_ratio"] = peak[key] / vanilla[key] if peak[key] is not None and vanilla[key] else None
        r["rss_hwm_reset"] = peak.get("hwm_reset")
        r["rss_source"] = peak.get("rss_source")
        r["rss_baseline_slack_bytes"] = peak.get("slack")

    # Fraction of tokens each mask rejects on these inputs (the inputs are meant to be realistic, not trivial).
    from ring_ext_icepop.config import variant_from_config
    from ring_ext_icepop.weights import mismatch_weights

    x = make_inputs(*sizes[-1], "cpu")
    mask = x["mask"].bool()
    rejected = {}
    for kind in MISMATCH:
        kept = mismatch_weights(x["old"], x["infer"], mask, variant_from_config(kind, actor.policy_loss)).kept
        rejected[kind] = float((~kept & mask).sum() / mask.sum())

    dev = torch.cuda.get_device_name() if args.device == "cuda" else (platform.processor() or platform.machine())
    print(f"\ntorch {torch.__version__}, device={args.device} ({dev}), threads={torch.get_num_threads()}; "
          f"ratio = loss time / vanilla time, forward+backward; target <= {TARGET}")
    print("alloc = peak torch tensor memory of one call" + (" (max_memory_allocated)" if args.device == "cuda" else
          " (profiler memory events); rss = peak RSS growth of one call in a fresh process (VmHWM)"))
    print(f"{'B x T':>9} {'loss':>8} {'median ms':>10} {'ratio':>7} {'alloc MiB':>10} {'alloc ratio':>11} "
          f"{'rss MiB':>8} {'rss ratio':>9} {'faults/call':>11}")
    for r in results:
        b, t = r["size"]
        alloc = None if r["alloc_peak_bytes"] is None else r["alloc_peak_bytes"] / 2**20
        rss = None if r["rss_peak_bytes"] is None else r["rss_peak_bytes"] / 2**20
        print(f"{f'{b}x{t}':>9} {r['loss']:>8} {r['median_s'] * 1e3:>10.3f} {r['ratio']:>7.3f} "
              f"{_fmt(alloc, '.1f'):>10} "
              f"{_fmt(r['alloc_ratio'], '.2f'):>11} {_fmt(rss, '.1f'):>8} {_fmt(r['rss_ratio'], '.2f'):>9} "
              f"{_fmt(r['minor_faults_per_call'], '.0f'):>11}")
    print("\nwhere the time of the mismatch losses goes (ms; glue = total - weights - metrics - ppo):")
    print(f"{'B x T':>9} {'loss':>8} {'total':>8} {'weights':>8} {'metrics':>8} {'ppo':>8} {'glue':>8} {'vanilla':>8}")
    for p in parts:
        b, t = p["size"]
        cols = [p[k] * 1e3 for k in ("total_s", "weights_s", "metrics_s", "ppo_s", "glue_s", "vanilla_s")]
        print(f"{f'{b}x{t}':>9} {p['loss']:>8} " + " ".join(f"{c:>8.3f}" for c in cols))
    print(f"rejected token fraction at {sizes[-1][0]}x{sizes[-1][1]}: "
          + ", ".join(f"{k} {v:.3%}" for k, v in rejected.items()))

    args.out_dir.mkdir(parents=True, exist_ok=True)
    report = {
        "benchmark": "icepop_loss",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "verl": getattr(verl, "__version__", None),
        "threads": torch.get_num_threads(),
        "device": args.device,
        "device_name": dev,
        "python": platform.python_version(),
        "quick": args.quick,
        "target_ratio": TARGET,
        "timing_budget_s_per_cell": budget,
        "rounds": rounds,
        "sizes": [list(s) for s in sizes],
        "losses": LOSSES,
        "inputs": {
            "dtype": "float32", "infer_logp_mean": -2.0, "train_minus_infer_std": INFER_NOISE,
            "tail_frac": TAIL_FRAC, "tail_std": TAIL_NOISE,
            "policy_step_std": POLICY_NOISE, "padding_frac_mean": PAD_FRAC, "loss_agg_mode": "token-mean",
            "rejected_frac_at_largest_size": rejected,
        },
        "memory_method": None if args.no_memory else (
            {"alloc": "torch.cuda.max_memory_allocated() - memory_allocated() around one fwd+bwd (after a warm-up)"}
            if args.device == "cuda" else {
                "alloc": "peak of torch tensor bytes held during one fwd+bwd, from torch.profiler memory events",
                "rss": "growth of the RSS high-water mark (VmHWM; ru_maxrss where there is no /proc) over one "
                       "fwd+bwd in a fresh spawned process per (size, loss), after a tiny warm-up, malloc_trim(0) "
                       "and a reset of the high-water mark (/proc/self/clear_refs 5)",
            }
        ),
        "results": results,
        "time_split": parts,
    }
    (args.out_dir / "icepop_loss.json").write_text(json.dumps(report, indent=2) + "\n")
    title = (f"Mismatch losses vs verl vanilla: {args.device} ({dev}), torch {torch.__version__}, "
             f"{torch.get_num_threads()} thread(s)")
    plot(results, sizes, args.out_dir / "icepop_loss.png", title)
    print(f"wrote {args.out_dir / 'icepop_loss.json'} and {args.out_dir / 'icepop_loss.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
