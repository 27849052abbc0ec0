#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the whole test suite on the CPU: real bitsandbytes, peft, TRL, accelerate.
set -euo pipefail
cd "$(dirname "$0")/.."
t0=$(date +%s)
phase() { echo "test.sh: $1 at +$(( $(date +%s) - t0 ))s"; }  # where set-up time goes, in the CI log
# llama.cpp itself, for tests/test_gguf_llamacpp.py: built from source once (a few minutes), not needed by the demo.
# The wheel is kept in a cache folder ($QTUNE_WHEELS, default ~/.cache/qtune-wheels, one folder per build flags), so
# a second checkout or a fresh venv on the same machine installs it in seconds instead of building it again.
# GGML_NATIVE=OFF: a native build on an AMX CPU (Sapphire Rapids) segfaulted in llama_decode here; the portable one runs.
# LLAVA_BUILD=OFF: llama-cpp-python's multimodal library (libmtmd) is never loaded by `import llama_cpp` or for the text
# models qtune exports; scripts/llama-cpp-build.cmake switches off llama.cpp's `common` library, which only libmtmd
# uses (46% of the compile). CMAKE_UNITY_BUILD: compiles llama.cpp's ~140 source files in a few dozen batches, each
# parsing the shared headers once. -O0: the tests run llama.cpp on tiny models only (each call well under a second
# either way). Together: 3.0 CPU-minutes, 1 min 56 s on 2 cores, instead of 7.2 CPU-minutes, 4 min 13 s (measured here).
# Its source distribution is fetched once (PyPI) and also feeds tests/corpus.py: llama.cpp's real tokenizers and
# the released models' chat templates it vendors are the real-template tests' corpus.
WHEELS="${QTUNE_WHEELS:-${XDG_CACHE_HOME:-$HOME/.cache}/qtune-wheels}"
export QTUNE_LCPP_SDIST="$WHEELS/llama_cpp_python-0.3.36.tar.gz"
flags="${CMAKE_ARGS:--DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF -DCMAKE_UNITY_BUILD=ON -DCMAKE_C_FLAGS_RELEASE=-O0 -DCMAKE_CXX_FLAGS_RELEASE=-O0}"
export CMAKE_ARGS="$flags -DCMAKE_PROJECT_INCLUDE=$PWD/scripts/llama-cpp-build.cmake"
built="$WHEELS/$( { printf %s "$flags"; cat scripts/llama-cpp-build.cmake; } | sha256sum | cut -c1-12)"  # one per build
mkdir -p "$WHEELS"
# The download and the compile need only the system python3 and cmake, not the venv: on a fresh machine they run in
# the background while setup.sh installs the Python packages.
fetch_and_build() {
  [ -f "$QTUNE_LCPP_SDIST" ] || python3 -m pip download -q --no-deps --no-binary llama-cpp-python 'llama-cpp-python==0.3.36' -d "$WHEELS"
  touch "$fetched"
  if ! { [ -x .venv/bin/python ] && .venv/bin/python -c "import llama_cpp" 2>/dev/null; }; then
    ls "$built"/llama_cpp_python-*.whl >/dev/null 2>&1 || python3 -m pip wheel -q --no-deps "$QTUNE_LCPP_SDIST" -w "$built"
  fi
}
build_log="$(mktemp)"
fetched="$build_log.fetched"  # the sdist is complete (the corpus build below reads it)
fetch_and_build >"$build_log" 2>&1 &
build_pid=$!
# Debian's chromium, for tests/test_eval.py's check of report.html in a real headless browser (it loads the page and
# reads what it renders); installed once, in the background too (mostly download and unpack). CI runs as root;
# without chromium that test is skipped, saying so.
install_chromium() {
  [ ! -x /usr/bin/chromium ] || return 0
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium
  else
    echo "scripts/test.sh: no /usr/bin/chromium (apt-get install chromium): the report.html browser test is skipped"
  fi
}
chromium_log="$(mktemp)"
install_chromium >"$chromium_log" 2>&1 &
chromium_pid=$!
# Bytecode: the suite imports about half of the venv's modules (10,400 of 22,000 .py files in site-packages, counted
# in .venv/pycache after a run), so instead of compiling every module at install (2 CPU-minutes), Python compiles what
# is imported, once, into .venv/pycache (PYTHONPYCACHEPREFIX: no __pycache__ folders beside the sources, in the venv or
# in the tests' own folders), also where PYTHONDONTWRITEBYTECODE is set (the CI machines set it: then every test
# subprocess compiled torch again).
export UV_COMPILE_BYTECODE=0 PYTHONPYCACHEPREFIX="$PWD/.venv/pycache"
unset PYTHONDONTWRITEBYTECODE
# lm-evaluation-harness, for tests/test_harness.py (`qtune eval --tasks`): the `harness` extra, kept out of dev (and so
# out of the demo's setup), resolved together with dev: 38 packages, 64 MB download, 284 MB installed.
bash scripts/setup.sh harness
. .venv/bin/activate
. scripts/install.sh
phase "venv ready"
# GPT-QModel, for the gptq backend's tests: gptqmodel 7.7 declares torch>=2.14.1 (pip would swap in a multi-GB CUDA
# torch), so what it imports is installed first and gptqmodel itself without dependencies (extra `gptq` on a GPU).
python -c "import gptqmodel, optimum.gptq" 2>/dev/null || {
  install optimum threadpoolctl device-smi pypcre tokenicer logbar defuser
  install --no-deps --no-build-isolation 'gptqmodel==7.7.0'
}
phase "gptqmodel installed"
# The real-template test corpus (tests/corpus.py: four GGUF vocabularies of the sdist turned into tokenizers, about a
# CPU-minute) is built now, while llama.cpp finishes compiling on less than both cores; the tests then find it done.
# If it fails here, the tests build it again and say why.
corpus_pid=""
if [ -f "$fetched" ]; then
  python tests/corpus.py >"$build_log.corpus" 2>&1 &
  corpus_pid=$!
fi
if ! wait "$build_pid"; then
  cat "$build_log" >&2
  echo "scripts/test.sh: fetching or building llama-cpp-python failed (log above)" >&2
  exit 1
fi
if [ -n "$corpus_pid" ] && ! wait "$corpus_pid"; then
  tail -5 "$build_log.corpus" >&2
  echo "scripts/test.sh: building the template corpus failed (above); the tests will try again" >&2
fi
rm -f "$build_log" "$fetched" "$build_log.corpus"
python -c "import llama_cpp" 2>/dev/null || install "$built"/llama_cpp_python-*.whl
if ! wait "$chromium_pid"; then
  cat "$chromium_log" >&2
  echo "scripts/test.sh: installing chromium failed (log above): the report.html browser test will be skipped" >&2
  [ -z "${CI:-}" ] || exit 1  # CI must run it
fi
grep -h "browser test is skipped" "$chromium_log" >&2 || true
rm -f "$chromium_log"
phase "llama.cpp, chromium and the template corpus ready"
# Two workers (pytest-xdist): a test runs on one core (OMP_NUM_THREADS=1), so the 2-core CI machine runs two at a
# time. loadgroup keeps the tests that share an expensive fixture on one worker (tests/conftest.py). Arguments
# come after, so `bash scripts/test.sh -n 0` runs in one process and `-n auto` uses every core.
python -m pytest -q -n 2 --dist loadgroup "$@"
