//! The WGSL sources of [headmix](https://crates.io/crates/headmix)'s wgpu kernels, embedded as
//! strings.
//!
//! headmix builds each kernel variant as `constants + dtype_*.wgsl + common.wgsl +` the shared
//! pieces it needs (`mixing.wgsl`, `backward_common.wgsl`) `+ <kernel>.wgsl` and compiles it once
//! per device. The files stay where they are in the repository
//! (`kernels-wgsl/*.wgsl`); this crate only makes them part of a package, so that the published
//! `headmix` crate carries its kernels. See `kernels-wgsl/README.md` for what each file holds.

#![no_std]

// One `pub const` per file, `ALL`, `get` and their test (the macro is shared with the other
// kernel crate). Adding a kernel file is one line here.
headmix_embed::sources! {
    /// `common.wgsl`: the uniform block, the bindings, the mask, RoPE and output stores.
    COMMON = "common.wgsl";
    /// `dtype_f32.wgsl`: loads and stores of f32 tensors.
    DTYPE_F32 = "dtype_f32.wgsl";
    /// `dtype_f16.wgsl`: loads and stores of f16 tensors.
    DTYPE_F16 = "dtype_f16.wgsl";
    /// `dtype_bf16.wgsl`: loads and stores of bf16 tensors.
    DTYPE_BF16 = "dtype_bf16.wgsl";
    /// `mixing.wgsl`: the mixing of stored heads into pseudo-heads (forward and backward).
    MIXING = "mixing.wgsl";
    /// `flash_forward.wgsl`: the tiled flash forward kernel.
    FLASH_FORWARD = "flash_forward.wgsl";
    /// `naive_forward.wgsl`: one thread per virtual query (the baseline).
    NAIVE_FORWARD = "naive_forward.wgsl";
    /// `epilogue.wgsl`: the collapse epilogue (head norm and rounding).
    EPILOGUE = "epilogue.wgsl";
    /// `combine.wgsl`: merges split-KV partial results.
    COMBINE = "combine.wgsl";
    /// `decode.wgsl`: decode on a device-resident KV cache, one workgroup per (sequence, split)
    /// owning all heads.
    DECODE = "decode.wgsl";
    /// `backward_common.wgsl`: the backward's uniforms (binding 8), mixing and RoPE helpers.
    BACKWARD_COMMON = "backward_common.wgsl";
    /// `backward_pre.wgsl`: head norm's transpose, `do` and `D` per token.
    BACKWARD_PRE = "backward_pre.wgsl";
    /// `backward_dq.wgsl`: the query-major pass (dqt).
    BACKWARD_DQ = "backward_dq.wgsl";
    /// `backward_dkdv.wgsl`: the key-major pass (dkt, dvt).
    BACKWARD_DKDV = "backward_dkdv.wgsl";
    /// `backward_sum.wgsl`: sums of the dq / dk-dv passes' split partials (lavapipe's loop budget).
    BACKWARD_SUM = "backward_sum.wgsl";
    /// `backward_mix.wgsl`: the mixing's transposes into dq, dk, dv.
    BACKWARD_MIX = "backward_mix.wgsl";
    /// `backward_wgrad.wgsl`: the weight gradients, per-chunk partials summed in a fixed order.
    BACKWARD_WGRAD = "backward_wgrad.wgsl";
}
