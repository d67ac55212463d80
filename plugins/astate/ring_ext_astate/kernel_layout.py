"""A kernel's own weight layout, planned into: the in-place sync writes it directly instead of re-running the kernel's
rearrangement after each sync. No verl, no vLLM: torch only.

vLLM-CPU's MoE experts prepack each expert stack after loading (`cpu_prepack_moe_weight`: same shape, other order).
Probed with index-coded tensors, the prepack is a blocked permutation of the stack's rows: `rows` consecutive rows are
interleaved, `pack` consecutive columns kept together (amx on bf16: 16 rows, pairs of columns; vec: 16 rows, single
columns). `probe` recovers any kernel step's permutation from the step itself and `match` names the blocked layout
that equals it, or None. A destination that covers whole row blocks of a stack then becomes the same bytes in the
kernel's order (`into_layout`): the sender's slice gains a reshape and a permute, and one copy writes it. A kernel whose
step is not a blocked permutation (it computes, pads or reshapes) keeps the rearrangement after each sync.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from ring_ext_astate.plan import Destination, replay
from ring_ext_astate.word_transpose import equal_transposed, transpose_words

CODES = {2: torch.int16, 4: torch.int32}  # a parameter's bytes carry an index code in a same-width integer
WORDS = {2: torch.int16, 4: torch.int32, 8: torch.int64}


@dataclass(frozen=True)
class Blocked:
    """Rows [r*rows, (r+1)*rows) of a (n, k) stack stored as (k/pack, rows, pack): the row block's columns in groups
    of `pack`, the block's rows interleaved within each group."""

    rows: int
    pack: int

    def fits(self, n: int, k: int) -> bool:
        return n % self.rows == 0 and k % self.pack == 0

    def shape(self, n: int, k: int) -> tuple[int, ...]:
        return (n // self.rows, k // self.pack, self.rows, self.pack)

    def ops(self, n: int, k: int) -> tuple:
        """The view ops that turn a row-major (n, k) slice into this layout's order (replayed by the sender)."""
        return (("reshape", ((n // self.rows, self.rows, k // self.pack, self.pack),), ()),
                ("permute", ((0, 2, 1, 3),), ()))

    def apply(self, t: torch.Tensor) -> torch.Tensor:
        """`t` (..., k) row-major, in this layout's order (a view; `.contiguous()` makes the kernel's bytes)."""
        return replay(t, self.ops(t.numel() // t.shape[-1], t.shape[-1]))


CANDIDATES = tuple(Blocked(r, p) for r in (1, 4, 8, 16, 32, 64) for p in (1, 2, 4))


def probe(step: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]],
          specs: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> dict[str, torch.Tensor | None]:
    """The permutation `step` applies to each named tensor of (shape, dtype): out.flatten()[i] = src.flatten()[perm[i]].

    `step` gets all the tensors at once (a layer's step rearranges all of them). Each element's index is written
    into its bytes, 16 bits per pass for 2-byte dtypes (two passes); None for a tensor the step does not move
    unchanged (a cast, arithmetic, another shape), whose dtype has no integer twin, or of 2**31 elements or more
    (the probe holds three int64 copies of each index: such a stack keeps the rearrangement after each sync)."""
    sizes = {n: torch.empty((), dtype=dt).element_size() for n, (_, dt) in specs.items()}
    perms: dict[str, torch.Tensor | None] = {
        n: torch.zeros(math.prod(shape), dtype=torch.int64) if sizes[n] in CODES and math.prod(shape) < 2**31 else None
        for n, (shape, _) in specs.items()}
    idx = {n: torch.arange(math.prod(shape), dtype=torch.int64) for n, (shape, _) in specs.items()}
    for shift in (0, 16):  # a 4-byte code carries the whole index in the first pass (the second repeats it)
        codes = {n: _code(idx[n], shift if sizes[n] == 2 else 0, sizes[n]).view(dt).view(shape)
                 if sizes[n] in CODES else torch.zeros(shape, dtype=dt) for n, (shape, dt) in specs.items()}
        out = step(codes)
        for n, (shape, dt) in specs.items():
            if perms[n] is None or (sizes[n] == 4 and shift):
                continue
            if tuple(out[n].shape) != tuple(shape) or out[n].dtype != dt:
                perms[n] = None
                continue
            mask = (1 << 8 * sizes[n]) - 1
            perms[n] |= (out[n].contiguous().view(CODES[sizes[n]]).reshape(-1).to(torch.int64) & mask) << shift
    for n, perm in perms.items():
        if perm is not None and not _is_permutation(perm):
            perms[n] = None
    return perms


def _code(idx: torch.Tensor, shift: int, size: int) -> torch.Tensor:
    """Bits [shift, shift + 8 * size) of each index, in the integer twin of a `size`-byte dtype."""
    return ((idx >> shift) & ((1 << 8 * size) - 1)).to(CODES[size])


def _is_permutation(perm: torch.Tensor) -> bool:
    """Every index in [0, n) exactly once (O(n): a sort of a large stack's indices costs seconds)."""
    if perm.numel() == 0:
        return True
    if int(perm.min()) < 0 or int(perm.max()) >= perm.numel():
        return False
    seen = torch.zeros(perm.numel(), dtype=torch.bool)
    seen[perm] = True
    return bool(seen.all())


def match(perm: torch.Tensor, shape: tuple[int, ...]) -> Blocked | None:
    """The blocked layout whose order is `perm` over a stack of `shape` (rows = all leading dims), or None."""
    k = shape[-1]
    n = math.prod(shape) // k
    idx = torch.arange(n * k, dtype=torch.int64).view(n, k)
    for layout in CANDIDATES:
        if not layout.fits(n, k) or (layout.rows == 1 and layout.pack == 1):
            continue
        head = layout.rows * k  # the first row block decides most candidates without a pass over the stack
        if torch.equal(layout.apply(idx[:layout.rows]).reshape(-1), perm[:head]) and \
                torch.equal(layout.apply(idx).reshape(-1), perm):
            return layout
    return None


def into_layout(d: Destination, param_offset: int, param_shape: tuple[int, ...], layout: Blocked) -> Destination | None:
    """Destination `d` (contiguous, inside a parameter of `param_shape` at `param_offset`) in the kernel's layout: the
    same bytes, written in the kernel's order. None where `d` does not cover whole row blocks."""
    k = param_shape[-1]
    first, count = (d.offset - param_offset) // d.itemsize, d.nbytes // d.itemsize
    if (d.offset - param_offset) % d.itemsize or first % k or count % k or not d.is_contiguous():
        return None
    row, rows = first // k, count // k
    if row % layout.rows or not layout.fits(rows, k):
        return None
    shape = layout.shape(rows, k)
    stride = tuple(math.prod(shape[i + 1:]) for i in range(len(shape)))
    return replace(d, ops=d.ops + layout.ops(rows, k), shape=shape, stride=stride)


def copy_words(dst: torch.Tensor, src: torch.Tensor) -> None:
    """`dst.copy_(src)`; where both end in a short contiguous run of one dtype (a blocked layout's column groups),
    the run moves as one wider word: torch's strided copy costs per element, so bf16 pairs copy 3x faster; 16-row
    blocks of 4-byte words go through the tile transpose where it is built (`word_transpose`: 2x faster again)."""
    if src.dtype == dst.dtype:
        dst, src = _words(dst, src)
        if transpose_words(dst, src):
            return
    dst.copy_(src)


def equal_bytes(dst: torch.Tensor, src: torch.Tensor) -> bool:
    """Same dtype and the same bits, element by element (a strided source needs no contiguous copy to be hashed;
    bitwise, so a NaN equals itself and -0 differs from +0, as hashed bytes would). A 16-row block of words is
    compared by the tile transpose where it is built (no strided compare, no copy of src)."""
    if src.dtype != dst.dtype or src.shape != dst.shape:
        return False
    words = _words(dst, src)
    same = equal_transposed(*words)
    return torch.equal(*words) if same is None else same


def _words(dst: torch.Tensor, src: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`dst` and `src` (one dtype) as integers: the trailing run as one word where both have it contiguous and a word
    that wide exists, else element by element."""
    size = dst.element_size()
    if dst.dim() and src.stride(-1) == 1 and dst.stride(-1) == 1 and dst.shape[-1] * size in WORDS:
        try:
            return dst.view(WORDS[dst.shape[-1] * size]), src.view(WORDS[dst.shape[-1] * size])
        except RuntimeError:  # an offset or stride the wider word does not divide
            pass
    word = WORDS.get(size, torch.uint8)
    return (dst.view(word), src.view(word)) if size in WORDS else (dst, src)
