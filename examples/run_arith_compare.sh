#!/usr/bin/env bash
# FIPO against DAPO on the arithmetic task (fipo_megatron/data/arith_task.py), 3 seeds each, one CPU process
# per run, the runs one after another; then the comparison table/plot and the per-token page.
#
#   bash examples/run_arith_compare.sh                 # parity of 8 bits; OUT defaults to runs/arith_mod2
#   SEEDS="1 2" MODULUS=10 bash examples/run_arith_compare.sh trainer.total_training_steps=30
#
# Extra arguments are config overrides for every run (same budget for both losses). The warm-started model
# and the data are prepared once under OUT/base (reused when present). Each run is started with `nice`
# (the machine may be shared); its wall time goes to OUT/times.tsv. Writes OUT/<loss>_s<seed>/ (metrics.jsonl,
# token_records.jsonl), OUT/compare/{compare.png,compare.md,summary.json} and OUT/fipo_s1/tokens_step<N>.html.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
MODULUS=${MODULUS:-2}
OUT=${OUT:-runs/arith_mod$MODULUS}
SEEDS=${SEEDS:-1 2 3}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export PYTHONWARNINGS=${PYTHONWARNINGS:-ignore}
mkdir -p "$OUT"
if [ ! -f "$OUT/base/model/config.json" ]; then
  nice "$PY" -m fipo_megatron.data.arith_task --out "$OUT/base" --num-operands 8 --modulus "$MODULUS" --sft-steps 400
fi
if [ ! -f "$OUT/base/sampled_acc.log" ]; then  # what writing more lines buys the warm-started model
  nice "$PY" tools/arith_measure.py --base "$OUT/base" --num-operands 8 --modulus "$MODULUS" \
    > "$OUT/base/sampled_acc.log" 2>&1
fi
for seed in $SEEDS; do
  for loss in fipo dapo; do
    run="$OUT/${loss}_s${seed}"
    start=$(date +%s)
    nice "$PY" -m fipo_megatron --config "examples/configs/arith_${loss}.yaml" trainer.seed="$seed" \
      trainer.run_dir="$run" data.train_files="[$OUT/base/train.jsonl]" data.val_files="[$OUT/base/val.jsonl]" \
      model.path="$OUT/base/model" "$@" > "$OUT/${loss}_s${seed}.log" 2>&1
    printf '%s\t%s\n' "${loss}_s${seed}" "$(( $(date +%s) - start ))" >> "$OUT/times.tsv"
  done
done
runs=()
for seed in $SEEDS; do runs+=("$OUT/fipo_s$seed" "$OUT/dapo_s$seed"); done
"$PY" tools/compare_runs.py "${runs[@]}" --out "$OUT/compare" --title "FIPO vs DAPO, arithmetic task"
first=$(set -- $SEEDS; echo "$1")
"$PY" tools/show_tokens.py "$OUT/fipo_s$first"
