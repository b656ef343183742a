#!/usr/bin/env bash
# The GPU check in one command (docs/scaling.md, "The GPU check"):
#
#   bash scripts/gpu_check.sh --out DIR [--dry-run] [--budget-s S] [--parts a,b,...]
#   bash scripts/gpu_check.sh --print-wheels     # the pip command that downloads the wheels to carry
#
# On a GPU box without network: wheels found in .whl/ (downloaded beforehand with the command that
# --print-wheels prints) are installed with --no-deps into a private folder that goes first on
# PYTHONPATH; then benchmarks/bench_gpu.py checks versions and the device and runs every part in its
# own process and time limit, rewriting DIR/gpu_check.json and DIR/gpu_check.md after each part.
# With network, install vopd's environment instead (scripts/setup.sh) and leave .whl/ empty.
# --dry-run runs the same parts on CPU at shrunk shapes in the current environment (never installs
# .whl/; this is what CI runs). Exit status 0 = every part ok.
set -euo pipefail
cd "$(dirname "$0")/.."

out="" dry="" budget="" parts="" print_wheels=""
while [ $# -gt 0 ]; do
  case "$1" in
    --out) out="$2"; shift 2 ;;
    --dry-run) dry="--dry-run"; shift ;;
    --budget-s) budget="$2"; shift 2 ;;
    --parts) parts="$2"; shift 2 ;;
    --print-wheels) print_wheels=1; shift ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

# vopd's own environment when there is one (CI, a developer's machine), else the image's python3.
python="${VOPD_PYTHON:-}"
if [ -z "$python" ]; then
  if [ -x .venv/bin/python ]; then python=.venv/bin/python; else python=python3; fi
fi

if [ -n "$print_wheels" ]; then
  exec "$python" benchmarks/gpu_wheels.py
fi
if [ -z "$out" ]; then
  echo "gpu_check.sh: --out DIR is required (see --help)" >&2
  exit 2
fi
mkdir -p "$out"

# The carried wheels are for the GPU box's Python (3.12); a dry run uses the environment as it is.
if [ -z "$dry" ] && compgen -G ".whl/*.whl" >/dev/null; then
  site="${TMPDIR:-/tmp}/vopd-gpu-site"
  echo "[gpu_check] installing $(ls .whl/*.whl | wc -l) carried wheels into $site (no network, no dependencies)"
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl
  export PYTHONPATH="$site:$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
fi
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1

args=(--out "$out")
[ -n "$dry" ] && args+=("$dry")
[ -n "$budget" ] && args+=(--budget-s "$budget")
[ -n "$parts" ] && args+=(--parts "$parts")
exec "$python" benchmarks/bench_gpu.py "${args[@]}"
