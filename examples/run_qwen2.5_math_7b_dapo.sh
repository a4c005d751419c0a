#!/usr/bin/env bash
# DAPO baseline beside FIPO: the 7B-MATH recipe with loss_mode=dapo, run dir runs/qwen2.5_math_7b_dapo.
#   NNODES=1 bash examples/run_qwen2.5_math_7b_dapo.sh
set -euo pipefail
ALGO=dapo exec bash "$(dirname "$0")/launch_multinode.sh" "$(dirname "$0")/configs/qwen2.5_math_7b_fipo.yaml" "$@"
