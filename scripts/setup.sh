#!/usr/bin/env bash
# Create .venv (if missing) and install qtune with its dev tools, CPU torch first.
# The CPU wheel of torch 2.13 lies on these machines' disk; a plain `torch` requirement would pull a
# multi-GB CUDA build. On a GPU machine, install the torch build for your CUDA first instead.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -c "import torch" 2>/dev/null || python -m pip install -q torch==2.13.0
python -m pip install -q -e '.[dev]'
