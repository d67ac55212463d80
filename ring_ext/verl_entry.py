"""Target of ring-ext's `verl.plugins` entry point: verl imports it in every process it starts."""

import os

from ring_ext.config_check import check_recipe_keys
from ring_ext.device import hand_device_to_every_process
from ring_ext.discovery import load_plugins
from ring_ext.patching import patch_after_import
from ring_ext.resolvers import register_resolvers
from ring_ext.run_record import name_the_run_dir, record_on_init, record_on_log, report_on_finish
from ring_ext.startup import (
    add_startup_check,
    check_config_resolves,
    check_megatron_engine,
    check_policy_loss_registered,
    check_trainer_mode_plugin,
    report_attention,
)
from ring_ext.wandb_run import keep_wandb_in_the_run_dir, teardown_after_finish

# Runs stay local unless the user opts in (WANDB_MODE=online); `wandb sync` uploads them later.
os.environ.setdefault("WANDB_MODE", "offline")
register_resolvers()
# A missing plugin first: its install hint says more than the unknown keys its recipe section would show.
add_startup_check("policy_loss_registered", check_policy_loss_registered)
add_startup_check("trainer_mode_plugin", check_trainer_mode_plugin)
add_startup_check("recipe_keys_known", check_recipe_keys)
add_startup_check("config_resolves", check_config_resolves)
add_startup_check("wandb_in_the_run_dir", keep_wandb_in_the_run_dir)
add_startup_check("run_record", name_the_run_dir)
add_startup_check("device_decided_once", hand_device_to_every_process)
add_startup_check("attention", report_attention)
add_startup_check("megatron_engine", check_megatron_engine)
# The run's own record and summary (ring_ext.run_record); finish also tears wandb down (one wrapper per attribute).
patch_after_import("verl.utils.tracking:Tracking.__init__", record_on_init)
patch_after_import("verl.utils.tracking:Tracking.log", record_on_log)
patch_after_import("verl.utils.tracking:Tracking.finish", lambda fn: report_on_finish(teardown_after_finish(fn)))
load_plugins()
