#!/usr/bin/env bash
# Run every CUDA kernel variant on the CPU emulator (emu.cpp) against the f64 spec:
#   kernels-cuda/emu/run.sh [cases per variant, default 12] [seed, default 1]
# The variant grid and each variant's g++ flags (the host's prelude #defines) come from the kernel
# table: `headmix kernels --emu-grid`. Set HEADMIX to a built headmix binary, else the CLI is built
# with cargo. Needs g++ >= 12 (C++20, _Float16). Builds go to ${TMPDIR:-/tmp}/headmix-emu.
# Negative controls of the sm_80 instruction models (every v3 case must fail; other kernels skip):
#   EMU_BREAK=ldsm_trans|ldsm_rows|cp_nowait|cp_zfill|mma_b kernels-cuda/emu/run.sh 2
# Negative control of the lse check (every case must fail): EMU_NEGATIVE_LSE=1 kernels-cuda/emu/run.sh 2
# (run_one's exit status then says so); EMU_LSE_STATS=1 prints each case's lse error, the f32
# reference's and the tolerance.
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
  if [ -n "${EMU_BREAK:-}" ] && [ "${name#v3_}" = "$name" ]; then return 0; fi # the sm_80 models: v3's
  g++ -std=c++20 -O1 "$@" -iquote "$here/.." "$here/emu.cpp" -o "$out/emu_$name"
  "$out/emu_$name" "$cases" "$seed"
}
export -f run_one
export here out cases seed
printf '%s\n' "$grid" | xargs -P "$(nproc)" -I{} bash -c 'run_one "{}"'
