#!/usr/bin/env bash
# Static checks, as CI runs them: ruff (style, imports, bug patterns) over the whole tree and
# mypy over the packages (configuration for both in pyproject.toml). Expects scripts/setup.sh's .venv.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff check .
.venv/bin/mypy
