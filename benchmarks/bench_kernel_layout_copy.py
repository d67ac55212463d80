"""One expert stack into vLLM-CPU's prepacked layout, by each way the in-place sync could: one script, one thread.

Reproduce: `python benchmarks/bench_kernel_layout_copy.py [--shape 8 2048 1024] [--repeats 5]` (vllm-cpu; seconds).
For a seeded bf16 stack of `--shape` (experts, rows, columns), best of `--repeats` of:
- memcpy: `dst.copy_(src)`, checkpoint layout (what a dense parameter costs);
- words: the sync's write into the kernel's layout (`kernel_layout.copy_words` of the `Blocked.apply` view: each
  column group moved as one word, 16 x 16 words at a time by the AVX-512 tile transpose where `word_transpose` built
  it; the JSON's `transpose` says which);
- words_torch: the same words moved by torch's strided `copy_` (the write without the tile transpose);
- elements: the same write element by element (torch's strided `copy_` of bf16);
- prepack: vLLM-CPU's own `cpu_prepack_moe_weight` (what the rearranging path runs in the worker after each sync, plus
  a copy back);
- compare / compare_torch: a verified sync's check that the written layout holds the source's bits
  (`kernel_layout.equal_bytes`: tile by tile where the transpose is built), and torch's strided compare of the words.
Every way's result is checked against the prepack's bytes. Writes kernel_layout_copy.json to `--out`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def best_gbps(fn, nbytes: int, repeats: int) -> float:
    fn()
    best = min(_timed(fn) for _ in range(repeats))
    return nbytes / best / 1e9


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    from vllm._custom_ops import cpu_prepack_moe_weight

    from ring_ext_astate import word_transpose
    from ring_ext_astate.kernel_layout import _words, copy_words, equal_bytes, match, probe

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", type=int, nargs=3, default=[8, 2048, 1024], help="experts, rows, columns")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    torch.set_num_threads(1)
    shape = tuple(args.shape)
    isa = "amx" if torch.cpu._is_amx_tile_supported() else "vec"
    perm = probe(lambda codes: {"w": cpu_prepack_moe_weight(codes["w"], isa)}, {"w": (shape, torch.bfloat16)})["w"]
    layout = match(perm, shape)
    src = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    want = cpu_prepack_moe_weight(src, isa)
    dst = torch.empty_like(src)
    view, out = layout.apply(src), dst.view(layout.shape(src.numel() // shape[-1], shape[-1]))
    words_dst, words_src = _words(out, view)
    ways = {"memcpy": lambda: dst.copy_(src), "words": lambda: copy_words(out, view),
            "words_torch": lambda: words_dst.copy_(words_src), "elements": lambda: out.copy_(view),
            "prepack": lambda: cpu_prepack_moe_weight(src, isa), "compare": lambda: equal_bytes(out, view),
            "compare_torch": lambda: torch.equal(words_dst, words_src)}
    gbps = {}
    for name, fn in ways.items():
        gbps[name] = best_gbps(fn, src.nbytes, args.repeats)
        if name in ("words", "words_torch", "elements") and not torch.equal(dst.view(torch.int16),
                                                                          want.view(torch.int16)):
            raise AssertionError(f"{name}: the bytes differ from vLLM's prepack")
        if name.startswith("compare") and not fn():
            raise AssertionError(f"{name}: the written layout compared unequal to its source")
    result = {"command": "python " + " ".join(sys.argv), "torch_threads": 1, "isa": isa, "shape": shape,
              "layout": {"rows": layout.rows, "pack": layout.pack}, "gb_per_s": gbps,
              "transpose": word_transpose.status(), "words_over_memcpy": gbps["words"] / gbps["memcpy"],
              "words_torch_over_memcpy": gbps["words_torch"] / gbps["memcpy"]}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "kernel_layout_copy.json").write_text(json.dumps(result, indent=1))
    print(f"{isa} layout {layout.rows}x{layout.pack}, stack {shape}, words by {word_transpose.status()}: "
          + ", ".join(f"{k} {v:.2f} GB/s" for k, v in gbps.items()))


if __name__ == "__main__":
    main()
