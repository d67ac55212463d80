"""verl's `timing_s/update_weights` in real `+recipe=ring1t` runs (the Ring-1T loop, tiny default): astate in place
vs verl's bucket copy, same recipe, same steps, one after the other.

Reproduce: `python benchmarks/bench_astate_update_weights.py [--steps 6]` (~6 min on 2 cores). Writes
astate_update_weights.json to `--out` (benchmarks/results): per path, each step's `timing_s/update_weights` (which
also counts verl's pause and resume around the bytes).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from ring_ext.verl_run import run_main_ppo

PATHS = {"astate": [], "verl": ["actor_rollout_ref.rollout.engine_kwargs.vllm.weight_transfer_config=null"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = ap.parse_args()
    out: dict = {"command": "python " + " ".join(sys.argv), "steps": args.steps}
    with tempfile.TemporaryDirectory() as tmp:
        for name, extra in PATHS.items():
            subprocess.run(["ray", "stop", "--force"], capture_output=True)  # a fresh Ray per run
            workdir = Path(tmp) / name
            workdir.mkdir()
            run = run_main_ppo(["+recipe=ring1t", f"trainer.total_training_steps={args.steps}", *extra], workdir,
                               name=name, timeout=1200)
            out[name] = [s["data"]["timing_s/update_weights"] for s in run.steps]
            print(f"{name}: median {statistics.median(out[name]) * 1e3:.1f} ms over {len(out[name])} steps", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "astate_update_weights.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
