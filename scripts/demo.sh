#!/usr/bin/env bash
# Set everything up, then capture the tiny demo model in float32 and bfloat16 and compare them.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ilstore demo --output-dir "${1:-demo_runs}"
