#!/usr/bin/env bash
# Run every CUDA kernel variant on the CPU emulator (emu.cpp) against the f64 spec:
#   kernels-cuda/emu/run.sh [cases per variant, default 12] [seed, default 1]
# The variant grid and each variant's g++ flags (the host's prelude #defines) come from the kernel
# table: `headmix kernels --emu-grid`. Set HEADMIX to a built headmix binary, else the CLI is built
# with cargo. Needs g++ >= 12 (C++20, _Float16). Builds go to ${TMPDIR:-/tmp}/headmix-emu.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cases="${1:-12}"
seed="${2:-1}"
out="${TMPDIR:-/tmp}/headmix-emu"
mkdir -p "$out"
if [ -n "${HEADMIX:-}" ]; then
  grid="$("$HEADMIX" kernels --emu-grid)"
else
  grid="$(cd "$here/../.." && cargo run --release -q -p headmix-cli -- kernels --emu-grid)"
fi
run_one() {
  # $1: variant name, then its g++ flags (no spaces inside a flag).
  set -- $1
  local name="$1"
  shift
  g++ -std=c++20 -O1 "$@" -iquote "$here/.." "$here/emu.cpp" -o "$out/emu_$name"
  "$out/emu_$name" "$cases" "$seed"
}
export -f run_one
export here out cases seed
printf '%s\n' "$grid" | xargs -P "$(nproc)" -I{} bash -c 'run_one "{}"'
