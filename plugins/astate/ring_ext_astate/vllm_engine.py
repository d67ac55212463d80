"""vLLM weight-transfer engine ``astate``: the rollout worker's end of the in-place sync (vLLM >= 0.29).

vLLM creates one per worker process when the engine runs with ``weight_transfer_config={"backend": "astate"}``
(registered by ring-ext-astate's ``vllm.general_plugins`` entry point) and reaches it through its worker methods
``init_weight_transfer_engine`` / ``start_weight_update`` / ``update_weights`` / ``finish_weight_update``.

init: move the worker's parameters into a shared-memory arena, then `bake`: drive vLLM's own ``load_weights`` over
placeholder checkpoint tensors (vLLM's sharded_rdt ``FakeRDTTensor``, with a sink of ours) and record where each
slice of each checkpoint tensor lands (fused qkv/gate_up, TP shards, tied embeddings) as a `Plan`; refuse what
cannot be written in place, by name. Then a control server hands arena and plan to senders proving the secret.
start: the parameters still live where the plan says (else nothing moves). update: wait for the senders' reports
and check them (coverage exactly once, plan digest, version, digests on verified syncs). finish: commit the version.
A failure raises from the RPC; the committed version stays where it was.
"""

from __future__ import annotations

import json
import logging
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from vllm.distributed.weight_transfer.base import WeightTransferEngine
from vllm.distributed.weight_transfer.sharded_rdt_fake import FakeRDTTensor

from ring_ext_astate.arena import Arenas, ParamArena
from ring_ext_astate.control import ControlServer, SyncError
from ring_ext_astate.inplace import Welcome, check_reports
from ring_ext_astate.plan import VIEW_OPS, Destination, Plan, PlanError

logger = logging.getLogger("ring_ext")

SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
                      "I64": torch.int64, "I32": torch.int32, "U8": torch.uint8, "BOOL": torch.bool}
# vLLM-CPU repacks these after loading (fused_moe/experts/cpu_moe.py): checkpoint-layout bytes would be wrong
REPACKED_MODULES = ("FusedMoE",)


def checkpoint_tensors(model_dir: str | Path) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Name -> (shape, dtype) of every tensor in a safetensors checkpoint, from the headers alone."""
    out = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        with f.open("rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for name, info in header.items():
            if name != "__metadata__":
                out[name] = (tuple(info["shape"]), SAFETENSORS_DTYPES[info["dtype"]])
    if not out:
        raise PlanError(f"no safetensors checkpoint under {model_dir}: astate records its plan from one")
    return out


class _RecordingSink:
    """``copy_`` sink: records each copy into the arena as a Destination, moves nothing."""

    def __init__(self, arena: ParamArena, param_at: dict[int, str]) -> None:
        self.base, self.param_at = arena.bytes.data_ptr(), param_at
        self.copies: list[tuple[str, Destination]] = []

    def accept_copy(self, dest: torch.Tensor, src: FakeRDTTensor) -> torch.Tensor:
        if dest.untyped_storage().data_ptr() != self.base:
            raise PlanError(f"{src._name!r}: the loader copies into a tensor outside the parameters")
        if dest.numel() != src.numel():
            raise PlanError(f"{src._name!r}: broadcasting copy of {src.numel()} into {dest.numel()} elements")
        bad = [op for op, _, _ in src._ops if op not in VIEW_OPS]
        if bad:
            raise PlanError(f"{src._name!r}: the loader applies {bad}, not a view")
        offset = dest.storage_offset() * dest.element_size()
        param = max(((o, n) for o, n in self.param_at.items() if o <= offset), default=(0, "?"))[1]
        self.copies.append((src._name, Destination(src._ops, offset, tuple(dest.shape), tuple(dest.stride()),
                                                   str(dest.dtype).removeprefix("torch."), param)))
        return dest


def bake(model: torch.nn.Module, arena: ParamArena, layout: dict[str, tuple[int, int]],
         checkpoint: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> tuple[Plan, frozenset[str], dict[str, str]]:
    """Record every checkpoint tensor's destinations by running vLLM's loaders over placeholders.

    Returns the plan, the names the loaders consume without writing, and the refused names with the reason.
    All names in one `load_weights` (loaders check tied names against the rest); if that raises, one name at a
    time, so that only the names whose loader does something other than a view are refused."""
    sink = _RecordingSink(arena, {o: n for n, (o, _) in layout.items()})
    fakes = [(n, FakeRDTTensor(n, torch.Size(shape), dtype, torch.device("cpu"), sink=sink))
             for n, (shape, dtype) in checkpoint.items()]
    refused: dict[str, str] = {}
    try:
        model.load_weights(fakes)
    except (PlanError, NotImplementedError):  # vLLM's fake raises NotImplementedError on non-view ops
        sink.copies.clear()
        for item in fakes:
            before = len(sink.copies)
            try:
                model.load_weights([item])
            except (PlanError, NotImplementedError, ValueError) as e:
                refused[item[0]] = str(e).splitlines()[0]
                del sink.copies[before:]
    destinations: dict[str, list[Destination]] = {}
    for name, d in sink.copies:
        destinations.setdefault(name, []).append(d)
    ignored = frozenset(checkpoint) - set(destinations) - set(refused)
    return Plan({n: tuple(ds) for n, ds in destinations.items()}, dict(layout)), ignored, refused


@dataclass
class AStateInitInfo:
    run_dir: str  # a 0700 directory the worker puts its descriptor and control socket into
    shadow: bool = False  # two arenas, commit by switching (see arena.Arenas)


@dataclass
class AStateUpdateInfo:
    version: int
    senders: int = 1
    verify: bool = True
    timeout_s: float = 120.0
    abort: bool = False  # a sender failed: end vLLM's session (its update_weights closes it on an error)


class AStateWeightTransferEngine(WeightTransferEngine[AStateInitInfo, AStateUpdateInfo]):
    init_info_cls = AStateInitInfo
    update_info_cls = AStateUpdateInfo
    supports_draft_weight_update = False

    def __init__(self, config: Any, vllm_config: Any, device: torch.device, model: torch.nn.Module) -> None:
        super().__init__(config, vllm_config, device, model)
        self.arenas: Arenas | None = None
        self.server: ControlServer | None = None
        self.version, self.open, self.checked = 0, None, None
        self.rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0

    def init_transfer_engine(self, init_info: AStateInitInfo) -> None:
        if self.server is not None:
            return  # a second init (a restarted trainer) keeps arena, plan and version
        repacked = sorted({n.rsplit(".", 1)[0] for n, m in self.model.named_modules()
                           if type(m).__name__ in REPACKED_MODULES})
        if repacked and self.device.type == "cpu":
            raise PlanError(f"rollout worker {self.rank}: vLLM-CPU repacks expert weights after loading "
                            f"({repacked[:3]}...): they cannot be written in place; sync this model without astate")
        self.arenas = Arenas(self.model.named_parameters(), init_info.shadow)
        layout = self.arenas.layout
        try:
            self.checkpoint = checkpoint_tensors(self.model_config.model)
            self.plan, self.ignored, refused = bake(self.model, self.arenas.all[0], layout, self.checkpoint)
            if refused:
                raise PlanError(f"rollout worker {self.rank}: vLLM's loaders transform {sorted(refused)}: "
                                f"{next(iter(refused.values()))}; they cannot be written in place")
            self.plan.check_covers()
        except BaseException:
            self.arenas.unlink()
            raise
        self.server = ControlServer(init_info.run_dir, self.rank, self._welcome, self._classify)
        logger.warning("ring-ext astate: rollout worker %d writes in place: %d checkpoint tensors -> %d parameters, "
                       "%.1f MiB, plan %s%s", self.rank, len(self.plan.destinations), len(layout),
                       self.plan.nbytes / 2**20, self.plan.digest, ", shadow arena" if init_info.shadow else "")

    def _welcome(self) -> Welcome:
        assert self.arenas is not None
        return Welcome(self.rank, tuple(a.name for a in self.arenas.all), self.arenas.all[0].size, self.plan,
                       self.ignored, self.version)

    def _classify(self, name: str, shape: tuple[int, ...], dtype: str) -> bool:
        """A name the checkpoint on disk lacks (a tied head the trainer still sends): True if vLLM ignores it."""
        if name in self.ignored:
            return True
        plan, ignored, refused = bake(self.model, self.arenas.all[0], self.plan.params,
                                      {**self.checkpoint, name: (shape, getattr(torch, dtype))})
        if name in ignored:
            self.ignored = self.ignored | {name}
            return True
        why = refused.get(name) or f"it lands in {[d.param for d in plan.destinations[name]]}, planned from others"
        raise PlanError(f"rollout worker {self.rank}: tensor {name!r} is not in the checkpoint the plan was recorded "
                        f"from and vLLM's loader would write it: {why}")

    def _params(self) -> list[tuple[str, torch.Tensor]]:
        return list(self.model.named_parameters())

    def start_weight_update(self) -> None:
        if self.server is None:
            raise SyncError("astate: start_weight_update before init_weight_transfer_engine")
        self.arenas.check_unmoved(self._params())
        self.open = self.version + 1
        self.server.drop_reports(self.open)

    def update_weights(self, update_info: dict[str, Any]) -> None:
        # the base class ends with torch.accelerator.synchronize(), which raises on CPU-only torch
        self.receive_weights(self.parse_update_info(update_info))
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def receive_weights(self, update_info: AStateUpdateInfo) -> None:
        if update_info.abort:
            self.open = None
            raise SyncError(f"rollout worker {self.rank}: sync {update_info.version} aborted by its sender")
        if self.open is None or update_info.version != self.open:
            raise SyncError(f"rollout worker {self.rank}: update for version {update_info.version}, the open sync is "
                            f"{self.open} (last committed {self.version})")
        reports = self.server.wait_reports(self.open, update_info.senders, update_info.timeout_s)
        check_reports(self.plan, reports, self.open, self.arenas.target(self.open).bytes, update_info.verify, self.rank)
        self.checked = self.open

    def finish_weight_update(self) -> None:
        if self.open is None or self.checked != self.open:
            raise SyncError(f"rollout worker {self.rank}: finish of sync {self.open} before its reports were checked")
        self.arenas.commit(self.open, self._params())  # shadow: the parameters now read the arena just written
        self.version, self.open = self.open, None

    def shutdown(self) -> None:
        if self.server is not None:
            self.server.close()
        if self.arenas is not None:
            self.arenas.unlink()
