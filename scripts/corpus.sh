#!/usr/bin/env bash
# Builds the main job's English corpus from Debian's `fortunes` package (installed by
# setup.sh): every fortune file, sorted by name, '%' separator lines dropped, concatenated.
# Usage: scripts/corpus.sh OUT.txt
set -euo pipefail
out="${1:?usage: scripts/corpus.sh OUT.txt}"
src=/usr/share/games/fortunes
[ -d "$src" ] || { echo "corpus: $src not found (run scripts/setup.sh)" >&2; exit 2; }
mkdir -p "$(dirname "$out")"
tmp="$out.tmp.$$"
find "$src" -maxdepth 1 -type f ! -name '*.dat' ! -name '*.u8' ! -name 'art' ! -name 'ascii-art' -print0 |
  sort -z | xargs -0 cat | grep -v '^%$' > "$tmp"
mv "$tmp" "$out"
echo "corpus: $out ($(wc -c < "$out") bytes)"
