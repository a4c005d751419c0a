#!/usr/bin/env python
"""Compare training runs grouped by label (e.g. fipo / dapo), seeds aggregated: a PNG and a markdown table.

    python tools/compare_runs.py runs/arith/fipo_s1 runs/arith/fipo_s2 runs/arith/dapo_s1 ... --out docs/cmp
    python tools/compare_runs.py RUN_A=fipo RUN_B=dapo --out DIR --last 5

A run is a directory with the trainer's ``metrics.jsonl`` (and ``config.yaml``). Its label is what follows
``=`` on the command line, else the ``--label-key`` entry of its ``config.yaml`` (default
``actor.loss_mode``). Per label and step, the curves show the mean over the label's runs (seeds) and a
band from their minimum to their maximum, over the steps every run of the label logged. The table gives,
per metric and label, the mean and the [min, max] over seeds of each run's average over its first and
its last ``--last`` steps (validation metrics: the first and the last validation). FutureKL's extremes are
``ln`` of the logged raw influence-weight extremes (``raw_influence_weights_min|max`` are
``exp(FutureKL)`` over the mini-batch's response tokens; ``exp`` is monotone, so this is exact).

``--steps 1,5,10`` adds a table of the curves at those steps (``--step-keys``, default response length
mean and sampled accuracy), mean [min, max] over the label's runs.

Writes ``OUT/compare.png``, ``OUT/compare.md`` and ``OUT/summary.json`` (the table's numbers).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the checkout's package
sys.path.insert(1, os.path.dirname(os.path.abspath(__file__)))  # tools/: plot_metrics.finish_grid

import numpy as np

# (metric key in metrics.jsonl or a derived name, row label in the table)
METRICS = [
    ("reward/mean", "reward (trained batch)"),
    ("rollout/reward_mean", "reward (all sampled)"),
    ("rollout/acc", "accuracy (all sampled)"),
    ("val/acc", "validation accuracy"),
    ("response_length/mean", "response length mean"),
    ("response_length/q25", "response length q25"),
    ("response_length/median", "response length median"),
    ("response_length/q75", "response length q75"),
    ("response_length/max", "response length max"),
    ("response_length/clip_ratio", "responses at the length cap"),
    ("actor/entropy", "entropy"),
    ("actor/ppo_kl", "ppo_kl"),
    ("future_kl/min", "FutureKL min"),
    ("future_kl/max", "FutureKL max"),
    ("actor/influence_weights_mean", "influence weight mean"),
    ("actor/influence_weights_max", "influence weight max"),
    ("actor/IW_upper_clip_ratio", "IW upper clip ratio"),
    ("actor/IW_lower_clip_ratio", "IW lower clip ratio"),
    ("actor/pg_clipfrac", "PPO clip fraction"),
    ("actor/pg_clipfrac_lower", "dual-clip fraction"),
    ("num_gen_batches", "generation batches per step"),
]
PANELS = [
    ("accuracy of sampled responses", ["rollout/acc"]),
    ("validation accuracy", ["val/acc"]),
    ("reward (trained batch)", ["reward/mean"]),
    ("response length mean (tokens)", ["response_length/mean"]),
    ("response length q75 (tokens)", ["response_length/q75"]),
    ("entropy", ["actor/entropy"]),
    ("ppo_kl", ["actor/ppo_kl"]),
    ("FutureKL max (ln raw IW max)", ["future_kl/max"]),
    ("influence weight mean", ["actor/influence_weights_mean"]),
    ("PPO clip fraction", ["actor/pg_clipfrac"]),
]
VAL_KEYS = ("val/acc", "val/score_mean")


def _derive(row: dict) -> dict:
    """Add ``future_kl/min|max`` from the raw influence-weight extremes (``ln exp(FutureKL)``)."""
    out = dict(row)
    for src, dst in (("actor/raw_influence_weights_min", "future_kl/min"),
                     ("actor/raw_influence_weights_max", "future_kl/max")):
        v = row.get(src)
        if isinstance(v, (int, float)) and v > 0:
            out[dst] = math.log(v)
    return out


def _read_yaml_key(path: str, dotted: str):
    import yaml

    with open(path) as f:
        node = yaml.safe_load(f) or {}
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def load_run(spec: str, *, label_key: str) -> dict:
    """``{"dir", "label", "rows"}`` of ``RUN_DIR[=LABEL]``; a ValueError names a missing or empty file."""
    from fipo_megatron.metrics import read_metrics

    run_dir, _, label = spec.partition("=")
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise ValueError(f"{run_dir}: no metrics.jsonl")
    rows = [_derive(r) for r in read_metrics(path) if isinstance(r.get("step"), int)]
    if not rows:
        raise ValueError(f"{path}: no metric rows")
    if not label:
        cfg = os.path.join(run_dir, "config.yaml")
        label = _read_yaml_key(cfg, label_key) if os.path.isfile(cfg) else None
        if label is None:
            raise ValueError(f"{run_dir}: no label (give RUN_DIR=LABEL, or a config.yaml with {label_key})")
    return {"dir": run_dir, "label": str(label), "rows": rows}


def series(rows: list[dict], key: str) -> dict[int, float]:
    """``{step: value}`` of the finite values of ``key``."""
    return {r["step"]: float(r[key]) for r in rows
            if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool) and math.isfinite(r[key])}


def window_value(rows: list[dict], key: str, *, last: int, end: bool) -> float | None:
    """A run's average of ``key`` over its first / last ``last`` logged steps (validation keys: the single
    first / last value)."""
    s = series(rows, key)
    if not s:
        return None
    steps = sorted(s)
    if key in VAL_KEYS:
        return s[steps[-1] if end else steps[0]]
    pick = steps[-last:] if end else steps[:last]
    return float(np.mean([s[t] for t in pick]))


def aggregate(runs: list[dict], *, last: int) -> dict:
    """``{label: {"runs": [...], "metrics": {key: {"start"|"end": {"mean","min","max","n"}}}}}``."""
    out: dict[str, dict] = {}
    for run in runs:
        out.setdefault(run["label"], {"runs": [], "metrics": {}})["runs"].append(run)
    for label, group in out.items():
        for key, _ in METRICS:
            entry = {}
            for where in ("start", "end"):
                vals = [v for v in (window_value(r["rows"], key, last=last, end=where == "end") for r in group["runs"])
                        if v is not None]
                if vals:
                    entry[where] = {"mean": float(np.mean(vals)), "min": float(np.min(vals)),
                                    "max": float(np.max(vals)), "n": len(vals)}
            if entry:
                group["metrics"][key] = entry
    return out


def _fmt(cell: dict | None) -> str:
    if cell is None:
        return "-"

    def f(x: float) -> str:
        return f"{x:.3g}" if abs(x) < 1000 else f"{x:.0f}"

    if cell["n"] == 1:
        return f(cell["mean"])
    return f"{f(cell['mean'])} [{f(cell['min'])}, {f(cell['max'])}]"


def markdown_table(agg: dict, *, last: int) -> str:
    labels = sorted(agg)
    head = "| metric | " + " | ".join(f"{lab} first {last} | {lab} last {last}" for lab in labels) + " |"
    sep = "|---|" + "---|---|" * len(labels)
    lines = [head, sep]
    for key, name in METRICS:
        cells = []
        for lab in labels:
            m = agg[lab]["metrics"].get(key, {})
            cells += [_fmt(m.get("start")), _fmt(m.get("end"))]
        if any(c != "-" for c in cells):
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    runs = "; ".join(f"{lab}: " + ", ".join(f"`{r['dir']}` ({len(r['rows'])} rows)" for r in agg[lab]["runs"])
                     for lab in labels)
    note = (f"Mean over runs [min, max]; each run's value is its average over its first / last {last} logged "
            f"steps (validation: its first / last validation). Runs: {runs}.")
    return "\n".join(lines) + "\n\n" + note + "\n"


def steps_table(agg: dict, *, steps: list[int], keys: list[str]) -> str:
    """Per key and label, the value at each of ``steps``: mean [min, max] over the runs that logged it."""
    names = dict(METRICS)
    labels = sorted(agg)
    lines = ["| metric | label | " + " | ".join(f"step {t}" for t in steps) + " |",
             "|---|---|" + "---|" * len(steps)]
    for key in keys:
        for lab in labels:
            cells = []
            for t in steps:
                vals = [s[t] for s in (series(r["rows"], key) for r in agg[lab]["runs"]) if t in s]
                cells.append(_fmt({"mean": float(np.mean(vals)), "min": float(np.min(vals)), "max": float(np.max(vals)),
                                   "n": len(vals)}) if vals else "-")
            lines.append(f"| {names.get(key, key)} | {lab} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(agg: dict, out_png: str, *, title: str | None = None) -> int:
    """Mean curve and min-max band per label for each panel with data; returns the number of panels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from plot_metrics import finish_grid

    labels = sorted(agg)
    panels = [(name, keys) for name, keys in PANELS
              if any(series(r["rows"], k) for lab in labels for r in agg[lab]["runs"] for k in keys)]
    if not panels:
        raise ValueError("none of the compared metrics is in the runs")
    ncols = 2
    nrows = (len(panels) + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(6.2 * ncols, 2.9 * nrows), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (name, keys) in zip(axes.flat, panels):
        for li, lab in enumerate(labels):
            for key in keys:
                per_run = [series(r["rows"], key) for r in agg[lab]["runs"]]
                per_run = [s for s in per_run if s]
                if not per_run:
                    continue
                steps = sorted(set.intersection(*(set(s) for s in per_run)))
                if not steps:
                    continue
                vals = np.array([[s[t] for t in steps] for s in per_run])
                c = colors[li % len(colors)]
                ax.plot(steps, vals.mean(0), "-o" if key in VAL_KEYS else "-", color=c, markersize=3,
                        label=f"{lab} (n={len(per_run)})", linewidth=1.4)
                if len(per_run) > 1:
                    ax.fill_between(steps, vals.min(0), vals.max(0), color=c, alpha=0.18, linewidth=0)
        ax.set_title(name, fontsize=10)
    return finish_grid(fig, axes, len(panels), title=title, out=out_png, dpi=100)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="RUN_DIR or RUN_DIR=LABEL")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--last", type=int, default=5, help="steps averaged at the start and the end of a run")
    parser.add_argument("--label-key", default="actor.loss_mode", help="config.yaml key that labels a run")
    parser.add_argument("--title", default=None)
    parser.add_argument("--steps", default=None, help="comma-separated steps for a table of the curves at them")
    parser.add_argument("--step-keys", default="response_length/mean,rollout/acc",
                        help="comma-separated metrics of the --steps table")
    args = parser.parse_args(argv)
    if args.last < 1:
        parser.error("--last must be >= 1")
    try:
        runs = [load_run(spec, label_key=args.label_key) for spec in args.runs]
    except ValueError as exc:
        parser.error(str(exc))
    agg = aggregate(runs, last=args.last)
    os.makedirs(args.out, exist_ok=True)
    plot(agg, os.path.join(args.out, "compare.png"), title=args.title)
    table = markdown_table(agg, last=args.last)
    if args.steps:
        try:
            steps = [int(x) for x in args.steps.split(",") if x.strip()]
        except ValueError:
            parser.error(f"--steps must be comma-separated integers, got {args.steps!r}")
        table += "\n" + steps_table(agg, steps=steps, keys=[k for k in args.step_keys.split(",") if k])
    with open(os.path.join(args.out, "compare.md"), "w") as f:
        f.write(table)
    summary = {lab: {"runs": [r["dir"] for r in g["runs"]], "metrics": g["metrics"]} for lab, g in agg.items()}
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    sys.stdout.write(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
