#!/usr/bin/env bash
# The whole benchmark from a clean clone: linmix bench (every mechanism, 1 and 2 threads, T =
# 256 ... 65536, the machine's sgemm and triad in the same run), tiled softmax at T = 65536,
# the PyTorch peers (bench/peer.py) and the report (bench/report.py: table, targets, plot), then
# linmix.ops against the same kernels and the peers (bench/torch_ops.py: docs/torch_ops.md), and
# linmix mix as a whole process against the peers (bench/mix_process.py: docs/mix_process.md).
#
#   bash bench/run.sh                 # full run (about 40 minutes on 2 cores): docs/bench.md, docs/bench.png
#   bash bench/run.sh --quick         # smoke run (a minute): T = 256, 512, one thread, into build/bench-quick
#   bash bench/run.sh --only A,B,...  # these mechanisms alone, T = 1024, 4096, 16384, 2 threads, with their
#                                     # peers and targets (minutes): into build/bench-only (or --dir)
#   options: --dir DIR (JSON, markdown and plot go here; default build/bench, docs/ for the
#            report of a full run), --bin PATH (a built linmix; skips setup and the native build)
set -euo pipefail
cd "$(dirname "$0")/.."
quick=0
only=""
dir=""
bin=""
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) quick=1 ;;
    --only) only="$2"; shift ;;
    --dir) dir="$2"; shift ;;
    --bin) bin="$2"; shift ;;
    *) echo "bench/run.sh: unknown option '$1'" >&2; exit 2 ;;
  esac
  shift
done
if [ -z "$bin" ]; then
  # benchmarks run the build a user would make for this machine: -march=native (AVX-512 here;
  # measured 1.0-1.9x the portable x86-64-v3 build, most on the element-wise scans)
  bash scripts/setup.sh
  bash scripts/build.sh native
  bin=./build/native/linmix
fi
[ -x "$bin" ] || { echo "bench/run.sh: no linmix binary at '$bin'" >&2; exit 2; }
# Debian's python3, where python3-torch lives
py=/usr/bin/python3
[ -x "$py" ] || py=python3

if [ "$quick" = 1 ]; then
  dir="${dir:-build/bench-quick}"
  mkdir -p "$dir"
  "$bin" bench --T 256,512 --thread-counts 1 --step-tokens 8 --out "$dir/linmix.json"
  "$py" bench/peer.py --bin "$bin" --T 256,512 --threads 1 --step-tokens 8 --out "$dir/peer.json"
  "$py" bench/report.py --bin "$bin" --linmix "$dir/linmix.json" --peer "$dir/peer.json" --T 512 \
    --md "$dir/bench.md" --png "$dir/bench.png"
  if ls python/linmix/_C*.so >/dev/null 2>&1; then  # the PyTorch package, where it is built
    "$py" bench/torch_ops.py --bin "$bin" --T 256 --threads 1 --out "$dir/torch_ops.json" --md "$dir/torch_ops.md"
  fi
  "$py" bench/mix_process.py --bin "$bin" --T 256 --threads 1 --mixers linear,rwkv4 --out "$dir/mix_process.json" \
    --md "$dir/mix_process.md"
  exit 0
fi

if [ -n "$only" ]; then
  dir="${dir:-build/bench-only}"
  mkdir -p "$dir"
  "$bin" bench --mixers ${only//,/ } --T 1024,4096,16384 --thread-counts 2 --out "$dir/linmix.json"
  # the peers at T = 1024, 4096 (the targets are read at 4096; the autograd peers of rwkv6 / rwkv7 at
  # 16384 ran minutes each)
  "$py" bench/peer.py --bin "$bin" --mixers "$only" --T 1024,4096 --threads 2 --out "$dir/peer.json"
  "$py" bench/report.py --bin "$bin" --linmix "$dir/linmix.json" --peer "$dir/peer.json" --only "$only" \
    --produced-by "bash bench/run.sh --only $only" --md "$dir/bench.md" --png "$dir/bench.png"
  exit 0
fi

dir="${dir:-build/bench}"
mkdir -p "$dir"
md="$dir/bench.md"
png="$dir/bench.png"
[ "$dir" = build/bench ] && md=docs/bench.md && png=docs/bench.png
"$bin" bench --thread-counts 1,2 --out "$dir/linmix.json"
# the tiled softmax at T = 65536 (about 5 minutes): it runs, in O(T) memory
"$bin" bench --mixers softmax --T 65536 --thread-counts 2 --no-backward --no-step --max-seconds 3600 \
  --out "$dir/softmax_65536.json"
# the peers up to T = 4096, where the targets are read (T = 1024 and 4096): up to 16384 they took
# over an hour on 2 cores (the autograd and token-loop peers at 8192 and 16384: minutes each)
"$py" bench/peer.py --bin "$bin" --T 256,512,1024,2048,4096 --threads 1,2 --out "$dir/peer.json"
"$py" bench/report.py --bin "$bin" --linmix "$dir/linmix.json" "$dir/softmax_65536.json" --peer "$dir/peer.json" \
  --md "$md" --png "$png"
# linmix.ops (the PyTorch package, built by the release preset) against the same kernels of the
# same build and against the plain-PyTorch peers, T = 4096, 2 threads
bash scripts/build.sh release
tops_md="$dir/torch_ops.md"
[ "$dir" = build/bench ] && tops_md=docs/torch_ops.md
"$py" bench/torch_ops.py --bin build/release/linmix --T 4096 --threads 2 --out "$dir/torch_ops.json" --md "$tops_md"
# linmix mix as a whole process (start, read, validate, kernel, write) against the PyTorch peer
# computing from memory, the chunked and scan mechanisms at T = 4096 (docs/mix_process.md)
mixp_md="$dir/mix_process.md"
[ "$dir" = build/bench ] && mixp_md=docs/mix_process.md
"$py" bench/mix_process.py --bin "$bin" --T 4096 --threads 2 --out "$dir/mix_process.json" --md "$mixp_md"
