#!/usr/bin/env bash
# Everything the test suite needs, on a fresh machine (idempotent; reruns take seconds):
#
#   bash tools/setup_tests.sh && .venv/bin/python -m pytest -q tests
#
#   1. tools/setup_cpu.sh          .venv: torch 2.13.0 CPU, megatron-core, this package with its test extras
#   2. tools/setup_engine_venvs.sh .engine_venvs/{vllm,sglang}: the pinned engines' Python layers, isolated from
#                                  .venv, for the contract tests against their real classes
#   3. tools/setup_browser.sh      Debian's chromium, for the headless-browser test of tools/show_tokens.py
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_cpu.sh
bash tools/setup_engine_venvs.sh
bash tools/setup_browser.sh
