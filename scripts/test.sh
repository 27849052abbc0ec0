#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the whole test suite on the CPU: real bitsandbytes, peft, TRL, accelerate.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
# llama.cpp itself, for tests/test_gguf_llamacpp.py: built from source once (a few minutes), not needed by the demo
python -c "import llama_cpp" 2>/dev/null || python -m pip install -q -e '.[dev,llamacpp]'
python -m pytest -q "$@"
