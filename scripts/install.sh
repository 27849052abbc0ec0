# Sourced (inside the active venv) by setup.sh and test.sh: `install ARGS...` installs Python packages with uv, falling
# back to pip. uv (PyPI's `uv` wheel, put into the venv) resolves, unpacks and byte-compiles in parallel: the whole
# set-up (torch, qtune[dev], lm-eval) takes about a minute on 2 cores instead of 5-7 with pip. Byte-compiling at install
# (as pip does; UV_COMPILE_BYTECODE=0 skips it) matters: where PYTHONDONTWRITEBYTECODE is set (as on the CI machines),
# Python never caches what it compiles at import, and every new process compiles torch and transformers again (the
# test suite took 22 minutes instead of 13 that way; scripts/test.sh instead lets Python cache what it imports).
# uv reads no pip configuration, so what this machine's pip is set to use is handed over: its local wheel folders
# (find-links: where the CPU torch wheel lies), its constraints file, and the system's certificates (a TLS-inspecting
# proxy's CA is trusted there, not in uv's built-in roots).
export UV_SYSTEM_CERTS=1 UV_COMPILE_BYTECODE="${UV_COMPILE_BYTECODE:-1}"
# The existing local paths pip is configured with under KEY (in any of its config files or PIP_* variables; `pip
# config get` answers only for a key set in one place), joined by SEPARATOR.
__pip_paths() {
  { python -m pip config list 2>/dev/null || true; } | sed -n "s/^[^.]*\.$1='\(.*\)'\$/\1/p" | tr ' ' '\n' |
    sed 's|^file://||' | sort -u | while read -r path; do if [ -e "$path" ]; then printf '%s\n' "$path"; fi; done |
    paste -sd "$2" -
}
[ -n "${UV_FIND_LINKS:-}" ] || UV_FIND_LINKS="$(__pip_paths find-links ,)"  # uv: comma-separated
[ -n "${UV_CONSTRAINT:-}" ] || UV_CONSTRAINT="$(__pip_paths constraint ' ')"  # uv: space-separated
[ -z "$UV_FIND_LINKS" ] || export UV_FIND_LINKS
[ -z "$UV_CONSTRAINT" ] || export UV_CONSTRAINT
install() {
  if { command -v uv >/dev/null || python -m pip install -q uv; } && uv pip install -q "$@"; then
    return 0
  fi
  echo "scripts/install.sh: uv could not install $* — trying pip" >&2
  python -m pip install -q "$@"
}
