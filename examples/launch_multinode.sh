#!/usr/bin/env bash
# Generic multi-node launcher: one torchrun per node, 8 GPUs each (run the same command on every node).
#
#   NNODES=4 NODE_RANK=0 MASTER_ADDR=10.0.0.1 MASTER_PORT=29500 \
#     bash examples/launch_multinode.sh examples/configs/qwen2.5_32b_fipo.yaml [dotted.key=value ...]
#
# Env: NNODES (default 1), NODE_RANK (0), MASTER_ADDR (127.0.0.1), MASTER_PORT (29500), GPUS_PER_NODE (8),
# RUN_DIR (default runs/<config name>; must be on a filesystem every node sees: checkpoints are written by all
# ranks and renamed by rank 0). ALGO=dapo switches the loss to the DAPO baseline (loss_mode=dapo) and
# its run directory. The script starts torchrun and nothing else, and stops nothing it did not start.
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${1:?usage: launch_multinode.sh CONFIG.yaml [overrides...]}
shift
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
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
mkdir -p "$RUN_DIR"
# NCCL over InfiniBand where present; CUDA_DEVICE_MAX_CONNECTIONS=1 lets TP/SP comm overlap compute in order.
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}

exec python -m torch.distributed.run --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$GPUS_PER_NODE" \
  --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" \
  -m fipo_megatron --config "$CONFIG" trainer.run_dir="$RUN_DIR" "${EXTRA[@]}" "$@"
