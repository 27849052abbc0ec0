# Sourced (inside the active venv) by setup.sh and test.sh: `install ARGS...` installs Python packages with uv, falling
# back to pip. uv (PyPI's `uv` wheel, put into the venv) resolves, unpacks and byte-compiles in parallel: the whole
# set-up (torch, qtune[dev], lm-eval) takes about a minute on 2 cores instead of 5-7 with pip. Byte-compiling at install
# (as pip does) matters: where PYTHONDONTWRITEBYTECODE is set (as on the CI machines), Python never caches what it
# compiles at import, and every test subprocess would compile torch and transformers again (the suite took 22 minutes
# instead of 13 without it). uv reads no pip configuration, so what this machine's pip is set to use is handed over:
# its local wheel folders (find-links: where the CPU torch wheel lies), its constraints file, and the system's
# certificates (a TLS-inspecting proxy's CA is trusted there, not in uv's built-in roots).
export UV_SYSTEM_CERTS=1 UV_COMPILE_BYTECODE=1
__pip_conf() { python -m pip config get "global.$1" 2>/dev/null || true; }
if [ -z "${UV_FIND_LINKS:-}" ]; then
  UV_FIND_LINKS="$(__pip_conf find-links | tr ' ' '\n' | grep -v '^$' | while read -r d; do [ -e "$d" ] && echo "$d"; done | tr '\n' ' ')"
  UV_FIND_LINKS="${UV_FIND_LINKS% }"
  [ -z "$UV_FIND_LINKS" ] || export UV_FIND_LINKS
fi
if [ -z "${UV_CONSTRAINT:-}" ]; then
  UV_CONSTRAINT="$(__pip_conf constraint)"
  [ -n "$UV_CONSTRAINT" ] && [ -f "$UV_CONSTRAINT" ] && export UV_CONSTRAINT || unset UV_CONSTRAINT
fi
install() {
  if { command -v uv >/dev/null || python -m pip install -q uv; } && uv pip install -q "$@"; then
    return 0
  fi
  echo "scripts/install.sh: uv could not install $* — trying pip" >&2
  python -m pip install -q "$@"
}
