#!/usr/bin/env bash
# Builds the libFuzzer harnesses (the fuzz preset: clang, ASan + UBSan) and runs each for
# SECONDS (default 20) on its committed seed corpus (fuzz/corpus/<harness>); new inputs go to
# build/fuzz-work/<harness>, a crash to build/fuzz-work/crash-<harness>-* (copy it into
# fuzz/corpus/<harness>/ as a regression input once fixed). Prints executions per harness;
# exits 1 on any finding.  Usage: scripts/fuzz.sh [SECONDS] [HARNESS ...]
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-20}"
shift || true
harnesses=("$@")
[ ${#harnesses[@]} -eq 0 ] && harnesses=(safetensors checkpoint rwkv_import state tokenizer_json world_vocab model_config)
bash scripts/setup.sh >/dev/null
cmake --preset fuzz >/dev/null
cmake --build --preset fuzz -j "$(nproc)" >/dev/null
work=build/fuzz-work
mkdir -p "$work"
status=0
for h in "${harnesses[@]}"; do
  mkdir -p "$work/$h"
  log="$work/$h.log"
  # one process, one job: the whole time budget is this harness's; leaks are reported too
  if ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
     "build/fuzz/fuzz_$h" "$work/$h" "fuzz/corpus/$h" -max_total_time="$secs" -rss_limit_mb=4096 -timeout=20 \
     -max_len=65536 -print_final_stats=1 -artifact_prefix="$work/crash-$h-" >"$log" 2>&1; then
    res=ok
  else
    res=FOUND
    status=1
  fi
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  echo "fuzz $h: ${execs:-?} executions in ${secs} s: $res"
  [ "$res" = ok ] || tail -40 "$log"
done
exit $status
