"""A transpose of 4-byte words in 16 x 16 tiles, for writing a CPU kernel's blocked layout (vLLM-CPU's amx MoE
prepack: 16 rows interleaved, bf16 column pairs kept together, so each pair is one 4-byte word).

torch's strided copy into that order reaches about half of memcpy (each 64-byte destination line gathers one word
from each of 16 source rows, element by element). Sixteen row loads, an in-register transpose and sixteen line
stores (AVX-512) reach memcpy's speed (`benchmarks/bench_kernel_layout_copy.py`). The C source below is compiled
once per machine kind into a cache directory with the system's C compiler and loaded with ctypes: nothing to build
at install. Without a compiler, or on a CPU without AVX-512, the copy stays torch's (`status()` says which; the
sender logs it at its first kernel-layout write). No verl, no vLLM.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from ring_ext.tiny import default_cache_dir

logger = logging.getLogger("ring_ext")

SOURCE = r"""
#include <stdint.h>
#include <string.h>
#include <immintrin.h>

__attribute__((target("avx512f")))
static void tile16(const uint32_t *s, int64_t rs, uint32_t *d) {
    __m512i r[16], t[16];
    for (int i = 0; i < 16; i++) r[i] = _mm512_loadu_si512((const void *)(s + i * rs));
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {
        r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
        r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
        r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
        r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
    }
    for (int i = 0; i < 16; i += 8)
        for (int j = 0; j < 4; j++) {
            t[i + j] = _mm512_shuffle_i32x4(r[i + j], r[i + j + 4], 0x88);
            t[i + j + 4] = _mm512_shuffle_i32x4(r[i + j], r[i + j + 4], 0xdd);
        }
    for (int j = 0; j < 8; j++) {
        r[j] = _mm512_shuffle_i32x4(t[j], t[j + 8], 0x88);
        r[j + 8] = _mm512_shuffle_i32x4(t[j], t[j + 8], 0xdd);
    }
    for (int i = 0; i < 16; i++) _mm512_storeu_si512((void *)(d + i * 16), r[i]);
}

int ring_ext_has_avx512(void) { __builtin_cpu_init(); return __builtin_cpu_supports("avx512f"); }

/* dst (contiguous, [outer..., C, B]) = src ([outer..., C, B], C stride 1, B stride rs); outer dims in words.
   With compare: dst is left alone and 1 is returned where it already holds those words, else 0. */
int ring_ext_transpose_u32(const uint32_t *src, uint32_t *dst, int64_t C, int64_t B, int64_t rs, int64_t nd,
                           const int64_t *shape, const int64_t *stride, int compare) {
    uint32_t tile[256];
    int64_t total = 1;
    for (int64_t k = 0; k < nd; k++) total *= shape[k];
    for (int64_t o = 0; o < total; o++) {
        int64_t off = 0, rem = o;
        for (int64_t k = nd - 1; k >= 0; k--) { off += (rem % shape[k]) * stride[k]; rem /= shape[k]; }
        const uint32_t *s = src + off;
        uint32_t *d = dst + o * C * B;
        int64_t c0 = 0;
        if (B == 16)
            for (; c0 + 16 <= C; c0 += 16) {
                if (!compare) { tile16(s + c0, rs, d + c0 * 16); continue; }
                tile16(s + c0, rs, tile);
                if (memcmp(tile, d + c0 * 16, sizeof tile)) return 0;
            }
        for (int64_t r = 0; r < B; r++)
            for (int64_t c = c0; c < C; c++) {
                if (!compare) d[c * B + r] = s[r * rs + c];
                else if (d[c * B + r] != s[r * rs + c]) return 0;
            }
    }
    return 1;
}
"""


@functools.cache
def _library() -> tuple[ctypes.CDLL | None, str]:
    """(the compiled library, what serves the copy), said once per process (at its first blocked-layout write)."""
    lib, what = _load()
    logger.warning("ring-ext astate: kernel-layout words written by %s", what)  # the sync lines' level: shown
    return lib, what


def _load() -> tuple[ctypes.CDLL | None, str]:
    """Compiled once per source and machine kind into ring-ext's cache (`RING_EXT_CACHE`), then loaded from there."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return None, f"torch's strided copy ({platform.machine()}: the tile transpose is x86's AVX-512)"
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None, "torch's strided copy (no C compiler: set CC or install gcc for the AVX-512 tile transpose)"
    key = hashlib.sha256(f"{SOURCE}{platform.machine()}".encode()).hexdigest()[:16]
    lib = default_cache_dir() / f"word_transpose_{key}.so"  # beside the tiny default
    try:
        if not lib.exists():
            lib.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            with tempfile.TemporaryDirectory(dir=lib.parent) as tmp:  # compiled aside, then renamed: processes race
                src, out = Path(tmp) / "t.c", Path(tmp) / "t.so"
                src.write_text(SOURCE)
                done = subprocess.run([cc, "-O3", "-shared", "-fPIC", "-o", str(out), str(src)], capture_output=True,
                                      text=True, timeout=120)
                if done.returncode:
                    return None, f"torch's strided copy ({cc} failed: {done.stderr.strip()[:200]})"
                os.replace(out, lib)
        handle = ctypes.CDLL(str(lib))
    except (OSError, subprocess.TimeoutExpired) as e:  # an unwritable cache, a compiler that hangs, a bad library
        return None, f"torch's strided copy (building {lib} failed: {e})"
    if not handle.ring_ext_has_avx512():
        return None, "torch's strided copy (this CPU has no AVX-512)"
    handle.ring_ext_transpose_u32.argtypes = [ctypes.c_void_p, ctypes.c_void_p] + [ctypes.c_int64] * 4 + [
        ctypes.POINTER(ctypes.c_int64)] * 2 + [ctypes.c_int]
    return handle, f"the AVX-512 tile transpose ({lib})"


def status() -> str:
    """What writes a 16-row blocked layout of 4-byte words on this machine."""
    return _library()[1]


def transpose_words(dst: torch.Tensor, src: torch.Tensor) -> bool:
    """`dst.copy_(src)` where dst is contiguous [..., C, 16] int32 and src the same shape with its C axis contiguous
    (a row block's words read row by row); False, copying nothing, for anything else or without the library."""
    return _run(dst, src, compare=False) is not None


def equal_transposed(dst: torch.Tensor, src: torch.Tensor) -> bool | None:
    """Whether dst holds src's words (shapes as `transpose_words`), compared tile by tile in cache without a
    contiguous copy of src; None where the tile transpose does not apply."""
    return _run(dst, src, compare=True)


def _run(dst: torch.Tensor, src: torch.Tensor, compare: bool) -> bool | None:
    while dst.dim() > 2 and dst.shape[-1] == 1:  # a column group's trailing unit dim (the word holds the pair)
        dst, src = dst.squeeze(-1), src.squeeze(-1)
    if (dst.dtype != torch.int32 or src.dtype != torch.int32 or dst.device.type != "cpu"
            or src.device.type != "cpu" or dst.dim() < 2 or dst.shape != src.shape or dst.shape[-1] != 16
            or not dst.is_contiguous() or src.stride(-2) != 1 or dst.numel() == 0):
        return None
    lib = _library()[0]
    if lib is None:
        return None
    outer = tuple(dst.shape[:-2])
    shape, stride = _outer(outer, tuple(src.stride()[:-2]))
    return bool(lib.ring_ext_transpose_u32(src.data_ptr(), dst.data_ptr(), dst.shape[-2], 16, src.stride(-1),
                                           len(outer), shape, stride, int(compare)))


@functools.lru_cache(maxsize=4096)
def _outer(shape: tuple[int, ...], stride: tuple[int, ...]) -> tuple[ctypes.Array, ctypes.Array]:
    """The outer dims as C arrays (made once per layout: every sync writes the same ones)."""
    return (ctypes.c_int64 * max(1, len(shape)))(*shape), (ctypes.c_int64 * max(1, len(stride)))(*stride)
