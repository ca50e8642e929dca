#!/usr/bin/env bash
# Installs, builds and runs the whole test suite:
#   1. the release build: GoogleTest via CTest, the PyTorch oracle, model-gradient, RWKV-4,
#      tokenizer, hardening, memory and benchmark-smoke tests;
#   2. the same suite under ASan + UBSan (the asan preset), but for the two tests that measure
#      memory growth and run the benchmark pipeline (their figures mean nothing under ASan);
#   3. every libFuzzer harness for 20 s on its seed corpus (scripts/fuzz.sh).
# Usage: scripts/test.sh            all three (what CI runs)
#        scripts/test.sh PRESET     one preset's suite only (release, asan, debug, native)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
run_suite() {
  bash scripts/build.sh "$1"
  ctest --preset "$1" -j "$(nproc)" "${@:2}"
}
if [ $# -ge 1 ]; then
  run_suite "$1"
  exit 0
fi
run_suite release
run_suite asan -E "backward_memory_linear_in_T|bench_smoke"
bash scripts/fuzz.sh 20
