#!/usr/bin/env bash
# Installs what is needed, then runs `thinkrl train` (no arguments: the built-in default recipe).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
exec thinkrl train "$@"
