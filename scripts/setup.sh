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
. scripts/install.sh  # `install`: uv, with pip's local wheels and constraints; pip if uv fails
python -c "import torch" 2>/dev/null || install torch==2.13.0
# Extras named as arguments join dev in one resolve (test.sh: `setup.sh harness`).
extras="dev"
for extra in "$@"; do extras="$extras,$extra"; done
install -e ".[$extras]"
