//! The CUDA C++ sources of [headmix](https://crates.io/crates/headmix)'s kernels, embedded as
//! strings.
//!
//! headmix compiles them at run time with NVRTC (no CUDA toolkit at build time): each kernel
//! variant is one program made of a `#define` prelude, then the shared headers ([`COMMON`],
//! [`TRAITS`], [`NORM`], [`MASK`], [`SOFTMAX`], [`TILES`]) and one kernel file, with no `#include`. The files stay where they are in the repository (`kernels-cuda/*.cu`,
//! `*.cuh`); this crate only makes them part of a package, so that the published `headmix` crate
//! carries its kernels. See `kernels-cuda/README.md` for what each file holds.

#![no_std]

// One `pub const` per file, `ALL`, `get` and their test (the macro is shared with the other
// kernel crate). Adding a kernel file is one line here.
headmix_embed::sources! {
    /// `common.cuh`: the argument block `HmArgs` (mirrored by the host), storage types and
    /// f16/bf16 conversions in inline PTX, warp reductions and RoPE.
    COMMON = "common.cuh";
    /// `traits.cuh`: values derived from the prelude's tile sizes (the kernel table in the host).
    TRAITS = "traits.cuh";
    /// `attn_v1.cu`: v1, the readable FMA baseline; every dtype, head dims up to 256.
    ATTN_V1 = "attn_v1.cu";
    /// `attn_v2.cu`: v2, tensor cores (`mma.sync.m16n8k16`), f16/bf16, head dims up to 128, sm_80+.
    ATTN_V2 = "attn_v2.cu";
    /// `epilogue.cu`: the collapse epilogue (head norm and rounding of the f32 accumulator).
    EPILOGUE = "epilogue.cu";
    /// `norm.cuh`: the head norm (`Rms`, MEA's `Group` with `beta`) as device functions.
    NORM = "norm.cuh";
    /// `decode_v1.cu`: decode on a device-resident KV cache, one block per (sequence, split)
    /// owning all heads; compiled after `decode.cuh`.
    DECODE_V1 = "decode_v1.cu";
    /// `mask.cuh`: the mask, one copy for every kernel: visibility, key ranges, value-tile
    /// sanitizing (NaN policy).
    MASK = "mask.cuh";
    /// `softmax.cuh`: the online softmax (row statistics, rescale, final normalise and lse).
    SOFTMAX = "softmax.cuh";
    /// `tiles.cuh`: the sm_80 tile vocabulary (cp.async, ldmatrix, mma.sync in inline PTX).
    TILES = "tiles.cuh";
    /// `attn_v3.cu`: v3, FlashAttention-2 class (cp.async, ldmatrix, mma.sync), the tensor-core
    /// pre-mix and the no-atomics collapse; f16/bf16, head dims up to 128, sm_80+.
    ATTN_V3 = "attn_v3.cu";
    /// `bwd_v1.cu`: the backward pass v1 (mix, recompute, norm/collapse transpose, dq, dk/dv,
    /// mix-back, weight gradients from per-tile partials); FMA, every dtype, no atomics.
    BWD_V1 = "bwd_v1.cu";
    /// `bwd_v2.cu`: the backward's attention passes (dq, dk/dv) on the tensor cores; compiled
    /// after `bwd_v1.cu` as one module ([`BWD_V2_MODULE`]).
    BWD_V2 = "bwd_v2.cu";
    /// `decode_v2.cu`: decode on tensor cores (the absorbed form, cp.async double-buffered cache
    /// tiles); f16/bf16, sm_80+; compiled after `decode.cuh` and `tiles.cuh`.
    DECODE_V2 = "decode_v2.cu";
    /// `decode.cuh`: what the decode kernels share: `HmDecodeArgs`, the sequence's view of its
    /// cache (ring slots, split band), the mixed queries, RoPE from a table, the partials.
    DECODE = "decode.cuh";
    /// `decode_combine.cu`: the decode split combine and the fixed-order collapse (no atomics),
    /// compiled after either decode kernel.
    DECODE_COMBINE = "decode_combine.cu";
}

/// The kernel text of the `bwd_v2` module: `bwd_v1.cu` (its other passes) then `bwd_v2.cu`
/// (compiled with `HM_BWD_TC 1`, which leaves out bwd_v1's FMA dq and dk/dv).
pub const BWD_V2_MODULE: &str = concat!(include_str!("../bwd_v1.cu"), "\n", include_str!("../bwd_v2.cu"));
