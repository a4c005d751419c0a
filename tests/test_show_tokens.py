"""tools/show_tokens.py in a real headless browser (Debian's chromium; ``bash tools/setup_browser.sh``).

The page draws its tokens with a script, so the DOM chromium dumps after running it shows whether the page
works: every token of every record is a span with its text, in order, with a background colour from the
chosen quantity (red for the largest positive value, blue for the most negative). The screenshot must
show coloured pixels. Skips only when no chromium binary is installed.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from fipo_megatron.algo.policy_loss import TOKEN_TAP_FIELDS
from fipo_megatron.batch import Sample, TrainBatch
from fipo_megatron.token_records import TokenRecordWriter, build_records

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
TEXTS = ["3", "+", " ", "</script>", "\"q\"", "A", "<eos>"]  # hostile for HTML/JSON: must show as text


class _Tok:
    def decode(self, ids, skip_special_tokens=True):
        return "".join(TEXTS[i % len(TEXTS)] for i in ids)


def _run_dir(tmp_path):
    samples = [Sample(prompt_ids=[0, 1], response_ids=list(range(n)), advantage=a, group_id=0, reward=r)
               for n, a, r in ((7, 1.5, 1.0), (12, -0.5, -1.0))]
    batch = TrainBatch(samples=samples, num_responses_per_prompt=2)
    taps = {}
    for i, s in enumerate(samples):
        n = len(s.response_ids)
        vals = {f: torch.zeros(n) for f in TOKEN_TAP_FIELDS}
        vals["delta_logp"] = torch.linspace(-0.4, 0.8, n)  # the largest |value|, 0.8, is the last token of each
        vals["future_kl"] = torch.linspace(0.3, -0.1, n)
        vals["influence_weight"] = torch.ones(n)
        vals["advantage"] = torch.full((n,), s.advantage)
        vals["response_mask"] = vals["kept"] = torch.ones(n)
        vals["ppo_clipped"][1] = 1.0
        taps[i] = vals
    records = build_records(step=3, batch=batch, taps=taps, tokenizer=_Tok(), loss_mode="fipo", num_mini_batches=1,
                            mini_batch_samples=2)
    TokenRecordWriter(str(tmp_path)).write(records)
    return records


def _chromium(*args, timeout=120):
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
           "--no-first-run", "--virtual-time-budget=3000", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (bash tools/setup_browser.sh installs it)")
def test_page_shows_every_token_in_chromium(tmp_path):
    records = _run_dir(tmp_path)
    page = tmp_path / "page.html"
    proc = subprocess.run([sys.executable, os.path.join(REPO, "tools", "show_tokens.py"), str(tmp_path), "--out",
                           str(page)], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    dom = _chromium("--dump-dom", page.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    spans = re.findall(r'<span class="tok([^"]*)"[^>]*style="background: ([^"]*);"[^>]*>(.*?)</span>', dom.stdout)
    import html as html_mod

    want = [t.replace(" ", "\u2423") for r in records for t in r["tokens"]]
    assert [html_mod.unescape(s[2]) for s in spans] == want
    colours = [s[1] for s in spans]
    n0 = len(records[0]["tokens"])
    assert colours[n0 - 1] == "rgb(255, 0, 0)"      # Δlog p = +0.8, the page's largest magnitude
    assert colours[0].startswith("rgb(") and colours[0].endswith(", 255)")  # a negative value: blue
    assert " clip" in spans[1][0] and " clip" not in spans[0][0]
    assert "step 3 · sample 0" in dom.stdout and "</script>" not in dom.stdout.split("<body>")[1].split("<script")[0]

    shot = tmp_path / "shot.png"
    out = _chromium(f"--screenshot={shot}", "--window-size=1000,700", page.as_uri())
    assert out.returncode == 0 and shot.is_file(), out.stderr[-2000:]
    from PIL import Image

    img = Image.open(shot).convert("RGB")
    assert img.size == (1000, 700)
    pixels = list(img.getdata())
    reddish = sum(1 for r, g, b in pixels if r > 200 and g < 120 and b < 120)
    bluish = sum(1 for r, g, b in pixels if b > 200 and r < 160 and g < 160)
    assert reddish > 50 and bluish > 50, (reddish, bluish)
