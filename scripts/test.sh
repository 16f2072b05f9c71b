#!/usr/bin/env bash
# Installs what is needed, then runs lint and the test suite (CPU, tiny models, no network).
# With no arguments it then runs the engine, device and batch tests once more on this CPU made
# to look like an AVX2-only one (x86 with AVX2: MKL, oneDNN and ATen capped at AVX2, the C
# kernel built for haswell), so every machine checks the slowest CPU's paths too.
set -euo pipefail
THINKRL_EXTRAS=test
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ruff format --check thinkrl tests benchmarks scripts
ruff check thinkrl tests benchmarks scripts
python -m pytest -q "$@"
if [ $# -eq 0 ] && [ "$(uname -m)" = x86_64 ] && grep -qw avx2 /proc/cpuinfo; then
  echo "[test] again as on an AVX2-only CPU (MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 THINKRL_KERNEL_MARCH=haswell)"
  MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 THINKRL_KERNEL_MARCH=haswell \
    python -m pytest -q tests/rollout tests/test_device.py tests/trainer/test_batch.py
fi
