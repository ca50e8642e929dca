#!/usr/bin/env bash
# The main job on built-in defaults: install, build, then run every mechanism in every
# form on generated inputs and print how the forms agree with the float64 reference.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/build.sh release
./build/release/linmix demo "$@"
