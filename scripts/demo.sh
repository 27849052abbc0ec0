#!/usr/bin/env bash
# The offline demo: set up (scripts/setup.sh), then fine-tune a tiny random model with the real `qtune train`
# and show held-out accuracy before and after. Arguments go to scripts/demo.py (--quick, --out DIR, --seed N).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
python scripts/demo.py "$@"
