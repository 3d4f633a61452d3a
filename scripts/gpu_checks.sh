#!/usr/bin/env bash
# The checks that need a CUDA device (issues 13 and 16, the CUDA capture tests), as one script for a
# lent GPU machine: the CUDA tests, then the compiled-model and device-statistics benchmarks. Needs the
# package importable (pip install -e . or PYTHONPATH) and writes logs under ${OUT:-/tmp/gpu_checks}.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_checks}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
nvidia-smi -L
$PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
timeout 300 $PY -m pytest -q -p no:cacheprovider tests/test_cuda.py -rA 2>&1 | tee "$OUT/test_cuda.log" | tail -25
timeout 240 $PY benchmarks/bench_compiled.py --device cuda --layers ${LAYERS:-4} --iters 20 --json "$OUT/bench_compiled.json" \
    2>&1 | grep -v Warning | tee "$OUT/bench_compiled.log" | tail -12
# mode "stats": device statistics read back once per step against once per tensor (issue 13)
timeout 300 $PY benchmarks/bench_device_stats.py --device cuda --layers ${LAYERS:-8} --rounds 20 --json "$OUT/bench_device_stats.json" \
    2>&1 | grep -v Warning | tee "$OUT/bench_device_stats.log" | tail -10
