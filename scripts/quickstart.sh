#!/usr/bin/env bash
# The main job: BitFit-train three real tasks on all-MiniLM-L6-v2, compile once, serve, verify.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev --assets
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python examples/quickstart.py "$@"
