"""Transfer-plan cost and balance of ring_ext_astate's planner vs a rank-0 funnel, at a realistic layout.

Reproduce: `python benchmarks/bench_astate_plan.py [--tensors 200 --dim 4096]` (about 10 s on 2 cores).
Trainer: Megatron TP8 x DP4 (32 ranks, column-parallel shards, 4 replicas); rollout: vLLM TP4 x 8 replicas
(32 ranks). Prints plan time, cached-lookup time, transfer/bucket counts and the per-sender byte load
against the rank-0 funnel that stock weight sync uses (every byte leaves trainer rank 0). Writes
benchmarks/results/astate_plan.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

try:
    import ring_ext_astate  # noqa: F401
except ImportError:  # a source checkout without the plugin installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "plugins" / "astate"))

from ring_ext_astate.layouts import megatron_tp_layout, merge_layouts, vllm_tp_dest
from ring_ext_astate.planner import PlanCache, TensorMeta

RESULTS = Path(__file__).resolve().parent / "results" / "astate_plan.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tensors", type=int, default=200, help="number of weight matrices")
    parser.add_argument("--dim", type=int, default=4096, help="each matrix is dim x dim, bf16")
    parser.add_argument("--bucket-mib", type=int, default=64, help="bucket size in MiB")
    args = parser.parse_args()
    tp, dp, rollout_tp, rollout_dp = 8, 4, 4, 8
    tensors = [TensorMeta(f"w{i}", (args.dim, args.dim), 2) for i in range(args.tensors)]
    trainer = merge_layouts(
        *(megatron_tp_layout(m, tp, 0, range(r * tp, (r + 1) * tp)) for m in tensors for r in range(dp))
    )
    rollout = {
        replica * rollout_tp + rank: [vllm_tp_dest(m.name, m, rollout_tp, rank, 0) for m in tensors]
        for replica in range(rollout_dp)
        for rank in range(rollout_tp)
    }
    cache = PlanCache()
    t0 = time.perf_counter()
    plan = cache.get(tensors, trainer, rollout, args.bucket_mib << 20)
    t1 = time.perf_counter()
    again = cache.get(tensors, trainer, rollout, args.bucket_mib << 20)
    t2 = time.perf_counter()
    assert again is plan
    loads = plan.bytes_per_sender()
    total = sum(loads.values())
    result = {
        "tensors": args.tensors, "dim": args.dim, "bucket_mib": args.bucket_mib,
        "trainer": f"TP{tp}xDP{dp}", "rollout": f"TP{rollout_tp}x{rollout_dp}",
        "plan_s": t1 - t0, "cached_s": t2 - t1, "transfers": len(plan.transfers), "buckets": len(plan.buckets),
        "total_gib": total / 2**30, "senders": len(loads),
        "max_sender_gib": max(loads.values()) / 2**30, "min_sender_gib": min(loads.values()) / 2**30,
        "rank0_funnel_gib": total / 2**30,
        "funnel_over_max_sender": total / max(loads.values()),
    }  # fmt: skip
    for key, value in result.items():
        print(f"{key:>24}: {value:.4g}" if isinstance(value, float) else f"{key:>24}: {value}")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
