#!/usr/bin/env bash
# Set everything up, then run the whole test suite: the default tier, then the slow tiers
# (each its own step). Extra arguments go to the default tier's pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
echo "== default tier"
.venv/bin/python -m pytest -q -m "not slow and not vllm" "$@"
echo "== slow tier: multi-rank capture under torchrun"
.venv/bin/python -m pytest -q -m slow
