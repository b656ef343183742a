#!/usr/bin/env bash
# Set up a virtual environment in .venv with a CPU PyTorch and vision-opd (+ test extras).
# Usage: bash scripts/setup.sh [extras]   (default extras: test)
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-test}"
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# torch first, pinned: an unpinned torch pulls a multi-GB CUDA build. Never install torchvision.
.venv/bin/pip install -q --disable-pip-version-check "torch==2.13.0"
.venv/bin/pip install -q --disable-pip-version-check -e ".[${extras}]"
.venv/bin/python -c "import torch, transformers, vopd; print('vision-opd', vopd.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__)"
