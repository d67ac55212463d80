"""A kernel's weight layout planned into (kernel_layout): probe, match, destinations rewritten, the wider-word copy.

The probed steps are a known blocked permutation, arithmetic, a shuffle, and vLLM-CPU's own MoE prepack
(`cpu_prepack_moe_weight`, the real op, on each ISA this CPU runs); `test_moe_reload.py` syncs a live engine through
the rewritten plan.
"""

from __future__ import annotations

import pytest
import torch

from ring_ext_astate.kernel_layout import Blocked, copy_words, equal_bytes, into_layout, match, probe
from ring_ext_astate.plan import Destination, replay

SHAPE = (2, 64, 96)  # two experts of 64 rows, 96 columns


def _perm(step, shape=SHAPE, dtype=torch.bfloat16):
    return probe(lambda codes: {n: step(c) for n, c in codes.items()}, {"w": (shape, dtype)})["w"]


@pytest.mark.parametrize("layout", [Blocked(16, 2), Blocked(16, 1), Blocked(32, 4)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_blocked_step_is_probed_and_named(layout: Blocked, dtype: torch.dtype) -> None:
    perm = _perm(lambda c: layout.apply(c).contiguous().view(c.shape), dtype=dtype)
    assert perm is not None and not torch.equal(perm, torch.arange(perm.numel()))
    assert match(perm, SHAPE) == layout


def test_a_step_that_computes_or_shuffles_has_no_layout() -> None:
    assert _perm(lambda c: c + 1) is None  # arithmetic: the codes do not come back as a permutation
    assert _perm(lambda c: c.reshape(-1)) is None  # another shape
    assert _perm(lambda c: c.to(torch.float16)) is None  # a cast
    g = torch.Generator().manual_seed(0)
    shuffle = torch.randperm(torch.Size(SHAPE).numel(), generator=g)
    perm = _perm(lambda c: c.reshape(-1)[shuffle].view(c.shape))
    assert torch.equal(perm, shuffle)  # recovered exactly ...
    assert match(perm, SHAPE) is None  # ... but no blocked layout is that order
    dup = torch.arange(torch.Size(SHAPE).numel())
    dup[1] = 0  # element 0 twice, element 1 lost: a gather, not a permutation
    assert _perm(lambda c: c.reshape(-1)[dup].view(c.shape)) is None
    assert probe(lambda codes: codes, {"w": (SHAPE, torch.uint8)}) == {"w": None}  # no 16-bit integer twin


def _isas() -> list[str]:
    return ["vec", "amx"] if torch.cpu._is_amx_tile_supported() else ["vec"]


@pytest.mark.parametrize("isa", _isas())
def test_vllm_cpus_moe_prepack_is_the_layout_it_is_matched_to(isa: str) -> None:
    from vllm._custom_ops import cpu_prepack_moe_weight

    layout = match(_perm(lambda c: cpu_prepack_moe_weight(c, isa)), SHAPE)
    assert layout == (Blocked(16, 2) if isa == "amx" else Blocked(16, 1))
    w = torch.randn(SHAPE).to(torch.bfloat16)
    assert torch.equal(layout.apply(w).contiguous().view(SHAPE), cpu_prepack_moe_weight(w, isa))


def _dest(rows: slice, k: int = 96) -> Destination:
    """Checkpoint rows `rows` of the stack (a gate or up projection of one expert) at the parameter's offset 0."""
    n = rows.stop - rows.start
    return Destination((("narrow", (0, rows.start, n), ()),), rows.start * k * 2, (n, k), (k, 1), "bfloat16", "w13")


def test_destinations_of_whole_row_blocks_are_written_in_the_kernels_order() -> None:
    layout, full = Blocked(16, 2), torch.randn(128, 96).to(torch.bfloat16)  # both experts' rows, flat
    kernel = layout.apply(full).contiguous().view(-1)  # the bytes the kernel reads
    arena = torch.zeros_like(kernel)
    for rows in (slice(0, 32), slice(32, 64), slice(64, 128)):  # gate of expert 0, up of expert 0, all of expert 1
        d = into_layout(_dest(rows), 0, SHAPE, layout)
        assert d is not None and d.is_contiguous() and d.offset == _dest(rows).offset and d.nbytes == _dest(rows).nbytes
        dst = arena[d.offset // 2:(d.offset + d.nbytes) // 2].view(d.shape)
        copy_words(dst, replay(full, d.ops))
    assert torch.equal(arena, kernel)  # every byte where the kernel reads it
    assert into_layout(_dest(slice(8, 40)), 0, SHAPE, layout) is None  # starts inside a row block
    assert into_layout(_dest(slice(0, 24)), 0, SHAPE, layout) is None  # ends inside one


def test_copy_words_moves_column_groups_as_one_word_and_casts_like_copy() -> None:
    src = Blocked(16, 2).apply(torch.randn(64, 96).to(torch.bfloat16))
    dst = torch.empty(src.shape, dtype=torch.bfloat16)
    copy_words(dst, src)
    assert torch.equal(dst, src)
    wide = torch.empty(src.shape, dtype=torch.float32)
    copy_words(wide, src)  # another dtype: element by element, cast as copy_ would
    assert torch.equal(wide, src.float())
    odd = torch.randn(7, 3).to(torch.bfloat16)  # a run of 6 bytes has no word: plain copy
    out = torch.empty_like(odd)
    copy_words(out, odd)
    assert torch.equal(out, odd)


def test_equal_bytes_compares_bits_of_a_strided_source() -> None:
    src = Blocked(16, 2).apply(torch.randn(64, 96).to(torch.bfloat16))
    dst = src.contiguous()
    assert equal_bytes(dst, src)
    dst[1, 2, 3, 1] = -dst[1, 2, 3, 1]
    assert not equal_bytes(dst, src)  # one element of 6,144 flipped
    zeros = torch.zeros(4, 2, dtype=torch.bfloat16)
    assert not equal_bytes(zeros, -zeros)  # -0 == +0 in value, not in bits
    nan = torch.full((4, 2), float("nan"), dtype=torch.bfloat16)
    assert equal_bytes(nan, nan.clone())  # NaN != NaN in value, the same bits
    assert not equal_bytes(dst.float(), src)  # another dtype is never byte-equal


class _Prepack:
    """A stand-in for a vLLM-CPU experts kernel (its `process_weights_after_loading`): a blocked prepack of `w` and,
    with `derive`, a scale computed from the weights, as a quantized kernel's step would."""

    def __init__(self, derive: bool) -> None:
        self.derive = derive

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        w = layer.w.data
        layer.w = torch.nn.Parameter(Blocked(16, 2).apply(w).contiguous().view(w.shape), requires_grad=False)
        if self.derive:
            self.scale = w.float().abs().amax()


@pytest.mark.parametrize("derive", [False, True])
def test_a_step_that_also_derives_state_keeps_the_repack_and_its_state(derive: bool) -> None:
    """`Repack.into_kernel_layout` (vllm_engine) with the stand-in kernel: a step that only rearranges is planned in
    its layout; one that also derives state from the weights (here from the probe's index codes) gets that state put
    back and stays rearranged after each sync, with real weights."""
    from ring_ext_astate.plan import Plan
    from ring_ext_astate.vllm_engine import Repack

    layer = torch.nn.Module()
    layer.w = torch.nn.Parameter(torch.randn(SHAPE).to(torch.bfloat16), requires_grad=False)
    param, kernel = layer.w, _Prepack(derive)
    nbytes = layer.w.numel() * 2
    plan = Plan({"ckpt.w": (Destination((), 0, SHAPE, (64 * 96, 96, 1), "bfloat16", "moe.w"),)},
                {"moe.w": (0, nbytes)})
    repack = Repack.__new__(Repack)  # its __init__ finds vLLM's MoE layers in a model; here the one layer given
    repack.layers, repack.layout, repack.direct = [("moe", layer, kernel)], {"moe.w": (0, nbytes)}, {}
    out = repack.into_kernel_layout(plan)
    assert layer.w is param and "scale" not in vars(kernel)  # the layer's own parameter, no state from the codes
    if derive:
        assert out is plan and len(repack.layers) == 1 and repack.direct == {}
    else:
        (d,) = out.destinations["ckpt.w"]
        assert repack.layers == [] and repack.direct == {"moe": "w 16x2"} and d.shape == (8, 48, 16, 2)
