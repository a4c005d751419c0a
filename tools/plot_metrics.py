#!/usr/bin/env python
"""Plot a run's metrics: reward, response-length quantiles, influence-weight statistics.

    python tools/plot_metrics.py RUN_DIR/metrics.jsonl --out RUN_DIR/plot.png

Reads the ``metrics.jsonl`` the trainer writes (one JSON object per step); panels whose metrics are
absent (e.g. influence weights in a DAPO run) are left out. Uses matplotlib's Agg backend (no display).
"""

from __future__ import annotations

import argparse
import json
import sys

from fipo_megatron.metrics import read_metrics

PANELS = [
    ("reward / accuracy", ["rollout/acc", "rollout/reward_mean", "reward/mean", "val/acc"]),
    ("response length (tokens)", ["response_length/mean", "response_length/q25", "response_length/median",
                                  "response_length/q75", "response_length/max"]),
    ("influence weights", ["actor/influence_weights_mean", "actor/influence_weights_min",
                           "actor/influence_weights_max", "actor/influence_weights_mean_raw"]),
    ("influence-weight clip ratio", ["actor/IW_upper_clip_ratio", "actor/IW_lower_clip_ratio",
                                     "actor/IW_overall_clip_ratio"]),
    ("policy", ["actor/pg_loss", "actor/pg_clipfrac", "actor/ppo_kl", "actor/entropy"]),
    ("dynamic sampling", ["num_gen_batches"]),
]


def plot(rows: list[dict], out: str, *, title: str | None = None) -> int:
    """Draw the panels that have data into ``out``; return the number of panels drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(name, [k for k in keys if any(r.get(k) is not None for r in rows)]) for name, keys in PANELS]
    panels = [(name, keys) for name, keys in panels if keys]
    if not panels:
        raise ValueError("no known metric in the file (expected reward/mean, response_length/..., actor/...)")
    ncols = 2
    nrows = (len(panels) + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(6 * ncols, 3.2 * nrows), squeeze=False)
    for ax, (name, keys) in zip(axes.flat, panels):
        for key in keys:
            pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
            style = "--" if key.endswith(("q25", "q75", "min", "max")) else "-"
            label = key if name.startswith("reward") else key.split("/", 1)[-1]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=label, linewidth=1.2)
        ax.set_title(name)
    return finish_grid(fig, axes, len(panels), title=title, out=out, dpi=110)


def finish_grid(fig, axes, num_panels: int, *, title: str | None, out: str, dpi: int) -> int:
    """The common end of a grid of per-step panels (also ``tools/compare_runs.py``): step axis, grid and
    legend on the used panels, the unused ones blank, the title; written to ``out``. Returns ``num_panels``."""
    import matplotlib.pyplot as plt

    for ax in list(axes.flat)[:num_panels]:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[num_panels:]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=dpi)
    plt.close(fig)
    return num_panels


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("metrics", help="path to metrics.jsonl")
    parser.add_argument("--out", default="plot.png", help="output image (PNG)")
    parser.add_argument("--title", default=None)
    args = parser.parse_args(argv)
    rows = read_metrics(args.metrics)
    if not rows:
        sys.stderr.write(f"{args.metrics}: no rows\n")
        return 1
    plot(rows, args.out, title=args.title)
    return 0


if __name__ == "__main__":
    sys.exit(main())
