#!/usr/bin/env bash
# Set everything up, then run the whole test suite: lint (ruff, mypy), the docstring examples, the
# default tier, then the slow tiers, each its own step. Extra arguments go to the default tier's
# pytest. ILSTORE_SKIP_VLLM=1 skips the vLLM tier (it needs its own cached venv, .venv-vllm:
# ~2 minutes and ~3.5 GB the first time).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
echo "== lint: ruff and mypy"
bash scripts/lint.sh
echo "== doctests: the examples in the packages' docstrings"
.venv/bin/python -m pytest -q --doctest-modules ilstore ilstore_compare schemas
echo "== default tier"
.venv/bin/python -m pytest -q -m "not slow and not vllm" "$@"
echo "== slow tier: multi-rank capture under torchrun, long runs, killed processes, compiles, the benchmark scripts"
.venv/bin/python -m pytest -q -m slow
if [ "${ILSTORE_SKIP_VLLM:-0}" != "1" ]; then
  echo "== vllm tier: the plug-in and the example script against real vLLM (CPU build)"
  bash scripts/setup_vllm.sh
  .venv/bin/python -m pytest -q -m vllm
fi
