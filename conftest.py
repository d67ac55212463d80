"""The session-scoped `main_ppo` runs several test modules share (tests/shared_runs.py), for every test path."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent / "tests"))

from shared_runs import c3po_two_hosts_run, grpo_run, ring1t_run  # noqa: E402, F401  (session fixtures)
