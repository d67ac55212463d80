"""Plugin discovery: verl's entry point reaches every process, failures are loud, import stays cheap."""

from __future__ import annotations

import warnings
from pathlib import Path
from importlib.metadata import entry_points

import pytest

from subprocess_helpers import last_json, run_python
from ring_ext.discovery import RingExtPluginWarning, load_plugins

# Every installed ring-ext plugin, by entry-point name: each verl process must have loaded all of them.
PLUGINS = sorted(ep.name for ep in entry_points(group="ring_ext.plugins"))
BROKEN = "raise RuntimeError('boom: missing native library')\n"
GOOD = """
from ring_ext.hookspecs import hookimpl

@hookimpl
def ring_ext_register(registrar):
    registrar.workaround("hello", "registered by a scratch plugin")
"""


def test_broken_plugin_warns_by_name_and_others_still_load(plugin_site) -> None:
    plugin_site("ring-ext-broken", "broken", "ring_ext_broken_plugin", BROKEN)
    plugin_site("ring-ext-hello", "hello", "ring_ext_hello_plugin", GOOD)
    with pytest.warns(RingExtPluginWarning) as caught:
        reports = {r.name: r for r in load_plugins(reload=True)}
    messages = [str(w.message) for w in caught]
    assert any("'broken'" in m and "ring-ext-broken" in m and "boom: missing native library" in m for m in messages)
    assert reports["broken"].error == "RuntimeError: boom: missing native library"
    assert [(r.kind, r.name) for r in reports["hello"].registrations] == [("workaround", "hello")]
    assert reports["cpu"].error is None and any(r.kind == "platform" for r in reports["cpu"].registrations)


def test_plugin_whose_hook_raises_is_reported_not_fatal(plugin_site) -> None:
    plugin_site(
        "ring-ext-badhook",
        "badhook",
        "ring_ext_badhook_plugin",
        "from ring_ext.hookspecs import hookimpl\n\n"
        "@hookimpl\ndef ring_ext_register(registrar):\n    raise KeyError('x')\n",
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reports = {r.name: r for r in load_plugins(reload=True)}
    assert reports["badhook"].error == "KeyError: 'x'"
    assert any("badhook" in str(w.message) for w in caught)
    assert reports["cpu"].error is None


def test_import_verl_loads_ring_ext_through_verl_entry_point() -> None:
    out = run_python(
        """
        import json, sys
        import verl
        from verl.plugin.platform.platform_manager import PlatformRegistry
        from ring_ext.discovery import _reports
        print(json.dumps({
            "entry": "ring_ext.verl_entry" in sys.modules,
            "cpu_platform": PlatformRegistry.get("cpu").__module__,
            "plugins": [r.name for r in _reports or []],
        }))
        """
    )
    assert last_json(out) == {"entry": True, "cpu_platform": "ring_ext_cpu.platform", "plugins": PLUGINS}


def test_entry_point_import_is_cheap() -> None:
    """ring-ext's entry point adds no heavy package beyond what verl itself already imported."""
    out = run_python(
        """
        import json, sys
        import verl
        before = set(sys.modules)
        import ring_ext.verl_entry
        added = sorted(set(sys.modules) - before)
        print(json.dumps(added))
        """,
        env={"VERL_USE_EXTERNAL_PLUGINS": "none"},
    )
    added = last_json(out)
    heavy = [m for m in added if m.split(".")[0] in {"vllm", "transformers", "torch", "ray", "megatron", "wandb"}]
    heavy += [m for m in added if m.startswith(("verl.trainer", "verl.workers", "verl.checkpoint_engine"))]
    assert "ring_ext_cpu.plugin" in added
    assert heavy == []


def test_ray_task_and_verl_worker_group_see_registrations() -> None:
    """Registrations exist in Ray workers: verl imports ring-ext there, nobody else does."""
    out = run_python(
        """
        import json
        import ray
        import verl
        from verl.single_controller.base import Worker
        from verl.single_controller.ray import RayClassWithInitArgs, RayResourcePool, RayWorkerGroup

        def probe():
            import sys
            from verl.plugin.platform.platform_manager import PlatformRegistry
            from ring_ext.discovery import _reports
            cls = PlatformRegistry.get("cpu")
            return {"platform": cls and cls.__name__, "plugins": [r.name for r in _reports or []],
                    "entry": "ring_ext.verl_entry" in sys.modules}

        @ray.remote
        def task():
            import verl  # a Ray task imports verl; verl imports ring-ext
            return probe()

        @ray.remote
        class ProbeWorker(Worker):
            def probe(self):
                return probe()

        ray.init(num_cpus=4, include_dashboard=False)
        pool = RayResourcePool([2], use_gpu=False, max_colocate_count=1)  # one logical CPU per worker
        group = RayWorkerGroup(pool, RayClassWithInitArgs(cls=ProbeWorker))
        print(json.dumps({"task": ray.get(task.remote()), "workers": group.execute_all_sync("probe")}))
        ray.shutdown()
        """,
        timeout=400,
    )
    result = last_json(out)
    expected = {"platform": "PlatformCPU", "plugins": PLUGINS, "entry": True}
    assert result["task"] == expected
    assert result["workers"] == [expected, expected]


def test_known_plugins_table_says_what_each_installed_plugin_registers() -> None:
    """The core names plugins from `ring_ext.known_plugins` only; a plugin that registers a loss, a mode, a
    backend or a platform the table does not list (or the reverse) would get users a wrong install hint."""
    from ring_ext.known_plugins import KNOWN_PLUGINS

    reports = {r.distribution: r for r in load_plugins(reload=True)}
    kinds = ("policy_loss", "trainer_mode", "checkpoint_engine", "platform")
    for plugin in KNOWN_PLUGINS:
        assert plugin.installed(), plugin.distribution  # CI installs every plugin
        registered = {(r.kind, r.name) for r in reports[plugin.distribution].registrations if r.kind in kinds}
        assert registered == set(plugin.provides), plugin.distribution
    repo = Path(__file__).resolve().parents[1]
    assert {p.directory for p in KNOWN_PLUGINS} == {
        f"plugins/{d.name}" for d in (repo / "plugins").iterdir() if (d / "pyproject.toml").exists()}
