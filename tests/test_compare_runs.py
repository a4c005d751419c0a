"""Two tiny real runs (FIPO and DAPO, the experiment's configs shrunk) through the CLI, then the tools on them.

The runs use the arithmetic task's prepared data and warm-started model, the DAPO math reward and the
per-token records (every step), so this also covers the trainer's record hook end to end: the records of
each step are in the run directory, valid, and from the last mini-batch. ``tools/compare_runs.py`` must
group the runs by their loss mode, put both in its table with the numbers of their metrics.jsonl, and draw
the PNG; ``tools/show_tokens.py`` must render the FIPO run's last step.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _train(config: str, run_dir, base, extra=()):
    overrides = [f"trainer.run_dir={run_dir}", f"data.train_files=[{base}/train.jsonl]",
                 f"data.val_files=[{base}/val.jsonl]", f"model.path={base}/model", "data.max_prompt_length=8",
                 "data.max_response_length=24", "reward.overlong_buffer.len=4", "data.train_batch_size=4",
                 "data.gen_batch_size=4", "rollout.n=4", "actor.ppo_mini_batch_size=2", "rollout.val_n=1",
                 "algorithm.filter_groups.enable=false", "trainer.total_training_steps=2", "trainer.val_interval=2",
                 "trainer.val_before_train=false", "logging.token_records_interval=1",
                 "logging.token_records_samples=2", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
    proc = subprocess.run([sys.executable, "-m", "fipo_megatron", "--config", os.path.join(REPO, "examples", "configs", config),
                           *overrides], cwd=REPO, env=env, capture_output=True, text=True, timeout=500)
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from fipo_megatron.data.arith_task import prepare

    root = tmp_path_factory.mktemp("arith")
    base = root / "base"
    prepare(out=str(base), num_operands=3, num_train=32, num_val=4, sft_steps=30, sft_batch_size=16, sft_lr=3e-3,
            seed=0)
    _train("arith_fipo.yaml", root / "fipo", base)
    _train("arith_dapo.yaml", root / "dapo", base)
    return root


@pytest.mark.slow
def test_runs_write_valid_token_records(runs):
    from fipo_megatron.token_records import read_token_records

    for label in ("fipo", "dapo"):
        recs = read_token_records(str(runs / label))
        assert sorted({r["step"] for r in recs}) == [1, 2]
        assert all(r["loss_mode"] == label for r in recs)
        assert all(r["mini_batch"] == r["num_mini_batches"] - 1 == 1 for r in recs)  # 4 prompts, 2 per mini-batch
        assert all(8 <= r["sample"] < 16 for r in recs)  # 16 responses; the last mini-batch holds 8..15
        if label == "dapo":
            assert all(w == 1.0 for r in recs for w in r["influence_weight"])


@pytest.mark.slow
def test_compare_runs_table_and_plot(runs, tmp_path):
    out = tmp_path / "cmp"
    proc = subprocess.run([sys.executable, os.path.join(REPO, "tools", "compare_runs.py"), str(runs / "fipo"),
                           str(runs / "dapo"), "--out", str(out), "--last", "1", "--steps", "1,2"], capture_output=True, text=True,
                          timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "compare.png").stat().st_size > 10_000
    table = (out / "compare.md").read_text()
    header = table.splitlines()[0]
    assert "dapo last 1" in header and "fipo first 1" in header
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) == {"fipo", "dapo"}
    rows = {label: [json.loads(line) for line in (runs / label / "metrics.jsonl").read_text().splitlines()]
            for label in ("fipo", "dapo")}
    for label in ("fipo", "dapo"):
        want = rows[label][-1]["response_length/mean"]
        got = summary[label]["metrics"]["response_length/mean"]["end"]
        assert got["n"] == 1 and got["mean"] == pytest.approx(want)
        assert summary[label]["metrics"]["val/acc"]["end"]["mean"] == pytest.approx(rows[label][-1]["val/acc"])
    line = next(x for x in table.splitlines() if x.startswith("| response length mean |"))
    assert line.count("|") == 6
    at_steps = next(x for x in table.splitlines() if x.startswith("| response length mean | fipo |"))
    want = [r["response_length/mean"] for r in rows["fipo"] if r["step"] in (1, 2)]
    assert [float(c) for c in at_steps.split("|")[3:5]] == pytest.approx(want, rel=1e-2)
    # A run without metrics is named in the error.
    bad = subprocess.run([sys.executable, os.path.join(REPO, "tools", "compare_runs.py"), str(tmp_path), "--out",
                          str(out)], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert bad.returncode != 0 and "no metrics.jsonl" in bad.stderr


@pytest.mark.slow
def test_show_tokens_renders_the_run(runs, tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(REPO, "tools", "show_tokens.py"), str(runs / "fipo"),
                           "--color", "future_kl"], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    page = runs / "fipo" / "tokens_step2.html"
    assert proc.stdout.strip() == str(page)
    text = page.read_text()
    assert '"color": "future_kl"' in text and "step 2" in text
    summary = subprocess.run([sys.executable, os.path.join(REPO, "tools", "show_tokens.py"), str(runs / "fipo"),
                              "--summary"], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert summary.returncode == 0, summary.stderr[-3000:]
    from fipo_megatron.token_records import read_token_records

    recs = read_token_records(str(runs / "fipo"))
    rows = [line.split("|") for line in summary.stdout.splitlines()[2:]]
    assert rows
    for row in rows:  # counts and mean |Δlog p| per token text, recomputed here from the records
        text = row[1].strip().strip("`")
        vals = [abs(r["delta_logp"][i]) for r in recs for i, t in enumerate(r["tokens"]) if t == text]
        assert int(row[2]) == len(vals) and float(row[3]) == pytest.approx(sum(vals) / len(vals), abs=1e-4)
    missing = subprocess.run([sys.executable, os.path.join(REPO, "tools", "show_tokens.py"), str(runs / "fipo"),
                              "--step", "5"], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert missing.returncode != 0 and "recorded steps: [1, 2]" in missing.stderr
