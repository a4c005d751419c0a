#!/usr/bin/env bash
# The CPU demo: FIPO on 2 processes (tensor parallel 2), embedded rollout engine, a random tiny Llama,
# the synthetic "copy the digit" task. About a minute on 2 cores; no GPU, no download.
#
#   bash examples/run_tiny_cpu.sh                          # RUN_DIR defaults to runs/tiny_cpu_<timestamp>
#   RUN_DIR=runs/demo bash examples/run_tiny_cpu.sh trainer.total_training_steps=60 parallel.tp=1 parallel.pp=2
#
# Extra arguments are dotted config overrides. Re-running with the same RUN_DIR resumes from its latest
# checkpoint (checkpoint.resume=auto). Writes RUN_DIR/{config.yaml, metrics.jsonl, tensorboard/,
# checkpoints/, hf_init/, plot.png}. The launcher only runs its own torchrun; it stops nothing else.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
RUN_DIR=${RUN_DIR:-runs/tiny_cpu_$(date +%Y%m%d_%H%M%S)}
NPROC=${NPROC:-2}
mkdir -p "$RUN_DIR"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}   # 2 ranks share 2 cores
export PYTHONWARNINGS=${PYTHONWARNINGS:-ignore}

"$PY" -m torch.distributed.run --standalone --nproc-per-node "$NPROC" -m fipo_megatron \
  --config examples/configs/tiny_cpu.yaml trainer.run_dir="$RUN_DIR" "$@"

"$PY" tools/plot_metrics.py "$RUN_DIR/metrics.jsonl" --out "$RUN_DIR/plot.png" --title "FIPO tiny CPU demo"
"$PY" - "$RUN_DIR/metrics.jsonl" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
train = [r for r in rows if "rollout/acc" in r]
first = sum(r["rollout/acc"] for r in train[:3]) / len(train[:3])
last = sum(r["rollout/acc"] for r in train[-3:]) / len(train[-3:])
iw = [r["actor/raw_influence_weights_max"] for r in train if "actor/raw_influence_weights_max" in r]
print(f"accuracy of sampled responses: first 3 steps {first:.3f} -> last 3 steps {last:.3f} (+{last - first:.3f}); "
      f"max raw influence weight seen {max(iw):.3f} (FutureKL active when != 1)")
EOF
echo "run dir: $RUN_DIR  (metrics.jsonl, plot.png, tensorboard/, checkpoints/)"
