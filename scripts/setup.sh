#!/usr/bin/env bash
# Create .venv (if needed) and install ilstore with its test and demo extras.
# torch is pinned here (the package itself accepts a range): this resolves to the local CPU wheel.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test,lint]'
# The compare's metrics kernel, compiled now rather than at the first compare (no compiler: the
# torch path is used, with the same verdicts; see docs/compare.md).
.venv/bin/ilstore-compare --build-kernel || echo "setup: no C compiler for the compare kernel; torch computes the metrics"
# The statistics kernel of capture (mode "stats" and tensors mode's statistics), compiled now
# rather than in the first capture's first hook (~1 s); no compiler: a numpy path with the same
# bits, several times slower (see docs/performance.md).
.venv/bin/python -c "from ilstore import _stats_kernel; print(_stats_kernel.LIBRARY.build())" \
    || echo "setup: no C compiler for the statistics kernel; numpy computes the statistics (slower, same values)"
