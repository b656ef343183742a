#!/usr/bin/env bash
# Set up (if needed) and run the CPU toy-world demo. The README's main command.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/vopd demo --out "${1:-runs/demo}" "${@:2}"
