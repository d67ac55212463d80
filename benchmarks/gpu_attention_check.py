"""Why the recipes pick flash-attention on packed sequences: the memory of one attention call over a packed
micro-batch, sdpa with the dense block-diagonal mask transformers builds for it vs flash-attn's varlen kernel.

    python benchmarks/gpu_attention_check.py --tokens 16384 65536        # on a GPU (scripts/gpu_check.sh)
    python benchmarks/gpu_attention_check.py --device cpu --tokens 2048  # dry run

Sequences of 4096 tokens packed into T tokens, 8 query heads of 128 (2 KV heads), bf16 on a GPU. Peak memory above
the inputs (torch.cuda.max_memory_allocated) per path; flash-attn is skipped where it is not installed. Writes
<out-dir>/gpu_attention.json.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch
import torch.nn.functional as F

HEADS, KV_HEADS, DIM, SEQ = 8, 2, 128, 4096


def _peak(device: torch.device, fn) -> float:
    if device.type != "cuda":
        fn()
        return float("nan")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**30


def check(tokens: int, device: torch.device) -> dict:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    q = torch.randn(tokens, HEADS, DIM, device=device, dtype=dtype)
    k = torch.randn(tokens, KV_HEADS, DIM, device=device, dtype=dtype)
    v = torch.randn_like(k)
    starts = torch.arange(0, tokens + 1, SEQ, device=device).clamp(max=tokens)

    def sdpa_packed() -> None:
        seq_id = torch.arange(tokens, device=device) // SEQ
        mask = (seq_id[:, None] == seq_id[None, :]).tril()  # the [T, T] mask of packed causal sequences
        F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None].repeat_interleave(4, 1),
                                       v.transpose(0, 1)[None].repeat_interleave(4, 1), attn_mask=mask)

    row = {"tokens": tokens, "dense_mask_gib": tokens * tokens / 2**30,
           "sdpa_packed_peak_gib": _peak(device, sdpa_packed)}
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        row["flash_varlen_peak_gib"] = None  # not installed: the recipes fall back to sdpa on padded batches
        return row
    cu = starts.to(torch.int32)
    row["flash_varlen_peak_gib"] = _peak(device, lambda: flash_attn_varlen_func(q, k, v, cu, cu, SEQ, SEQ, causal=True))
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, nargs="+", default=[16384, 65536], help="packed micro-batch sizes")
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu for a dry run")
    ap.add_argument("--out-dir", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    device = torch.device(args.device)
    rows = [check(t, device) for t in args.tokens]
    for row in rows:
        print(row)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    meta = {"torch": torch.__version__, "device": str(device), "host": platform.node()}
    (args.out_dir / "gpu_attention.json").write_text(json.dumps({**meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
