#!/usr/bin/env python
"""Render a run's per-token records as one self-contained HTML page: tokens coloured by a chosen quantity.

    python tools/show_tokens.py RUN_DIR                        # the last recorded step -> RUN_DIR/tokens_step<N>.html
    python tools/show_tokens.py RUN_DIR --step 20 --color future_kl --out page.html
    python tools/show_tokens.py RUN_DIR --summary              # a markdown table over every recorded step

Reads ``RUN_DIR/token_records.jsonl`` (written with ``logging.token_records_interval > 0``; the format is
in ``fipo_megatron/token_records.py``). The page has no external resources: the records of the step are
embedded as JSON and drawn by a short script. A selector switches the colour between Δlog p (the last
mini-batch's movement), FutureKL, the influence weight, the advantage and the per-token loss (a diverging
scale around 0, around 1 for the influence weight, saturated at the page's largest magnitude); hovering a
token shows every number and flag of it. Tokens the PPO clip stopped are underlined, dual-clipped ones
boxed, tokens of an invalidated response struck through, tokens left out of FutureKL (ratio > c) dotted.
"""

from __future__ import annotations

import argparse
import html
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the checkout's package

QUANTITIES = {  # name -> (label, centre of the diverging scale)
    "delta_logp": ("Δlog p (last mini-batch vs. step start)", 0.0),
    "future_kl": ("FutureKL", 0.0),
    "influence_weight": ("influence weight f", 1.0),
    "advantage": ("advantage A", 0.0),
    "loss": ("per-token loss", 0.0),
}

_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>__TITLE__</title>
<style>
body { font-family: system-ui, sans-serif; margin: 16px; color: #111; background: #fff; }
h1 { font-size: 18px; margin: 0 0 6px 0; }
.meta { color: #555; font-size: 13px; margin-bottom: 10px; }
.controls { margin: 8px 0 14px 0; font-size: 14px; }
.rec { border: 1px solid #ddd; border-radius: 6px; padding: 8px 10px; margin-bottom: 12px; }
.rec h2 { font-size: 14px; margin: 0 0 6px 0; font-weight: 600; }
.prompt { font-family: monospace; color: #666; font-size: 13px; margin-bottom: 4px; word-break: break-all; }
.tokens { font-family: monospace; font-size: 15px; line-height: 1.9; word-break: break-all; }
.tok { padding: 1px 0; border-radius: 2px; cursor: default; white-space: pre; }
.tok.clip { text-decoration: underline; text-decoration-thickness: 2px; }
.tok.dual { outline: 1px solid #000; }
.tok.dropped { text-decoration: line-through; opacity: 0.6; }
.tok.fklmask { outline: 1px dotted #000; }
#tip { position: fixed; display: none; background: #222; color: #fff; font: 12px monospace; padding: 6px 8px;
       border-radius: 4px; pointer-events: none; white-space: pre; z-index: 10; }
.bar { display: inline-block; width: 220px; height: 12px; vertical-align: middle;
       background: linear-gradient(to right, rgb(40,90,220), #fff, rgb(220,40,40)); border: 1px solid #aaa; }
</style></head>
<body>
<h1>__TITLE__</h1>
<div class="meta" id="meta"></div>
<div class="controls">colour: <select id="qty"></select>
 <span id="lo"></span> <span class="bar"></span> <span id="hi"></span>
 &nbsp; underline: PPO-clipped, box: dual-clipped, strike: response invalidated, dotted: not in FutureKL (ratio &gt; c)</div>
<div id="records"></div>
<div id="tip"></div>
<script id="data" type="application/json">__DATA__</script>
<script>
"use strict";
const DATA = JSON.parse(document.getElementById("data").textContent);
const QTY = DATA.quantities;
const sel = document.getElementById("qty");
for (const [name, spec] of Object.entries(QTY)) {
  const o = document.createElement("option"); o.value = name; o.textContent = spec[0];
  if (name === DATA.color) o.selected = true; sel.appendChild(o);
}
document.getElementById("meta").textContent = DATA.meta;
const shown = t => t.replace(/ /g, "\\u2423").replace(/\\n/g, "\\u23ce");
function colour(v, centre, scale) {
  if (v === null || scale <= 0) return "#eee";
  const x = Math.max(-1, Math.min(1, (v - centre) / scale));
  const a = Math.round(255 * (1 - Math.abs(x)));
  return x >= 0 ? `rgb(255,${a},${a})` : `rgb(${a},${a},255)`;
}
function render() {
  const q = sel.value, centre = QTY[q][1];
  let scale = 0;
  for (const r of DATA.records) for (const v of r[q]) if (v !== null) scale = Math.max(scale, Math.abs(v - centre));
  document.getElementById("lo").textContent = (centre - scale).toPrecision(3);
  document.getElementById("hi").textContent = (centre + scale).toPrecision(3);
  const root = document.getElementById("records"); root.textContent = "";
  DATA.records.forEach((r, ri) => {
    const box = document.createElement("div"); box.className = "rec";
    const h = document.createElement("h2");
    h.textContent = `step ${r.step} · sample ${r.sample} (group ${r.group}) · ${r.loss_mode} · reward ${r.reward} · ` +
      `advantage ${r.advantage[0] === undefined ? "-" : r.advantage[0]} · ${r.tokens.length} tokens · ` +
      `mini-batch ${r.mini_batch + 1}/${r.num_mini_batches} · ${r.finish_reason}`;
    box.appendChild(h);
    const p = document.createElement("div"); p.className = "prompt"; p.textContent = "prompt: " + r.prompt;
    box.appendChild(p);
    const line = document.createElement("div"); line.className = "tokens";
    r.tokens.forEach((t, i) => {
      const s = document.createElement("span");
      s.className = "tok" + (r.ppo_clipped[i] ? " clip" : "") + (r.dual_clipped[i] ? " dual" : "") +
        (r.kept[i] ? "" : " dropped") + (r.future_kl_masked[i] ? " fklmask" : "");
      s.textContent = shown(t);
      s.style.background = colour(r[q][i], centre, scale);
      s.dataset.rec = ri; s.dataset.pos = i;
      line.appendChild(s);
    });
    box.appendChild(line); root.appendChild(box);
  });
}
const tip = document.getElementById("tip");
document.addEventListener("mousemove", e => {
  const s = e.target.closest ? e.target.closest(".tok") : null;
  if (!s) { tip.style.display = "none"; return; }
  const r = DATA.records[+s.dataset.rec], i = +s.dataset.pos;
  const f = v => v === null ? "n/a" : Number(v).toPrecision(5);
  tip.textContent = `token ${i}: ${JSON.stringify(r.tokens[i])} (id ${r.token_ids[i]})\\n` +
    `Δlog p            ${f(r.delta_logp[i])}\\nFutureKL          ${f(r.future_kl[i])}\\n` +
    `influence weight  ${f(r.influence_weight[i])}\\nadvantage         ${f(r.advantage[i])}\\n` +
    `loss              ${f(r.loss[i])}\\nPPO-clipped ${r.ppo_clipped[i]}  dual-clipped ${r.dual_clipped[i]}  ` +
    `kept ${r.kept[i]}  not in FutureKL ${r.future_kl_masked[i]}`;
  tip.style.display = "block";
  tip.style.left = Math.min(e.clientX + 14, window.innerWidth - tip.offsetWidth - 4) + "px";
  tip.style.top = (e.clientY + 16) + "px";
});
sel.addEventListener("change", render);
render();
</script>
</body></html>
"""


def render_page(records: list[dict], *, color: str, title: str, meta: str) -> str:
    """The HTML page for ``records`` (validated token records), coloured by ``color`` at first."""
    if color not in QUANTITIES:
        raise ValueError(f"color must be one of {sorted(QUANTITIES)}, got {color!r}")
    data = {"records": records, "color": color, "quantities": QUANTITIES, "meta": meta}
    # "</" cannot end the script element early once escaped; the JSON stays valid.
    payload = json.dumps(data).replace("</", "<\\/")
    return _PAGE.replace("__TITLE__", html.escape(title)).replace("__DATA__", payload)


def summary_table(records: list[dict], *, top: int = 12) -> str:
    """Per token text, over ``records``: count, mean |Δlog p|, mean FutureKL, mean influence weight, share of
    tokens with f > 1 and PPO-clipped share; the ``top`` texts by mean |Δlog p| (markdown)."""
    stats: dict[str, list] = {}
    for r in records:
        for i, t in enumerate(r["tokens"]):
            if r["delta_logp"][i] is None or r["future_kl"][i] is None:
                continue
            s = stats.setdefault(t, [0, 0.0, 0.0, 0.0, 0, 0])
            s[0] += 1
            s[1] += abs(r["delta_logp"][i])
            s[2] += r["future_kl"][i]
            s[3] += r["influence_weight"][i] or 0.0
            s[4] += int((r["influence_weight"][i] or 0.0) > 1.0)
            s[5] += r["ppo_clipped"][i]
    rows = sorted(stats.items(), key=lambda kv: -kv[1][1] / kv[1][0])[:top]
    lines = ["| token | count | mean abs Δlog p | mean FutureKL | mean f | share f > 1 | PPO-clipped |",
             "|---|---|---|---|---|---|---|"]
    for t, (n, d, f, w, up, clip) in rows:
        lines.append(f"| `{t}` | {n} | {d / n:.4f} | {f / n:.4f} | {w / n:.4f} | {up / n:.3f} | {clip / n:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="run directory with token_records.jsonl (or the file itself)")
    parser.add_argument("--step", type=int, default=None, help="recorded step to show (default: the last)")
    parser.add_argument("--color", default="delta_logp", choices=sorted(QUANTITIES), help="initial colour quantity")
    parser.add_argument("--out", default=None, help="HTML file (default: RUN_DIR/tokens_step<N>.html)")
    parser.add_argument("--max-records", type=int, default=16, help="records of the step to show at most")
    parser.add_argument("--summary", action="store_true",
                        help="print per-token-text statistics over every recorded step (or --step) instead")
    args = parser.parse_args(argv)
    from fipo_megatron.token_records import read_token_records

    try:
        records = read_token_records(args.run_dir)
    except ValueError as exc:
        parser.error(str(exc))
    steps = sorted({r["step"] for r in records})
    if not steps:
        parser.error(f"{args.run_dir}: the token records file is empty")
    if args.summary:
        sys.stdout.write(summary_table([r for r in records if args.step is None or r["step"] == args.step]))
        return 0
    step = steps[-1] if args.step is None else args.step
    if step not in steps:
        parser.error(f"step {step} has no records; recorded steps: {steps}")
    chosen = [r for r in records if r["step"] == step][:args.max_records]
    run_dir = args.run_dir if os.path.isdir(args.run_dir) else os.path.dirname(args.run_dir)
    title = f"{os.path.basename(os.path.normpath(run_dir)) or run_dir}: per-token view, step {step}"
    meta = (f"{len(chosen)} responses of the last mini-batch of step {step} ({chosen[0]['loss_mode']}); "
            f"recorded steps: {', '.join(map(str, steps))}")
    out = args.out or os.path.join(run_dir, f"tokens_step{step}.html")
    with open(out, "w", encoding="utf-8") as f:
        f.write(render_page(chosen, color=args.color, title=title, meta=meta))
    sys.stdout.write(f"{out}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
