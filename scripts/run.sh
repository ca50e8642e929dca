#!/usr/bin/env bash
# The main job on built-in defaults: install, build, build the English corpus (Debian's
# fortunes), train a 4-layer RWKV-4 byte-level model for ~3 minutes on 2 cores, print its
# validation bits per character and a sample generated with the recurrent form.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/build.sh release
bash scripts/corpus.sh build/corpus/fortunes.txt
./build/release/linmix train --data build/corpus/fortunes.txt --out build/run --force --steps 600 "$@"
echo "--- sample (recurrent form, temperature 0.8, top-p 0.95):"
./build/release/linmix generate --model build/run/ckpt.safetensors --prompt "The " --tokens 300 \
  --temperature 0.8 --top-p 0.95 --seed 1
