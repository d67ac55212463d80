"""The GPU writer's copy, device-generic: the rollout worker pulls trainer-exported weights into its own parameters.
No verl, no vLLM.

Why the worker pulls (docs/astate.md, "GPU"): under vLLM's sleep mode its weights live in CuMem allocations, from
which legacy CUDA IPC handles cannot be exported (vLLM issue #45611), and whose physical pages a level-2 sleep
replaces at wake-up while their virtual addresses stay. The trainer's buffers are ordinary allocations: a trainer
rank exports them (`torch.multiprocessing.reductions.reduce_tensor`: a CUDA IPC handle on a GPU, shared memory on
CPU), the worker opens them once and copies each planned slice (`Plan`, `source_slice`: the same slices the
in-place sender writes) into its parameters.

A mapping holds for one pair of generations: the trainer rank's (its buffers moved: an offload and reload, a
reallocation) and the worker's wake-ups (its parameters re-resolved). A pull through a mapping made for another
pair is refused, naming which side moved: never a read of freed memory, never a write into replaced pages. The
commit check is the in-place sync's (`check_reports`): every planned byte written exactly once, by one rank.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch.multiprocessing.reductions import reduce_tensor

from ring_ext_astate.cuda_transport import open_handle
from ring_ext_astate.errors import SyncError
from ring_ext_astate.inplace import source_slice
from ring_ext_astate.kernel_layout import copy_words
from ring_ext_astate.plan import Plan, PlanError


@dataclass(frozen=True)
class Export:
    """One trainer rank's weights as the worker opens them: `generation` changes whenever its buffers may have
    moved, so a worker's mapping of an older generation is never read."""

    rank: int
    generation: int
    tensors: tuple[tuple[str, tuple], ...]  # (checkpoint name, reduce_tensor handle)


def export(rank: int, generation: int, weights: Iterable[tuple[str, torch.Tensor]]) -> Export:
    return Export(rank, generation, tuple((name, reduce_tensor(t.detach())) for name, t in weights))


def _param_bytes(name: str, p: torch.Tensor) -> torch.Tensor:
    if not p.is_contiguous():  # a reshape would copy: the writes would land in the copy
        raise PlanError(f"parameter {name!r} is not contiguous: the pull cannot write it in place")
    return p.detach().reshape(-1).view(torch.uint8)


@dataclass
class _Mapping:
    generation: int  # the trainer rank's
    wake: int  # the worker's
    sources: dict[str, torch.Tensor]


class Puller:
    """In the worker: arm once per (trainer generation, wake-up), pull at every sync."""

    def __init__(self, plan: Plan, params: Callable[[], Iterable[tuple[str, torch.nn.Parameter]]], rank: int = 0,
                 ignored: frozenset[str] = frozenset()) -> None:
        self.plan, self.params, self.rank, self.ignored = plan, params, rank, ignored
        self.wake = 0
        self._mappings: dict[int, _Mapping] = {}
        self._dest: dict[str, torch.Tensor] | None = None  # each parameter's bytes, resolved after each wake-up

    def woke_up(self) -> None:
        """The worker's weights were discarded and re-created (a level-2 sleep's wake-up): every mapping is stale."""
        self.wake += 1
        self._dest = None

    def arm(self, exp: Export) -> None:
        unknown = sorted({name for name, _ in exp.tensors} - set(self.plan.destinations) - self.ignored)
        if unknown:  # the plan would write them nowhere: refused, never dropped
            raise SyncError(f"rollout worker {self.rank}: trainer rank {exp.rank} exports {unknown[:5]}, which no "
                            "planned destination takes")
        if self._dest is None:
            self._dest = {name: _param_bytes(name, p) for name, p in self.params()}
        sources = {name: open_handle(h) for name, h in exp.tensors if name not in self.ignored}
        self._mappings[exp.rank] = _Mapping(exp.generation, self.wake, sources)

    def pull(self, rank: int, generation: int, version: int, verify: bool = False) -> dict:
        """Copy trainer rank `rank`'s slices (of its buffers' `generation`) in; returns the report `check_reports`
        reads. `verify` compares every written byte with its source (the audit of a first sync)."""
        m = self._mappings.get(rank)
        if m is None:
            raise SyncError(f"rollout worker {self.rank}: sync {version} pulls from trainer rank {rank}, whose "
                            "export was never armed")
        if m.generation != generation:
            raise SyncError(f"rollout worker {self.rank}: sync {version} is of trainer rank {rank}'s buffers "
                            f"generation {generation}, the mapping of generation {m.generation}: they moved, re-arm")
        if m.wake != self.wake:  # armed since the last wake-up means its parameters were resolved then
            raise SyncError(f"rollout worker {self.rank}: its mapping of trainer rank {rank} predates wake-up "
                            f"{self.wake} (the parameters were re-created): re-arm")
        ranges, dest = [], self._dest
        assert dest is not None  # arm resolved it after the last woke_up
        for name, t in m.sources.items():
            for d in self.plan.destinations[name]:
                lo = d.offset - self.plan.params[d.param][0]
                dst = dest[d.param][lo:lo + d.nbytes].view(getattr(torch, d.dtype)).view(d.shape)
                src = source_slice(name, t, d)
                copy_words(dst, src)
                if verify and not torch.equal(dst, src.to(dst.dtype)):
                    raise SyncError(f"rollout worker {self.rank}: {name!r} pulled into {d.param!r} differs from "
                                    f"trainer rank {rank}'s source")
                ranges.append((d.offset, d.offset + d.nbytes))
        return {"version": version, "sender": rank, "plan": self.plan.digest, "ranges": ranges, "digests": None}
