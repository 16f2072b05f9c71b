#!/usr/bin/env bash
# Installs what is needed, then runs lint and the test suite (CPU, tiny models, no network).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ruff check thinkrl tests benchmarks
exec python -m pytest -q "$@"
