#!/usr/bin/env bash
# Installs, builds and runs the whole test suite (GoogleTest via CTest + the PyTorch oracle).
# Usage: scripts/test.sh [preset]   (release by default; asan for the sanitizer build)
set -euo pipefail
cd "$(dirname "$0")/.."
preset="${1:-release}"
bash scripts/setup.sh
bash scripts/build.sh "$preset"
ctest --preset "$preset" -j "$(nproc)"
