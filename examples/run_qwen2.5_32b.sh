#!/usr/bin/env bash
# FIPO, Qwen2.5-32B-Base, 20480-token responses, 4+ nodes of 8xH100 (TP8 x PP2 x CP2 per replica).
#   NNODES=4 NODE_RANK=<0..3> MASTER_ADDR=<node0> MASTER_PORT=29500 bash examples/run_qwen2.5_32b.sh
# DAPO baseline: ALGO=dapo NNODES=4 ... bash examples/run_qwen2.5_32b.sh   (or run_qwen2.5_32b_dapo.sh)
# Layout and memory arithmetic: examples/configs/qwen2.5_32b_fipo.yaml.
set -euo pipefail
exec bash "$(dirname "$0")/launch_multinode.sh" "$(dirname "$0")/configs/qwen2.5_32b_fipo.yaml" "$@"
