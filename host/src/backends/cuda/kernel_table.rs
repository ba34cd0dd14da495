//! The kernel table: every CUDA kernel version, what it serves and its tile sizes, defined once.
//!
//! Everything else is derived from [`KERNELS`]: the variant list ([`super::variants::all_variants`]),
//! the `#define` prelude NVRTC compiles (tile sizes included: no header restates them), the launch
//! shape, the emulator's grid (`headmix kernels --emu-grid`, read by `kernels-cuda/emu/run.sh`) and
//! the static report of `headmix kernels`. Adding a kernel version is one kernel file in
//! `kernels-cuda/`, one [`Kernel`] variant and one [`KernelSpec`] entry below (and its count model
//! in `cost.rs`); `kernels-cuda/README.md` walks through it.

use crate::DType;

/// Numbered kernel versions (llm.c style); each stays available and tested.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kernel {
    /// v1: fused FMA kernel, f32 accumulation, mixing and online softmax in shared memory.
    AttnV1,
    /// v2: tensor cores (mma.sync m16n8k16), f16/bf16, head dims up to 128, sm_80+.
    AttnV2,
    /// v3: FlashAttention-2 class (cp.async double-buffered tiles, ldmatrix, mma.sync), 128
    /// virtual queries per block; selection weights read the stored head directly, dense mixing
    /// runs as a tensor-core pre-mix; f16/bf16, head dims up to 128 (multiples of 8), sm_80+.
    AttnV3,
    /// The collapse epilogue (head norm and rounding of the f32 accumulator).
    CollapseEpilogue,
    /// The backward pass v1 (`bwd_v1.cu`): FMA, f32 on chip, every dtype; eight entry points
    /// launched by `backward.rs` (not an attention kernel: `HM_KERNEL` 0).
    BwdV1,
    /// The backward pass v2 (`bwd_v1.cu` + `bwd_v2.cu`): bwd_v1's passes with the dq and dk/dv
    /// passes on the tensor cores (mma.sync, split hi + lo operands), f16/bf16, d <= 128, sm_80+.
    BwdV2,
}

/// The mask kind compiled into a variant (`HM_MASK`): dense variants carry no mask code, causal
/// ones only `j <= i'`; the window variant handles a window with or without causality; `Runtime`
/// reads both flags at run time (one module for every mask, used by the baseline v1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum MaskKind {
    /// `HM_MASK 0`: every key visible.
    None,
    /// `HM_MASK 1`: causal, `j <= i'`.
    Causal,
    /// `HM_MASK 2`: sliding window, causal too when the config says so.
    Window,
    /// `HM_MASK 3`: causality and window read from the arguments at run time.
    Runtime,
}

impl MaskKind {
    /// The kinds a specialising kernel is compiled for.
    pub const ALL: [MaskKind; 3] = [MaskKind::None, MaskKind::Causal, MaskKind::Window];
}

/// One more compile-time axis of a kernel, beyond dtype, head dim and mask (e.g. a selection path
/// compiled apart from dense mixing): a name for variant names and the `#define`s it adds.
#[derive(Debug)]
pub struct KernelOption {
    /// Appended to the variant name (`""` for a kernel's only option).
    pub name: &'static str,
    /// The `#define`s (name, value) this option adds to the prelude.
    pub defines: &'static [(&'static str, i64)],
}

/// The single option of a kernel without another axis.
pub const NO_OPTIONS: &[KernelOption] = &[KernelOption { name: "", defines: &[] }];

/// One kernel version: its source, what it serves, and its launch shape.
#[derive(Debug)]
pub struct KernelSpec {
    /// The kernel version this entry describes.
    pub kernel: Kernel,
    /// Short name: variant names, `HEADMIX_CUDA_KERNEL`, `headmix kernels`.
    pub name: &'static str,
    /// `HM_KERNEL` in the prelude (0: not an attention kernel).
    pub number: u32,
    /// The kernel file in `kernels-cuda/` and its text (embedded at build time).
    pub file: &'static str,
    /// The text of `file`.
    pub source: &'static str,
    /// The `extern "C"` entry point.
    pub entry: &'static str,
    /// Further entry points of the same module (v3: the pre-mix and the collapse), loaded with it.
    pub extra_entries: &'static [&'static str],
    /// One line for `describe()` and `headmix kernels --list`.
    pub summary: &'static str,
    /// Storage dtypes it runs.
    pub dtypes: &'static [DType],
    /// Compile-time head-dim capacities (`HM_HD`); a runtime `d` uses the smallest `>= d`.
    /// Empty: the kernel does not depend on the head dim (one variant per dtype).
    pub head_dims: &'static [usize],
    /// Mask kinds it is compiled for (`[Runtime]`: one module reads the mask at run time).
    pub masks: &'static [MaskKind],
    /// Further compile-time axes (`NO_OPTIONS` when none).
    pub options: &'static [KernelOption],
    /// Oldest compute capability it runs on.
    pub min_cc: (i32, i32),
    /// Threads per block (`HM_NT`).
    pub threads: usize,
    /// (virtual queries per block `HM_BR`, virtual keys per KV tile `HM_BC`) for a head-dim
    /// capacity. The grid is `ceil(N·P / BR) × H × B` for attention kernels.
    pub tiles: fn(hd: usize) -> (usize, usize),
    /// Dynamic shared memory in bytes (`HM_SMEM`) for (hd, BR, BC): the kernel `static_assert`s
    /// its carve-up against it, so a wrong figure here does not compile.
    pub smem: fn(hd: usize, br: usize, bc: usize) -> usize,
}

/// Output rows (one warp each) per block of the collapse epilogue (`HM_EPI_ROWS` in every prelude).
pub const EPI_ROWS: usize = 4;

// The kernel files come from the `headmix-kernels-cuda` crate (a path outside this crate would
// not be in its package).
mod src {
    pub use headmix_kernels_cuda::{ATTN_V1, ATTN_V2, ATTN_V3, BWD_V1, BWD_V2_MODULE, EPILOGUE};
}

/// Every kernel version. Order: attention kernels by version, then the epilogue.
pub static KERNELS: &[KernelSpec] = &[
    KernelSpec {
        kernel: Kernel::AttnV1,
        name: "v1",
        number: 1,
        file: "attn_v1.cu",
        source: src::ATTN_V1,
        entry: "hm_attn_v1",
        extra_entries: &[],
        summary: "FMA, f32 on chip, every dtype, d <= 256",
        dtypes: &[DType::F32, DType::F16, DType::BF16],
        head_dims: &[32, 64, 96, 128, 256],
        masks: &[MaskKind::Runtime],
        options: NO_OPTIONS,
        min_cc: (7, 5),
        threads: 128,
        // Chosen so that the f32 tiles stay under 99 KiB (the opt-in limit of sm_86/sm_89).
        tiles: |hd| match hd {
            0..=64 => (32, 64),
            65..=128 => (32, 32),
            _ => (16, 16),
        },
        // f32: qs [BR][HD+1], ks and vs [BC][HD+1], ss [BR][BC+1], three row statistics [BR].
        smem: |hd, br, bc| 4 * (br * (hd + 1) + 2 * bc * (hd + 1) + br * (bc + 1) + 3 * br),
    },
    KernelSpec {
        kernel: Kernel::AttnV2,
        name: "v2",
        number: 2,
        file: "attn_v2.cu",
        source: src::ATTN_V2,
        entry: "hm_attn_v2",
        extra_entries: &[],
        summary: "mma.sync tensor cores, f16/bf16, d <= 128, sm_80+",
        dtypes: &[DType::F16, DType::BF16],
        head_dims: &[32, 64, 96, 128],
        masks: &MaskKind::ALL,
        options: NO_OPTIONS,
        min_cc: (8, 0),
        // 4 warps of 16 query rows.
        threads: 128,
        tiles: |_| (64, 64),
        // 16-bit qs [BR][HD+8], ks and vs [BC][HD+8]; bad [BC] i32 (value rows sanitized).
        smem: |hd, br, bc| 2 * (br + 2 * bc) * (hd + 8) + 4 * bc,
    },
    KernelSpec {
        kernel: Kernel::AttnV3,
        name: "v3",
        number: 3,
        file: "attn_v3.cu",
        source: src::ATTN_V3,
        entry: "hm_attn_v3",
        extra_entries: &["hm_v3_mix", "hm_v3_collapse"],
        summary: "FlashAttention-2 class: cp.async, ldmatrix, mma.sync; pre-mix for dense mixing; f16/bf16, d <= 128 (multiple of 8), sm_80+",
        dtypes: &[DType::F16, DType::BF16],
        head_dims: &[32, 64, 96, 128],
        masks: &MaskKind::ALL,
        options: NO_OPTIONS,
        min_cc: (8, 0),
        // 8 warps of 16 query rows (the pre-mix and collapse entries set their own block sizes).
        threads: 256,
        tiles: |_| (128, 64),
        // K and V stages [2][2][BC][HD+8] 16-bit (the query tile is loaded into the second stage
        // first); badmask [2] u32; row offsets [2][2][BC] u32.
        smem: |hd, _br, bc| 4 * bc * (hd + 8) * 2 + 8 + 4 * bc * 4,
    },
    KernelSpec {
        kernel: Kernel::CollapseEpilogue,
        name: "epilogue",
        number: 0,
        file: "epilogue.cu",
        source: src::EPILOGUE,
        entry: "hm_collapse_epilogue",
        extra_entries: &[],
        summary: "collapse epilogue: head norm and rounding of the f32 accumulator",
        dtypes: &[DType::F32, DType::F16, DType::BF16],
        head_dims: &[],
        masks: &[MaskKind::None],
        options: NO_OPTIONS,
        min_cc: (7, 5),
        threads: 32 * EPI_ROWS,
        tiles: |_| (EPI_ROWS, 0),
        smem: |_, _, _| 0,
    },
    KernelSpec {
        kernel: Kernel::BwdV1,
        name: "bwd_v1",
        number: 0,
        file: "bwd_v1.cu",
        source: src::BWD_V1,
        entry: "hm_bwd_v1_dq",
        extra_entries: &[
            "hm_bwd_v1_mix",
            "hm_bwd_v1_fwd",
            "hm_bwd_v1_pre",
            "hm_bwd_v1_ysum",
            "hm_bwd_v1_norm",
            "hm_bwd_v1_dkdv",
            "hm_bwd_v1_mixback",
            "hm_bwd_v1_wgrad",
            "hm_bwd_v1_reduce",
        ],
        summary: "backward: mix, recompute, norm/collapse transpose, dq (query-major), dk/dv (key-major), mix-back, weight gradients; FMA, every dtype, d <= 256, no atomics",
        dtypes: &[DType::F32, DType::F16, DType::BF16],
        head_dims: &[32, 64, 128, 256],
        masks: &[MaskKind::Runtime],
        options: NO_OPTIONS,
        min_cc: (7, 5),
        // 4 warps; 16 owned rows per block (4 per warp), 32 streamed rows per tile (one per lane).
        threads: 128,
        tiles: |_| (16, 32),
        // f32: owned [BR][HD+1] x2, streamed [BC][HD+1] x2, streamed lse and D [2][BC], per-warp
        // broadcast rows [4][2][BC].
        smem: |hd, br, bc| 4 * (2 * (br + bc) * (hd + 1) + 2 * bc + 2 * 4 * bc),
    },
    KernelSpec {
        kernel: Kernel::BwdV2,
        name: "bwd_v2",
        number: 0,
        file: "bwd_v2.cu",
        source: src::BWD_V2_MODULE,
        entry: "hm_bwd_v2_dq",
        extra_entries: &[
            "hm_bwd_v1_mix",
            "hm_bwd_v1_fwd",
            "hm_bwd_v1_pre",
            "hm_bwd_v1_ysum",
            "hm_bwd_v1_norm",
            "hm_bwd_v2_dkdv",
            "hm_bwd_v1_mixback",
            "hm_bwd_v1_wgrad",
            "hm_bwd_v1_reduce",
        ],
        summary: "backward with tensor-core dq and dk/dv (mma.sync m16n8k16, operands split hi + lo), bwd_v1's other passes; f16/bf16, d <= 128, sm_80+",
        dtypes: &[DType::F16, DType::BF16],
        head_dims: &[32, 64, 128],
        masks: &[MaskKind::Runtime],
        options: &[KernelOption { name: "", defines: &[("HM_BWD_TC", 1)] }],
        min_cc: (8, 0),
        threads: 128,
        // bwd_v1's tiles for its FMA passes; the tensor-core passes own 64 rows and stream 32.
        tiles: |_| (16, 32),
        // Owned hi/lo planes [4][64][HD+8] and streamed [4][SC][HD+8] 16-bit, the streamed rows'
        // lse and D [2][SC] f32 and key ranges [2][SC] i32, the mask of sanitized streamed rows
        // (16 bytes); SC = 32 streamed rows (16 above d 64).
        smem: |hd, _br, _bc| {
            let sc = if hd > 64 { 16 } else { 32 };
            2 * (hd + 8) * (4 * 64 + 4 * sc) + 4 * 4 * sc + 16
        },
    },
];

impl Kernel {
    /// This kernel's entry in [`KERNELS`].
    pub fn spec(self) -> &'static KernelSpec {
        KERNELS.iter().find(|s| s.kernel == self).expect("every Kernel has a KERNELS entry")
    }

    /// The kernel of a short name (`v1`, `v2`, ...), as `HEADMIX_CUDA_KERNEL` spells it.
    pub fn parse(name: &str) -> Option<Kernel> {
        KERNELS.iter().find(|s| s.name == name).map(|s| s.kernel)
    }

    /// The attention kernels, by version.
    pub fn attention() -> impl Iterator<Item = Kernel> {
        KERNELS.iter().filter(|s| s.number > 0).map(|s| s.kernel)
    }

    /// Its short name (`v1`, `v2`, ...).
    pub fn name(self) -> &'static str {
        self.spec().name
    }

    /// The `extern "C"` entry point in the module.
    pub fn entry(self) -> &'static str {
        self.spec().entry
    }

    /// Further entry points of the module (v3: the pre-mix and the collapse).
    pub fn extra_entries(self) -> &'static [&'static str] {
        self.spec().extra_entries
    }

    /// Whether the kernel is compiled per mask kind (else one `MaskKind::Runtime` module).
    pub fn specialises_mask(self) -> bool {
        !self.spec().masks.contains(&MaskKind::Runtime)
    }

    /// The head-dim capacities compiled for a dtype (empty: the kernel does not run it).
    pub fn head_dims(self, dtype: DType) -> &'static [usize] {
        let s = self.spec();
        if s.dtypes.contains(&dtype) { s.head_dims } else { &[] }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kernel_has_one_entry_and_a_unique_name_and_number() {
        for k in
            [Kernel::AttnV1, Kernel::AttnV2, Kernel::AttnV3, Kernel::CollapseEpilogue, Kernel::BwdV1, Kernel::BwdV2]
        {
            assert_eq!(KERNELS.iter().filter(|s| s.kernel == k).count(), 1, "{k:?}");
            assert_eq!(Kernel::parse(k.name()), Some(k));
        }
        for (i, a) in KERNELS.iter().enumerate() {
            for b in &KERNELS[i + 1..] {
                assert_ne!(a.name, b.name);
                assert!(a.number == 0 || a.number != b.number, "{} and {} share HM_KERNEL", a.name, b.name);
            }
            assert!(!a.options.is_empty(), "{}: at least one option", a.name);
        }
        assert_eq!(Kernel::parse("v9"), None);
    }
}
