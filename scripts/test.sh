#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the whole test suite on the CPU: real bitsandbytes, peft, TRL, accelerate.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
python -m pytest -q "$@"
