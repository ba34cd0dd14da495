#!/usr/bin/env bash
# Run every CUDA kernel variant on the CPU emulator (emu.cpp) against the f64 spec:
#   kernels-cuda/emu/run.sh [cases per variant, default 12] [seed, default 1]
# Negative controls of the instruction models (every case must fail):
#   EMU_BREAK=ldsm_trans|ldsm_rows|cp_nowait|cp_zfill|mma_b kernels-cuda/emu/run.sh 2
# Needs g++ >= 12 (C++20, _Float16). Builds go to ${TMPDIR:-/tmp}/headmix-emu.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cases="${1:-12}"
seed="${2:-1}"
out="${TMPDIR:-/tmp}/headmix-emu"
mkdir -p "$out"
jobs=()
for kernel in 1 2 3; do
  for dtype in 0 1 2; do
    for hd in 32 64 96 128 256; do
      # v1 reads the mask at run time (HM_MASK 3); v2 and v3 are compiled per mask kind (0, 1, 2).
      masks="0 1 2"; [ "$kernel" = 1 ] && masks="3"
      for mask in $masks; do
        if [ "$kernel" != 1 ] && { [ "$dtype" = 0 ] || [ "$hd" = 256 ]; }; then continue; fi
        jobs+=("$kernel $dtype $hd $mask")
      done
    done
  done
done
run_one() {
  set -- $1
  local bin="$out/emu_v$1_t$2_d$3_m$4"
  g++ -std=c++20 -O1 -DHM_KERNEL="$1" -DHM_DTYPE="$2" -DHM_HD="$3" -DHM_MASK="$4" -DHM_NT=128 \
    "$here/emu.cpp" -o "$bin"
  if [ -n "${EMU_BREAK:-}" ] && [ "$1" != 3 ]; then return 0; fi # the sm_80 models: v3's
  "$bin" "$cases" "$seed"
}
export -f run_one
export here out cases seed
printf '%s\n' "${jobs[@]}" | xargs -P "$(nproc)" -I{} bash -c 'run_one "{}"'
