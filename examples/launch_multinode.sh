#!/usr/bin/env bash
# Generic multi-node launcher: one torchrun per node, 8 GPUs each (run the same command on every node).
#
#   NNODES=4 NODE_RANK=0 MASTER_ADDR=10.0.0.1 MASTER_PORT=29500 \
#     bash examples/launch_multinode.sh examples/configs/qwen2.5_32b_fipo.yaml [dotted.key=value ...]
#
# Env: NNODES (default 1), NODE_RANK and MASTER_ADDR (rank 0's host; both required when NNODES > 1, 0 and
# 127.0.0.1 on one node), MASTER_PORT (29500), GPUS_PER_NODE (8),
# RUN_DIR (default runs/<config name>; must be on a filesystem every node sees: checkpoints are written by all
# ranks and renamed by rank 0). ALGO=dapo switches the loss to the DAPO baseline (loss_mode=dapo) and
# its run directory. DRY_RUN=1 prints the torchrun command instead of running it. The script starts torchrun
# and nothing else, and stops nothing it did not start.
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${1:?usage: launch_multinode.sh CONFIG.yaml [overrides...]}
shift
NNODES=${NNODES:-1}
if ! [[ $NNODES =~ ^[1-9][0-9]*$ ]]; then
  echo "NNODES must be a positive integer, got \"$NNODES\"" >&2; exit 2
fi
if [ "$NNODES" -gt 1 ]; then
  # Every node must name the same rank-0 host; a default of 127.0.0.1 would leave each node waiting for itself.
  if [ -z "${MASTER_ADDR:-}" ]; then
    echo "MASTER_ADDR is not set: with NNODES=$NNODES every node needs rank 0's host (MASTER_ADDR=<node 0>)" >&2; exit 2
  fi
  if [ -z "${NODE_RANK:-}" ]; then
    echo "NODE_RANK is not set: with NNODES=$NNODES give each node its rank, 0..$((NNODES - 1))" >&2; exit 2
  fi
fi
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
if ! [[ $NODE_RANK =~ ^[0-9]+$ ]] || [ "$NODE_RANK" -ge "$NNODES" ]; then
  echo "NODE_RANK must be in 0..$((NNODES - 1)), got \"$NODE_RANK\"" >&2; exit 2
fi
MASTER_PORT=${MASTER_PORT:-29500}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
ALGO=${ALGO:-fipo}
NAME=$(basename "$CONFIG" .yaml)
EXTRA=()
if [ "$ALGO" = "dapo" ]; then
  NAME=${NAME%_fipo}_dapo
  EXTRA+=(actor.loss_mode=dapo trainer.experiment_name="$NAME")
elif [ "$ALGO" != "fipo" ]; then
  echo "ALGO must be fipo or dapo, got $ALGO" >&2; exit 2
fi
RUN_DIR=${RUN_DIR:-runs/$NAME}
# NCCL over InfiniBand where present; CUDA_DEVICE_MAX_CONNECTIONS=1 lets TP/SP comm overlap compute in order.
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}

CMD=(python -m torch.distributed.run --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$GPUS_PER_NODE"
  --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT"
  -m fipo_megatron --config "$CONFIG" trainer.run_dir="$RUN_DIR" "${EXTRA[@]}" "$@")
if [ "${DRY_RUN:-0}" = 1 ]; then
  echo "${CMD[*]}"; exit 0
fi
mkdir -p "$RUN_DIR"
exec "${CMD[@]}"
