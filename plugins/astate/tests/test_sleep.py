"""The level-2 sleep rule (ring_ext_astate.sleep): which tensors a level-2 sleep would lose under the in-place sync,
and vLLM's GPU `Worker.sleep` lowered to level 1 where it would. No GPU: every tensor is counted as pooled where a
test says so (on a GPU the weights pool is what CuMem allocates; host tensors are never in it)."""

from __future__ import annotations

import logging

import pytest
import torch

from ring_ext_astate.sleep import lost_at_level2, lowered_sleep, on_device, sleep_level


def pooled(name: str, t: torch.Tensor) -> bool:
    return True  # as if every tensor lived in vLLM's weights pool on a GPU


class Layer(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(4, 3))
        self.register_buffer("cos_sin", torch.randn(8))


def test_parameters_buffers_and_their_views_are_kept() -> None:
    layer = Layer()
    layer.weight_t = layer.weight.data.t()  # a view of a parameter: the sync rewrites its bytes
    layer.half_cache = layer.cos_sin[:4]  # a view of a buffer: vLLM restores its bytes
    layer.empty = torch.empty(0)
    assert lost_at_level2(layer, pooled) == []


def test_a_tensor_derived_after_loading_is_lost() -> None:
    model = torch.nn.Sequential(Layer(), Layer())
    model[1].packed = model[1].weight.data * 2  # a kernel's own layout, computed from the weights: new storage
    model[0].scales = [torch.ones(2)]
    model[0].tables = {"a": torch.ones(3)}
    assert lost_at_level2(model, pooled) == ["0.scales[0]", "0.tables['a']", "1.packed"]
    assert lost_at_level2(model) == []  # host tensors: outside the weights pool (the default, `on_device`)
    assert not on_device("x", torch.ones(1))


def test_the_kv_cache_is_left_out() -> None:
    layer = Layer()
    cache = torch.zeros(2, 8)
    layer.kv_cache = cache[0]  # the attention's view of the worker's cache
    assert lost_at_level2(layer, pooled) == ["kv_cache"]
    assert lost_at_level2(layer, pooled, kv_caches=[cache]) == []


def test_the_level_is_lowered_only_when_level_2_would_lose_something() -> None:
    assert sleep_level(2, []) == 2
    assert sleep_level(2, ["1.packed"]) == 1
    assert sleep_level(1, ["1.packed"]) == 1


class Runner:
    def __init__(self, model: torch.nn.Module) -> None:
        self.model, self.kv_caches = model, []


def _worker(model: torch.nn.Module, engine: object) -> object:
    """Stands in for vLLM's GPU `Worker` (vllm/v1/worker/gpu_worker.py): the attributes the wrapper reads."""
    worker = type("Worker", (), {})()
    worker.model_runner, worker.weight_transfer_engine = Runner(model), engine
    return worker


def _astate_engine() -> object:
    vllm_engine = pytest.importorskip("ring_ext_astate.vllm_engine")
    return object.__new__(vllm_engine.AStateWeightTransferEngine)  # its class is what the wrapper checks


def test_vllms_sleep_is_lowered_on_an_astate_worker_that_would_lose_a_tensor(monkeypatch, caplog) -> None:
    import ring_ext_astate.sleep as sleep_mod

    monkeypatch.setattr(sleep_mod, "on_device", pooled)  # as if the model lived on a GPU
    calls = []
    sleep = lowered_sleep(lambda self, level: calls.append(level))
    model = Layer()
    model.packed = model.weight.data * 2
    worker = _worker(model, _astate_engine())
    with caplog.at_level(logging.WARNING, logger="ring_ext"):
        sleep(worker, level=2)
        sleep(worker, level=2)
    assert calls == [1, 1]
    assert [r.getMessage() for r in caplog.records if "sleeps at level 1" in r.getMessage()] == [
        "ring-ext astate: vLLM sleeps at level 1, not 2: level 2 would discard ['packed'], which no sync rewrites "
        "and vLLM does not restore (weights stay in host memory while asleep)"]  # said once
    sleep(_worker(Layer(), _astate_engine()), level=2)  # nothing to lose: verl's level stands
    sleep(_worker(model, None), level=2)  # verl's copy (no astate engine): not ring-ext's to change
    assert calls == [1, 1, 2, 2]
