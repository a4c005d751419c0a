#!/usr/bin/env bash
# Set up the CPU development environment in ./.venv (idempotent).
#
#   bash tools/setup_cpu.sh
#
# torch is installed first and pinned to the local CPU build (torch==2.13.0); every later install runs
# under a constraint file so that no dependency can pull a CUDA torch (several GB) onto a CPU machine.
# Never install transformer-engine, apex, sglang or vllm here: they need CUDA and would replace torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
"$VPY" -m pip install -q --upgrade pip
if ! "$VPY" -c "import torch, sys; sys.exit(0 if torch.__version__.split('+')[0] == '$TORCH_VERSION' else 1)" 2>/dev/null; then
  "$VPY" -m pip install -q "torch==$TORCH_VERSION"
fi
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
echo "torch==$TORCH_VERSION" > "$constraints"
PIP_CONSTRAINT="$constraints" "$VPY" -m pip install -q -e ".[test]"
"$VPY" - <<'PYEOF'
import torch, megatron.core, transformers
print(f"fipo_megatron env ready: torch {torch.__version__}, megatron-core {megatron.core.__version__}, "
      f"transformers {transformers.__version__}, cuda={torch.cuda.is_available()}")
PYEOF
