#!/usr/bin/env bash
# Checks thinkrl on a machine with a CUDA GPU, offline, in a few minutes:
#   scripts/gpu_check.sh [--wheels DIR] [--dry-run] [gpu_check.py options]
#
# The machine must already have torch (with CUDA), transformers, peft, accelerate, numpy, pyyaml,
# tqdm and matplotlib. thinkrl's other pure-Python dependencies come from DIR, a folder of
# wheels that scripts/gpu_wheels.sh fills on a machine with a package registry (<= 64 MiB);
# they are installed with pip --no-index, so nothing is fetched. thinkrl itself runs from this
# checkout (PYTHONPATH), not installed.
#
# Then scripts/gpu_check.py runs: the CUDA tests (pytest -m cuda tests/gpu), three GRPO steps on
# CUDA, and a 1-GPU speed benchmark (s/step, tokens/s, peak GPU memory) on random models of
# SmolLM2-135M's and Qwen2.5-1.5B's architectures. --dry-run only parses the options, builds
# the models on the meta device and prints the commands (it runs on a CPU, and needs no wheels).
# Options: python scripts/gpu_check.py --help.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
PY="${PYTHON:-python3}"
wheels=""
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --wheels) [ $# -ge 2 ] || { echo "gpu_check: --wheels needs a folder" >&2; exit 2; }; wheels="$2"; shift 2 ;;
    --wheels=*) wheels="${1#--wheels=}"; shift ;;
    *) args+=("$1"); shift ;;
  esac
done
dry=0
for a in "${args[@]+"${args[@]}"}"; do [ "$a" = "--dry-run" ] && dry=1; done

if [ -n "$wheels" ]; then
  [ -d "$wheels" ] || { echo "gpu_check: wheels folder $wheels does not exist" >&2; exit 2; }
  compgen -G "$wheels/*.whl" >/dev/null || { echo "gpu_check: no .whl files in $wheels (scripts/gpu_wheels.sh fills it)" >&2; exit 2; }
  # By name, not by file: a package the machine already has (packaging, say) is left as it is.
  names=()
  for f in "$wheels"/*.whl; do b="$(basename "$f")"; names+=("${b%%-*}"); done
  if [ "$dry" = 1 ]; then
    echo "[dry-run] would run: $PY -m pip install --no-index --find-links $wheels --no-deps ${names[*]}"
  else
    echo "[wheels] installing what is missing of ${#names[@]} packages from $wheels (no index)"
    "$PY" -m pip install --quiet --no-index --find-links "$wheels" --no-deps "${names[@]}"
  fi
fi

# What the machine must bring itself: fail now, with the list, rather than mid-run.
missing="$("$PY" - <<'PYEOF'
import importlib.util
need = ["torch", "transformers", "peft", "accelerate", "numpy", "yaml", "tqdm", "matplotlib", "pytest"]
print(" ".join(m for m in need if importlib.util.find_spec(m) is None))
PYEOF
)"
if [ -n "$missing" ]; then
  echo "gpu_check: missing Python packages: $missing (install them, or add their wheels to --wheels)" >&2
  exit 2
fi

export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
cd "$repo"
exec "$PY" "$here/gpu_check.py" "${args[@]+"${args[@]}"}"
