"""Plot a c3po run's request timeline: one row per request, one bar per segment, coloured by policy version.

    python -m ring_ext_c3po.timeline <default_local_dir>/c3po_timeline.jsonl -o timeline.png

The JSONL is written by the c3po trainer mode (`trainer.v1.c3po.timeline=true`, the default): one line per
trained or purged request with its segments [version, tokens, start_s, end_s].
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def load(path: Path) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not rows:
        raise ValueError(f"{path} holds no requests (did the run train a step with trainer.v1.c3po.timeline=true?)")
    return rows


def plot(rows: list[dict], out: Path, max_rows: int = 80) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(rows, key=lambda r: min((s[2] for s in r["segments"]), default=0.0))[:max_rows]
    t0 = min((s[2] for r in rows for s in r["segments"]), default=0.0)
    versions = sorted({int(s[0]) for r in rows for s in r["segments"]})
    cmap = plt.get_cmap("viridis", max(len(versions), 2))
    colour = {v: cmap(i) for i, v in enumerate(versions)}
    fig, ax = plt.subplots(figsize=(10, max(3.0, 0.14 * len(rows) + 1.5)))
    for y, row in enumerate(rows):
        for version, _tokens, start, end in row["segments"]:
            ax.barh(y, max(end - start, 1e-3), left=start - t0, color=colour[int(version)],
                    edgecolor="red" if row["purged"] else "none")
        ax.text(max(s[3] for s in row["segments"]) - t0 if row["segments"] else 0, y,
                f" s{row['step']}" + (" purged" if row["purged"] else ""), va="center", fontsize=6)
    from matplotlib.patches import Patch

    handles = [Patch(color=colour[v], label=f"policy v{v}") for v in versions]
    ax.set_xlabel("wall clock (s)")
    ax.set_ylabel("request")
    ax.set_title("C3PO++ requests by policy version (label: the step that trained it)")
    ax.legend(handles=handles, loc="lower right", fontsize=7)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("jsonl", type=Path, help="c3po_timeline.jsonl from a run's trainer.default_local_dir")
    parser.add_argument("-o", "--out", type=Path, default=Path("c3po_timeline.png"), help="PNG to write")
    parser.add_argument("--max-rows", type=int, default=80, help="plot at most this many requests (earliest first)")
    args = parser.parse_args(argv)
    print(plot(load(args.jsonl), args.out, args.max_rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
