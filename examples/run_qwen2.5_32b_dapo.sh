#!/usr/bin/env bash
# DAPO baseline beside FIPO: the 32B recipe with loss_mode=dapo (f = 1), run dir runs/qwen2.5_32b_dapo.
#   NNODES=4 NODE_RANK=<0..3> MASTER_ADDR=<node0> MASTER_PORT=29500 bash examples/run_qwen2.5_32b_dapo.sh
set -euo pipefail
ALGO=dapo exec bash "$(dirname "$0")/launch_multinode.sh" "$(dirname "$0")/configs/qwen2.5_32b_fipo.yaml" "$@"
