"""One plugin installed alone, as a user would: the wheels of `ring-ext` and `ring-ext-icepop` in a fresh venv.

The fresh venv sees verl and its dependencies from this checkout's `.venv` (every entry of its site-packages
except ring-ext's, linked into one directory on the path): a stand-in for `pip install verl==0.9.1` that costs
no download. Nothing else of ring-ext is importable there.
"""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHECK = f"""
import json, sys, torch
sys.path.insert(0, "{ROOT / 'plugins' / 'icepop' / 'tests'}")
import verl  # loads ring-ext's entry point and its plugins
from importlib.metadata import entry_points
from verl.trainer.ppo.core_algos import get_policy_loss_fn
from verl.workers.utils import losses
from icepop_batches import actor_batch, compose_actor
from ring_ext.discovery import load_plugins
from ring_ext_icepop.loss import LOSSES

_, actor = compose_actor("actor_rollout_ref.actor.policy_loss.loss_mode=icepop")
old = torch.full((1, 4), -1.0, dtype=torch.float64)
infer = old - torch.tensor([[0.0, 0.0, 3.0, -3.0]], dtype=torch.float64)  # k = 1, 1, e^3, e^-3
output, data = actor_batch(old.clone().requires_grad_(True), old, infer, torch.ones_like(old),
                           torch.ones_like(old, dtype=torch.bool))
_, metrics = losses.ppo_loss(actor, output, data)  # verl's call site
print(json.dumps({{
    "entry_points": sorted(ep.name for ep in entry_points(group="ring_ext.plugins")),
    "plugins": [r.name for r in load_plugins()],
    "registered": get_policy_loss_fn("icepop") is LOSSES["icepop"],
    "call_site_patched": bool(getattr(losses.ppo_loss, "__ring_ext_patched__", False)),
    "kept_frac": metrics["mismatch/kept_frac"].aggregate(),
}}))
"""


def _site_packages(python: Path) -> Path:
    out = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         capture_output=True, text=True, check=True)
    return Path(out.stdout.strip())


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("single_plugin")
    wheels = tmp / "wheels"
    pip = [sys.executable, "-m", "pip"]
    subprocess.run([*pip, "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(ROOT),
                    str(ROOT / "plugins" / "icepop")], check=True, timeout=600)
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    subprocess.run([*pip, "--python", str(python), "install", "-q", "--no-deps", *map(str, wheels.glob("*.whl"))],
                   check=True, timeout=600)
    # verl and its dependencies, without any ring-ext distribution or its editable finders
    farm = tmp / "verl_env"
    farm.mkdir()
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        if "ring_ext" not in entry.name and "ring-ext" not in entry.name and entry.suffix != ".pth":
            (farm / entry.name).symlink_to(entry)
    (_site_packages(python) / "zz_verl_env.pth").write_text(f"{farm}\n")
    return python


def _run(python: Path, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(python), *args], capture_output=True, text=True, timeout=600, cwd=cwd,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(Path.home()), "WANDB_MODE": "offline"})


def test_icepop_alone_registers_and_masks_through_verl(fresh_venv: Path) -> None:
    out = _run(fresh_venv, "-c", CHECK)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got == {"entry_points": ["icepop"], "plugins": ["icepop"], "registered": True,
                   "call_site_patched": True, "kept_frac": 0.5}


def test_ring_ext_plugins_lists_only_icepop(fresh_venv: Path) -> None:
    out = _run(fresh_venv, "-m", "ring_ext.cli", "plugins", "--json")
    assert out.returncode == 0, out.stderr[-3000:]
    assert [p["name"] for p in json.loads(out.stdout)] == ["icepop"]


def test_the_ring1t_loop_stops_before_ray_naming_the_missing_plugin(fresh_venv: Path, tmp_path: Path) -> None:
    out = _run(fresh_venv, "-m", "verl.trainer.main_ppo", "+recipe=ring1t", cwd=tmp_path)
    assert out.returncode != 0
    assert "comes with the plugin ring-ext-c3po, which is not installed: pip install ring-ext-c3po" in out.stderr
    assert "ray init kwargs" not in out.stdout + out.stderr  # stopped before verl's ray.init
