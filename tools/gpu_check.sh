#!/usr/bin/env bash
# The GPU checks in one run (under 8 minutes on one H100/H200): GPU-marked tests, the benchmarks on CUDA,
# the bf16 FIPO actor step of a 1.5B shape at 8k and 20k response tokens, and (if present)
# tools/benchmarks/plan_vs_measured_gpu.py. Every figure goes to ONE file: <dir>/gpu_figures.txt.
#
#   bash tools/gpu_check.sh [DIR]          # DIR defaults to $OUT, else ./gpu_check_out
#
# On a machine without megatron-core (or with another version), put its wheel into .whl/ first, on any
# machine with pip (the script installs every wheel there into /tmp/site and puts that on PYTHONPATH):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl megatron-core==0.16.1
# (megatron-core needs torch, numpy and packaging besides; transformers and pytest must be installed.)
# Each step has its own time limit, so one hang cannot eat the rest; a failing step is recorded and the
# script goes on; the limits add up to 470 s. Exit status: 0 if every step passed.
# Besides the figures, DIR gets gpu_check.log (every step's full output) and gpu_tests.xml.
set -uo pipefail

DIR="${1:-${OUT:-$PWD/gpu_check_out}}"
mkdir -p "$DIR"
FIG="$DIR/gpu_figures.txt"
LOG="$DIR/gpu_check.log"
: >"$FIG"
: >"$LOG"
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1

if ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        >>"$LOG" 2>&1 || { echo "wheel install failed (see $LOG)" | tee -a "$FIG"; exit 1; }
    export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi

failed=0
section() { printf '\n## %s\n' "$1" >>"$FIG"; }
# step NAME SECONDS CMD...: run with a time limit, output to the log, status to the figures file
step() {
    local name="$1" limit="$2"; shift 2
    local t0=$SECONDS
    echo "=== $name: $*" >>"$LOG"
    timeout --kill-after=10 "$limit" "$@" >>"$LOG" 2>&1
    local rc=$?
    echo "- $name: exit $rc in $((SECONDS - t0)) s (limit $limit s)" >>"$FIG"
    [ $rc -eq 0 ] || failed=1
    return 0
}

{
    echo "# gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | sed 's/^/# GPU: /'
    "$PY" - <<'EOF'
import importlib, platform
import torch
parts = [f"python {platform.python_version()}", f"torch {torch.__version__}"]
for mod in ("megatron.core", "transformers", "transformer_engine"):
    try:
        m = importlib.import_module(mod)
        parts.append(f"{mod} {getattr(m, '__version__', '?')}")
    except Exception:
        parts.append(f"{mod} absent")
print("# " + ", ".join(parts))
EOF
} >>"$FIG" 2>>"$LOG"

section "GPU-marked tests"
step "pytest -m gpu" 110 "$PY" -m pytest -q -m gpu tests -p no:cacheprovider --junitxml="$DIR/gpu_tests.xml"
grep -E "^(FAILED|ERROR)|[0-9]+ (passed|failed|skipped)" "$LOG" | tail -n 15 >>"$FIG"

section "actor vs plain loop, engine vs generate (CUDA, bf16, 44.8M Llama shape)"
# memory per arm on CUDA is left to bench_actor_gpu (a fresh process per arm would cost ~10 s each here)
step "bench_actor_vs_plain" 60 "$PY" tools/benchmarks/bench_actor_vs_plain.py --device cuda --dtype bfloat16 \
    --lengths 1024 8192 --repeats 2 --skip-memory --out "$FIG"

section "bf16 FIPO actor step, Qwen2.5-1.5B shape"
step "bench_actor_gpu" 90 "$PY" tools/benchmarks/bench_actor_gpu.py --responses 8192 20480 --repeats 1 --out "$FIG"

section "local attention, log-probs, FutureKL (CUDA)"
step "bench_local_attention" 20 "$PY" tools/benchmarks/bench_local_attention.py --device cuda --repeats 3
step "bench_logprobs" 35 "$PY" tools/benchmarks/bench_logprobs.py --device cuda
step "bench_future_kl" 15 "$PY" tools/benchmarks/bench_future_kl.py --device cuda
# these three print their own tables; keep them with the figures
awk '/^=== bench_(local_attention|logprobs|future_kl)/{p=1} /^=== (pytest|bench_actor|plan)/{p=0} p' "$LOG" \
    | grep -v -E "Warning|warn\(" >>"$FIG"

if [ -f tools/benchmarks/plan_vs_measured_gpu.py ]; then
    section "plan vs measured"
    step "plan_vs_measured_gpu" 140 bash -c "'$PY' tools/benchmarks/plan_vs_measured_gpu.py --out '$DIR/plan_vs_measured.json' | tee -a '$FIG'"
fi

echo "# total $SECONDS s; any step failed: $failed" >>"$FIG"
cat "$FIG"
exit $failed
