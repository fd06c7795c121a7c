#!/usr/bin/env bash
# The main job: BitFit-train three real tasks on all-MiniLM-L6-v2, compile once, serve, verify.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev --assets
bash scripts/setup_web.sh || true  # without a browser the example still exports the site, and says why it was not opened
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python examples/quickstart.py "$@"
