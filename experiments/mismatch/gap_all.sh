#!/usr/bin/env bash
# Issue 18, every run in order, one process at a time, niced (the machine is shared); resumable: rerun this
# script and finished arms are skipped, unfinished ones continue from their last 50-step checkpoint.
#   bash experiments/mismatch/gap_all.sh 2>&1 | tee /tmp/gap_all.log
set -euo pipefail
cd "$(dirname "$0")/../.."
study() { nice -n 15 .venv/bin/python -m experiments.mismatch.study "$@"; }
study calibrate                                    # calibration table, mode pick, prompt pool
study lr --steps 150                               # 1e-3 first; 5e-4, 3e-4 only if the control collapses
study arms --steps "${STEPS:-500}" --arms vanilla@mm icepop@mm vanilla@fp32 tis@mm icepop:0.5:2@mm \
    vanilla+replay@mm icepop@fp32                  # icepop@fp32 runs 50 steps (the bit-identity check)
study bias                                         # at the start and at the end of vanilla@mm
study arms --steps "${STEPS:-500}" --seeds 1 --arms vanilla@mm icepop@mm
.venv/bin/python -m experiments.mismatch.gapreport
