"""The `ring-ext` command line, as installed (console script), on the real plugin set."""

from __future__ import annotations

import json
from importlib.metadata import entry_points

from subprocess_helpers import ring_ext


def test_help_names_the_commands_and_the_entry_point() -> None:
    proc = ring_ext("--help")
    assert proc.returncode == 0
    for word in ("plugins", "recipes", "pipeline", "verl.trainer.main_ppo"):
        assert word in proc.stdout


def test_plugins_lists_every_installed_plugin_with_its_registrations() -> None:
    proc = ring_ext("plugins", "--json")
    assert proc.returncode == 0, proc.stderr
    reports = {r["name"]: r for r in json.loads(proc.stdout)}
    assert set(reports) == {ep.name for ep in entry_points(group="ring_ext.plugins")}
    cpu = reports["cpu"]
    assert cpu["distribution"] == "ring-ext-cpu" and cpu["error"] is None
    assert ("platform", "cpu") in {(r["kind"], r["name"]) for r in cpu["registrations"]}
    if "icepop" in reports:
        losses = {r["name"] for r in reports["icepop"]["registrations"] if r["kind"] == "policy_loss"}
        assert losses == {"icepop", "kpop", "tis", "seq_geo", "seq_max", "seq_max_icepop", "seq_geo_tis"}


def test_plugins_text_output_shows_versions() -> None:
    proc = ring_ext("plugins")
    assert proc.returncode == 0
    assert "cpu  (ring-ext-cpu 0.1.0)  ok" in proc.stdout


def test_recipes_lists_ring1t_with_its_summary() -> None:
    proc = ring_ext("recipes", "--json")
    recipes = {r["name"]: r["summary"] for r in json.loads(proc.stdout)}
    assert "ring1t" in recipes and "GRPO" in recipes["ring1t"]


def test_unknown_command_fails_with_usage() -> None:
    proc = ring_ext("plugin")
    assert proc.returncode == 2
    assert "invalid choice" in proc.stderr
