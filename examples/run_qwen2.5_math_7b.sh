#!/usr/bin/env bash
# FIPO, Qwen2.5-Math-7B (7B-MATH recipe), one or more nodes of 8xH100 (TP4 x CP2 per replica, DP = nodes).
#   NNODES=1 bash examples/run_qwen2.5_math_7b.sh
#   NNODES=2 NODE_RANK=<0|1> MASTER_ADDR=<node0> MASTER_PORT=29500 bash examples/run_qwen2.5_math_7b.sh
# Layout and memory arithmetic: examples/configs/qwen2.5_math_7b_fipo.yaml.
set -euo pipefail
exec bash "$(dirname "$0")/launch_multinode.sh" "$(dirname "$0")/configs/qwen2.5_math_7b_fipo.yaml" "$@"
