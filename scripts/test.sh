#!/usr/bin/env bash
# Run the test suite (tiny random models built from configs: no downloads).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev
bash scripts/setup_web.sh || true  # the browser tests skip, saying why, where it cannot set up (CI requires them)
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m pytest "$@"
