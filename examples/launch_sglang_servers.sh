#!/usr/bin/env bash
# SGLang servers for disaggregated rollouts (rollout.engine: sglang_server): NUM_SERVERS servers of TP_SIZE GPUs
# each on this node, on ports PORT, PORT+1, ...  Run it on every rollout node, inside SGLang's official image
# (the trainer image has no SGLang; docs/containers.md) or any Python environment with sglang installed:
#
#   docker run --gpus all --ipc=host --network=host --shm-size 32g -v /models:/models -v $PWD:/fipo \
#       -e MODEL=/models/Qwen2.5-Math-7B -e NUM_SERVERS=4 -e TP_SIZE=2 \
#       lmsysorg/sglang:v0.5.23 bash /fipo/examples/launch_sglang_servers.sh
#   MODEL=/models/Qwen2.5-32B NUM_SERVERS=2 TP_SIZE=4 bash examples/launch_sglang_servers.sh     (bare metal)
#
# Env: MODEL (required: the HF directory the trainer's model.path names, same weights), NUM_SERVERS (default
# GPUS_PER_NODE / TP_SIZE), TP_SIZE (1), GPUS_PER_NODE (8), PORT (30000, first server), HOST (0.0.0.0: where
# they listen), ADVERTISE_HOST (this host's name as the trainer reaches it; default `hostname -f`), MEM_FRACTION
# (0.85), DTYPE (bfloat16), CONTEXT_LENGTH (default: the model's), SEED (1), LOG_DIR (runs/sglang_servers),
# EXTRA_ARGS (more `sglang.launch_server` flags), DRY_RUN=1 (print the commands, start nothing).
#
# The settings the trainer expects (fipo_megatron/rollout/sglang_engine.py, docs/rollout.md):
# - --skip-tokenizer-init: token ids in and out, as the colocated engine runs;
# - --dtype bfloat16: the dtype the trainer's weight sync broadcasts;
# - weights: every server's GPU workers join the trainer's weight-sync group when the trainer calls
#   /init_weights_update_group at start-up; set rollout.engine_kwargs.weight_sync.engine_world_size to TP_SIZE
#   (a server's GPU count), and make weight_sync.master_port on the trainer's rank-0 host reachable from here;
# - no --enable-memory-saver: the servers own their GPUs, so the trainer's release/resume_memory_occupation
#   calls leave their memory in place;
# - SGLANG_RETURN_ORIGINAL_LOGPROB unset: returned log-probs are those of the temperature-scaled distribution,
#   the convention the trainer recomputes.
# The script prints the rollout.engine_kwargs.base_urls override for this node, waits until every server answers
# /health, then waits on them; Ctrl-C or TERM stops the servers it started (by their PIDs) and nothing else.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${MODEL:?set MODEL to the HF model directory that model.path names in the trainer config}
TP_SIZE=${TP_SIZE:-1}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
PORT=${PORT:-30000}
HOST=${HOST:-0.0.0.0}
ADVERTISE_HOST=${ADVERTISE_HOST:-$(hostname -f 2>/dev/null || hostname)}
MEM_FRACTION=${MEM_FRACTION:-0.85}
DTYPE=${DTYPE:-bfloat16}
SEED=${SEED:-1}
LOG_DIR=${LOG_DIR:-runs/sglang_servers}
positive() {  # NAME VALUE
  if ! [[ $2 =~ ^[1-9][0-9]*$ ]]; then echo "$1 must be a positive integer, got \"$2\"" >&2; exit 2; fi
}
positive TP_SIZE "$TP_SIZE"; positive GPUS_PER_NODE "$GPUS_PER_NODE"
NUM_SERVERS=${NUM_SERVERS:-$((GPUS_PER_NODE / TP_SIZE))}
positive NUM_SERVERS "$NUM_SERVERS"
positive PORT "$PORT"; positive SEED "$SEED"
if [ $((NUM_SERVERS * TP_SIZE)) -gt "$GPUS_PER_NODE" ]; then
  echo "NUM_SERVERS x TP_SIZE = $NUM_SERVERS x $TP_SIZE = $((NUM_SERVERS * TP_SIZE)) GPUs, but GPUS_PER_NODE=$GPUS_PER_NODE" >&2
  exit 2
fi
unset SGLANG_RETURN_ORIGINAL_LOGPROB

PIDS=()
stop() { for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done; }
trap stop INT TERM
mkdir -p "$LOG_DIR"
URLS=()
for ((i = 0; i < NUM_SERVERS; i++)); do
  port=$((PORT + i))
  cmd=(python -m sglang.launch_server --model-path "$MODEL" --host "$HOST" --port "$port"
       --tp-size "$TP_SIZE" --base-gpu-id $((i * TP_SIZE)) --dtype "$DTYPE" --mem-fraction-static "$MEM_FRACTION"
       --random-seed $((SEED + i)) --skip-tokenizer-init)
  [ -n "${CONTEXT_LENGTH:-}" ] && cmd+=(--context-length "$CONTEXT_LENGTH")
  # shellcheck disable=SC2206  # EXTRA_ARGS is a list of flags, split on purpose
  [ -n "${EXTRA_ARGS:-}" ] && cmd+=($EXTRA_ARGS)
  URLS+=("http://$ADVERTISE_HOST:$port")
  if [ "${DRY_RUN:-0}" = 1 ]; then
    echo "${cmd[*]}"
    continue
  fi
  "${cmd[@]}" > "$LOG_DIR/server_$port.log" 2>&1 &
  PIDS+=($!)
  echo "server $i: GPUs $((i * TP_SIZE))-$(((i + 1) * TP_SIZE - 1)), port $port, pid $!, log $LOG_DIR/server_$port.log" >&2
done
LIST=$(IFS=,; echo "${URLS[*]}")
echo "rollout.engine_kwargs.base_urls=[$LIST] rollout.engine_kwargs.weight_sync.engine_world_size=$TP_SIZE"
[ "${DRY_RUN:-0}" = 1 ] && exit 0

for url in "${URLS[@]}"; do
  until curl -sf "$url/health" > /dev/null; do
    for pid in "${PIDS[@]}"; do
      kill -0 "$pid" 2>/dev/null || { echo "a server exited before it was healthy (see $LOG_DIR)" >&2; stop; exit 1; }
    done
    sleep 5
  done
  echo "$url healthy" >&2
done
wait
