#!/usr/bin/env bash
# Build the isolated virtualenvs of the engine contract tests (tests/test_contract_engines.py):
#
#   bash tools/setup_engine_venvs.sh              # .engine_venvs/vllm and .engine_venvs/sglang
#   bash tools/setup_engine_venvs.sh vllm         # one of them
#
# Each venv holds the CPU torch of .venv (torch==2.13.0), the pinned engine installed with --no-deps (its own
# dependency list would pull a CUDA torch and GPU kernels), and the light packages its Python layer imports
# (what `import vllm.v1.serial_utils`, `sglang.srt.server_args`, ... need; found by importing, listed below).
# Every install runs under a constraint file that pins torch, so nothing can replace it. .venv is never
# touched. A venv is rebuilt only when this script's pins change (a stamp file records them); pip's cache
# makes a rebuild fast.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
ROOT_DIR=${FIPO_ENGINE_VENVS:-.engine_venvs}

VLLM_PIN="vllm==0.32.0"
VLLM_DEPS=(numpy packaging regex cloudpickle msgspec pyzmq "pydantic>=2.12" pillow cbor2 psutil urllib3
           "transformers>=5.16.1,<5.20" aiohttp requests openai-harmony openai pybase64 cachetools uvloop
           py-cpuinfo prometheus_client)
SGLANG_PIN="sglang==0.5.23"
SGLANG_DEPS=(numpy orjson psutil pybase64 requests triton packaging pillow starlette msgspec pydantic pyzmq
             tqdm ipython aiohttp uvloop "transformers==5.19.0")

constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
echo "torch==$TORCH_VERSION" > "$constraints"

# pip reports the engine's uninstalled GPU dependencies as conflicts: expected with --no-deps. Those lines
# (and the index notices of this machine's pip configuration) are dropped; a failing pip still fails here.
pip_quiet() {
  local expected="^WARNING: Location|^ERROR: pip's dependency resolver|which is not installed"
  expected="$expected|but you have .* which is incompatible"
  { "$@" 2>&1; } | { grep -v -E "$expected" || true; }
}

build() {
  local name=$1 pin=$2; shift 2
  local dir="$ROOT_DIR/$name"
  local spec="torch==$TORCH_VERSION $pin $* $($PY -c 'import sys; print(sys.version.split()[0])')"
  if [ -f "$dir/.built" ] && [ "$(cat "$dir/.built")" = "$spec" ]; then
    echo "$dir is up to date ($pin)"
    return
  fi
  rm -rf "$dir"
  "$PY" -m venv "$dir"
  local vpy="$dir/bin/python"
  PIP_CONSTRAINT="$constraints" pip_quiet "$vpy" -m pip install -q "torch==$TORCH_VERSION"
  PIP_CONSTRAINT="$constraints" pip_quiet "$vpy" -m pip install -q --no-deps "$pin"
  PIP_CONSTRAINT="$constraints" pip_quiet "$vpy" -m pip install -q "$@"
  echo "$spec" > "$dir/.built"
  "$vpy" -c "import torch, importlib.metadata as m; print('$dir ready: torch', torch.__version__, '$name', m.version('$name'))"
}

engines=("$@")
[ ${#engines[@]} -eq 0 ] && engines=(vllm sglang)
for engine in "${engines[@]}"; do
  case "$engine" in
    vllm) build vllm "$VLLM_PIN" "${VLLM_DEPS[@]}" ;;
    sglang) build sglang "$SGLANG_PIN" "${SGLANG_DEPS[@]}" ;;
    *) echo "unknown engine $engine (vllm or sglang)" >&2; exit 2 ;;
  esac
done
