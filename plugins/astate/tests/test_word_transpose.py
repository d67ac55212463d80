"""The AVX-512 tile transpose that writes 16-row blocked layouts of 4-byte words (word_transpose), against torch's
own copy of the same views: whole tiles, a tail, a TP slice's strided rows, strided experts; what it declines; the
fallback without a compiler. The real kernel layout it serves is vLLM-CPU's amx MoE prepack (test_kernel_layout.py
checks those bytes through `copy_words`)."""

from __future__ import annotations

import platform
from pathlib import Path

import pytest
import torch

from ring_ext_astate import word_transpose
from ring_ext_astate.kernel_layout import Blocked, copy_words

AVX512 = platform.machine() == "x86_64" and " avx512f " in Path("/proc/cpuinfo").read_text().replace("\n", " ")


def _words(rows: int, cols: int, experts: int = 2) -> torch.Tensor:
    return torch.randint(-2**31, 2**31 - 1, (experts, rows, cols), dtype=torch.int32,
                         generator=torch.Generator().manual_seed(rows * cols))


@pytest.mark.skipif(not AVX512, reason="the tile transpose is AVX-512's; elsewhere torch's copy serves")
def test_this_machine_builds_the_tile_transpose() -> None:
    assert word_transpose.status().startswith("the AVX-512 tile transpose")


@pytest.mark.skipif(not AVX512, reason="the tile transpose is AVX-512's")
@pytest.mark.parametrize("cols", [64, 40, 16, 3])  # whole tiles; two and a tail of 8; one; a tail only
def test_blocks_of_16_rows_equal_torchs_copy(cols: int) -> None:
    src = _words(64, cols).view(2, 4, 16, cols).transpose(-1, -2)  # [expert, block, column, row]: a row block's words
    dst = torch.full(src.shape, -1, dtype=torch.int32)
    assert word_transpose.transpose_words(dst, src)
    assert torch.equal(dst, src.contiguous())


@pytest.mark.skipif(not AVX512, reason="the tile transpose is AVX-512's")
def test_a_tp_slices_rows_and_strided_experts_are_read_where_they_lie() -> None:
    full = _words(32, 96, experts=4)
    src = full[::2, :, 8:56].reshape(2, 2, 16, 48).transpose(-1, -2)  # every other expert, columns 8..56 of 96
    dst = torch.empty(src.shape, dtype=torch.int32)
    assert src.stride(-1) == 96 and word_transpose.transpose_words(dst, src)
    assert torch.equal(dst, src.contiguous())


@pytest.mark.skipif(not AVX512, reason="the tile transpose is AVX-512's")
@pytest.mark.parametrize("where", [(1, 2, 5, 9), (1, 3, 35, 15)])  # inside a whole tile; in the tail of 8 columns
def test_the_compare_finds_one_changed_word_without_copying_the_source(where: tuple[int, ...]) -> None:
    src = _words(64, 40).view(2, 4, 16, 40).transpose(-1, -2)
    dst = src.contiguous()
    assert word_transpose.equal_transposed(dst, src) is True
    dst[where] ^= 1  # one bit of one word
    assert word_transpose.equal_transposed(dst, src) is False
    assert word_transpose.equal_transposed(dst.view(torch.int16), src.contiguous().view(torch.int16)) is None


def test_what_is_not_a_16_row_block_of_words_is_declined_and_left_alone() -> None:
    src = _words(64, 32).view(2, 8, 8, 32).transpose(-1, -2)  # 8-row blocks
    dst = torch.zeros(src.shape, dtype=torch.int32)
    assert not word_transpose.transpose_words(dst, src) and not dst.any()
    halves = torch.zeros(16, 4, dtype=torch.int16).t()  # 2-byte words (the vec layout's single columns)
    assert not word_transpose.transpose_words(torch.zeros(4, 16, dtype=torch.int16), halves)
    rows = _words(16, 32)[0]  # the source's columns strided: not a row block read row by row
    assert not word_transpose.transpose_words(torch.zeros(16, 32, dtype=torch.int32), rows.t().contiguous().t())


@pytest.mark.parametrize("broken", ["compiler", "cache"])
def test_without_a_compiler_torchs_copy_writes_the_same_bytes(broken: str, monkeypatch: pytest.MonkeyPatch,
                                                              tmp_path: Path) -> None:
    if broken == "compiler":
        monkeypatch.setenv("CC", "/bin/false")
        monkeypatch.setenv("RING_EXT_CACHE", str(tmp_path))  # nothing cached: the compiler is asked
    else:
        (tmp_path / "file").write_text("")
        monkeypatch.setenv("RING_EXT_CACHE", str(tmp_path / "file" / "cache"))  # a cache that cannot be made
    word_transpose._library.cache_clear()
    try:
        assert word_transpose.status().startswith("torch's strided copy")
        assert "failed" in word_transpose.status() or platform.machine() != "x86_64"  # elsewhere: not x86, said
        src = Blocked(16, 2).apply(torch.randn(64, 96).to(torch.bfloat16))
        dst = torch.empty(src.shape, dtype=torch.bfloat16)
        copy_words(dst, src)
        assert torch.equal(dst, src) and not list(tmp_path.glob("*.so"))
    finally:
        word_transpose._library.cache_clear()
