#!/usr/bin/env bash
# Run the decode kernels (decode_v1.cu every dtype, decode_v2.cu f16/bf16) on the CPU emulator
# against the f64 spec:
#   kernels-cuda/emu/run_decode.sh [cases per build, default 40] [seed, default 1]
# HM_EPI_ROWS: EPI_ROWS of host/src/backends/cuda/kernel_table.rs (the decode kernels are not in
# the kernel table yet).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cases="${1:-40}"
seed="${2:-1}"
out="${TMPDIR:-/tmp}/headmix-emu"
mkdir -p "$out"
for dtype in 0 1 2; do
  for hd in 64 128; do
    bin="$out/decode_t${dtype}_d${hd}"
    g++ -std=c++20 -O1 -DHM_DTYPE="$dtype" -DHM_HD="$hd" -DHM_MASK=3 -DHM_NT=128 -DHM_EPI_ROWS=4 "$here/decode_emu.cpp" -o "$bin"
    "$bin" "$cases" "$seed"
    if [ "$dtype" != 0 ]; then
      g++ -std=c++20 -O1 -DHM_DECODE=2 -DHM_DTYPE="$dtype" -DHM_HD="$hd" -DHM_MASK=3 -DHM_NT=128 -DHM_EPI_ROWS=4 "$here/decode_emu.cpp" -o "${bin}_v2"
      "${bin}_v2" "$cases" "$seed"
    fi
  done
done
