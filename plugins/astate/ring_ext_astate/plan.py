"""Where every checkpoint tensor lands in one rollout worker's parameter memory: the in-place sync's plan.

No verl, no vLLM: torch only. A `Destination` says how a sender turns its full checkpoint tensor into the slice a
worker needs (`ops`, the view ops vLLM's own weight loader applied: a TP `narrow`, a fused-qkv `narrow` of the
destination) and where those bytes go (a byte offset into the worker's parameter arena, shape, stride, dtype).
`vllm_engine.bake` records the destinations by driving vLLM's loaders over placeholder tensors; this module checks
them (`Plan.check_covers`: every parameter byte is the destination of exactly one slice) and replays them
(`replay`). A sync is proven complete by `merge_exactly_once` over the byte ranges the senders report.
"""

from __future__ import annotations

import hashlib
import math
import pickle
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch

OpSpec = tuple[str, tuple[Any, ...], tuple[tuple[str, Any], ...]]  # vLLM's op chain format (sharded_rdt_fake)
# only views: a chain that would compute new values (a cast, arithmetic) is refused when it is recorded
VIEW_OPS = frozenset({"narrow", "view", "reshape", "__getitem__", "squeeze", "unsqueeze", "transpose", "t",
                      "permute", "flatten", "contiguous", "chunk", "unbind", "split"})


class PlanError(ValueError):
    """The recorded destinations cannot be written in place (the message names the tensor or parameter)."""


@dataclass(frozen=True)
class Destination:
    ops: tuple[OpSpec, ...]  # applied to the sender's full checkpoint tensor
    offset: int  # bytes from the arena's start
    shape: tuple[int, ...]
    stride: tuple[int, ...]  # in elements, of the destination view
    dtype: str  # the parameter's dtype (a sender's slice is cast on the copy, as vLLM's loader would)
    param: str  # for error messages

    @property
    def itemsize(self) -> int:
        return getattr(torch, self.dtype).itemsize

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.itemsize

    def is_contiguous(self) -> bool:
        expected, step = [], 1
        for size in reversed(self.shape):
            expected.append(step)
            step *= size
        return all(s == e for s, e, n in zip(self.stride, reversed(expected), self.shape) if n > 1)


@dataclass(frozen=True)
class Plan:
    """One worker's destinations by checkpoint name, plus its parameters' byte ranges in the arena."""

    destinations: dict[str, tuple[Destination, ...]]
    params: dict[str, tuple[int, int]]  # name -> (offset, nbytes) in the arena

    @cached_property  # every report carries it; a plan is never changed, only replaced
    def digest(self) -> str:
        """Same plan, same digest: senders and the worker compare it before any byte lands."""
        body = pickle.dumps((sorted(self.destinations.items()), sorted(self.params.items())), protocol=4)
        return hashlib.sha256(body).hexdigest()[:16]

    @cached_property
    def nbytes(self) -> int:
        return sum(d.nbytes for ds in self.destinations.values() for d in ds)

    def share(self, rank: int, world: int) -> frozenset[tuple[str, int]]:
        """The destinations (checkpoint name, index) that sender `rank` of `world` writes when several trainer ranks
        write one worker: each destination to exactly one rank, largest first to the least-loaded rank, so every
        rank derives the same split from the plan alone and their bytes differ by at most the largest destination.
        Split once per world size (a sort of every destination; each sync asks again)."""
        if not 0 <= rank < world:
            raise ValueError(f"sender rank {rank} outside a world of {world}")
        return self._split(world)[rank]

    def _split(self, world: int) -> tuple[frozenset[tuple[str, int]], ...]:
        cache = self.__dict__.setdefault("_splits", {})  # frozen: the cache lives beside the cached properties
        if world not in cache:
            load, shares = [0] * world, [set() for _ in range(world)]
            order = sorted(((d.nbytes, n, i) for n, ds in self.destinations.items() for i, d in enumerate(ds)),
                           key=lambda x: (-x[0], x[1], x[2]))
            for nbytes, name, i in order:
                r = min(range(world), key=lambda k: (load[k], k))
                load[r] += nbytes
                shares[r].add((name, i))
            cache[world] = tuple(frozenset(s) for s in shares)
        return cache[world]

    def check_covers(self) -> None:
        """Every destination is contiguous, and the destinations tile the parameters: each byte exactly once."""
        for name, ds in self.destinations.items():
            for d in ds:
                if not d.is_contiguous():
                    raise PlanError(f"{name!r} lands in {d.param!r} through a strided view {d.stride} of {d.shape}: "
                                    "only contiguous destinations are written in place")
        ranges = [(d.offset, d.offset + d.nbytes, f"{n} -> {d.param}") for n, ds in self.destinations.items()
                  for d in ds]
        covered = merge_exactly_once(ranges)
        wanted = merge_exactly_once([(o, o + n, p) for p, (o, n) in self.params.items() if n])
        if covered != wanted:
            missing = [p for p, (o, n) in self.params.items()
                       if n and not any(a <= o and o + n <= b for a, b in covered)]
            raise PlanError(f"the recorded destinations do not cover the parameters {missing or '(partially)'}: "
                            "a loader wrote them some other way, so they cannot be written in place")


def merge_exactly_once(ranges: Iterable[tuple[int, int, str]]) -> list[tuple[int, int]]:
    """Merge byte ranges [a, b) into disjoint runs; raise naming both owners where two ranges overlap."""
    runs: list[tuple[int, int]] = []
    last_end, last_who = -1, ""
    for a, b, who in sorted(ranges):
        if a < last_end:
            raise PlanError(f"bytes [{a}, {min(b, last_end)}) written twice: by {last_who} and by {who}")
        if runs and runs[-1][1] == a:
            runs[-1] = (runs[-1][0], b)
        elif b > a:
            runs.append((a, b))
        last_end, last_who = max(last_end, b), who
    return runs


def replay(t: torch.Tensor, ops: tuple[OpSpec, ...]) -> torch.Tensor:
    """Apply a recorded chain of view ops to the sender's tensor (on its own device: only the slice moves)."""
    for op, args, kwargs in ops:
        if op not in VIEW_OPS:
            raise PlanError(f"op {op!r} in a recorded chain is not a view")
        t = t[args[0]] if op == "__getitem__" else getattr(t, op)(*args, **dict(kwargs))
    return t
