"""Target of ring-ext's `verl.plugins` entry point: verl imports it in every process it starts."""

import os

from ring_ext.discovery import load_plugins
from ring_ext.resolvers import register_resolvers

# Runs stay local unless the user opts in (WANDB_MODE=online); `wandb sync` uploads them later.
os.environ.setdefault("WANDB_MODE", "offline")
register_resolvers()
load_plugins()
