//! The kernel variants: which source, which `#define`s, and the tile sizes the host must mirror.

use crate::DType;

/// Kernel sources, embedded at build time by the `headmix-kernels-cuda` crate (NVRTC gets one
/// concatenated string, no includes).
pub mod src {
    pub use headmix_kernels_cuda::*;
}

/// Numbered kernel versions (llm.c style); each stays available and tested.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kernel {
    /// v1: fused FMA kernel, f32 accumulation, mixing and online softmax in shared memory.
    AttnV1,
    /// v2: tensor cores (mma.sync m16n8k16), f16/bf16, head dims up to 128, sm_80+.
    AttnV2,
    /// The collapse epilogue (head norm and rounding of the f32 accumulator).
    CollapseEpilogue,
}

impl Kernel {
    /// Short name (`v1`, `v2`, `epilogue`).
    pub fn name(self) -> &'static str {
        match self {
            Kernel::AttnV1 => "v1",
            Kernel::AttnV2 => "v2",
            Kernel::CollapseEpilogue => "epilogue",
        }
    }

    /// The `extern "C"` entry point in the module.
    pub fn entry(self) -> &'static str {
        match self {
            Kernel::AttnV1 => "hm_attn_v1",
            Kernel::AttnV2 => "hm_attn_v2",
            Kernel::CollapseEpilogue => "hm_collapse_epilogue",
        }
    }

    /// Whether the kernel is compiled per mask kind (else one `MaskKind::Runtime` module).
    pub fn specialises_mask(self) -> bool {
        self == Kernel::AttnV2
    }

    /// The head-dim capacities compiled for a dtype (empty: the kernel does not run it).
    pub fn head_dims(self, dtype: DType) -> &'static [usize] {
        match (self, dtype) {
            (Kernel::AttnV1, _) => &HEAD_DIMS,
            (Kernel::AttnV2, DType::F16 | DType::BF16) => &V2_HEAD_DIMS,
            (Kernel::AttnV2, DType::F32) | (Kernel::CollapseEpilogue, _) => &[],
        }
    }

    fn body(self) -> &'static str {
        match self {
            Kernel::AttnV1 => src::ATTN_V1,
            Kernel::AttnV2 => src::ATTN_V2,
            Kernel::CollapseEpilogue => src::EPILOGUE,
        }
    }
}

/// Compile-time head-dim capacities; a runtime `d` uses the smallest capacity `>= d`.
pub const HEAD_DIMS: [usize; 5] = [32, 64, 96, 128, 256];
/// The capacities of the tensor-core v2 (multiples of 16, its accumulators fit registers).
pub const V2_HEAD_DIMS: [usize; 4] = [32, 64, 96, 128];

/// The mask kind compiled into a variant (`HM_MASK`): dense variants carry no mask code, causal
/// ones only `j <= i'`; the window variant handles a window with or without causality; `Runtime`
/// reads both flags at run time (one module for every mask, used by the baseline v1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum MaskKind {
    /// No mask (kernels without one).
    None,
    /// Causal, compiled in.
    Causal,
    /// Sliding window (and causal), compiled in.
    Window,
    /// Mask flags read at run time.
    Runtime,
}

impl MaskKind {
    /// The kinds a specialising kernel is compiled for.
    pub const ALL: [MaskKind; 3] = [MaskKind::None, MaskKind::Causal, MaskKind::Window];

    /// The mask kind a configuration needs.
    pub fn of(cfg: &crate::Config) -> MaskKind {
        match (cfg.window, cfg.causal) {
            (Some(_), _) => MaskKind::Window,
            (None, true) => MaskKind::Causal,
            (None, false) => MaskKind::None,
        }
    }

    fn code(self) -> u32 {
        match self {
            MaskKind::None => 0,
            MaskKind::Causal => 1,
            MaskKind::Window => 2,
            MaskKind::Runtime => 3,
        }
    }

    fn name(self) -> &'static str {
        match self {
            MaskKind::None => "dense",
            MaskKind::Causal => "causal",
            MaskKind::Window => "window",
            MaskKind::Runtime => "anymask",
        }
    }
}

/// One compiled instantiation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Variant {
    /// Which kernel.
    pub kernel: Kernel,
    /// Element type of q, k, v and the output.
    pub dtype: DTypeKey,
    /// Head-dim capacity (0 for kernels that do not depend on it).
    pub hd: usize,
    /// Mask kind (`None` for kernels without a mask).
    pub mask: MaskKind,
}

/// `DType` with an order (for sorted listings).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DTypeKey {
    /// f32.
    F32,
    /// f16.
    F16,
    /// bf16.
    BF16,
}

impl From<DType> for DTypeKey {
    fn from(d: DType) -> Self {
        match d {
            DType::F32 => DTypeKey::F32,
            DType::F16 => DTypeKey::F16,
            DType::BF16 => DTypeKey::BF16,
        }
    }
}

impl DTypeKey {
    fn code(self) -> u32 {
        match self {
            DTypeKey::F32 => 0,
            DTypeKey::F16 => 1,
            DTypeKey::BF16 => 2,
        }
    }
    fn name(self) -> &'static str {
        match self {
            DTypeKey::F32 => "f32",
            DTypeKey::F16 => "f16",
            DTypeKey::BF16 => "bf16",
        }
    }
}

/// Tile sizes of a variant: mirrors `traits.cuh` (checked against it by the NVRTC test through
/// the compiled shared-memory sizes on a device, and by `traits_match_header` below).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tiles {
    /// Virtual queries per block.
    pub br: usize,
    /// Virtual keys per KV tile.
    pub bc: usize,
    /// Threads per block.
    pub threads: usize,
    /// Dynamic shared memory in bytes.
    pub smem: usize,
}

/// Threads per block of every kernel.
pub const THREADS: usize = 128;
/// Output rows per block of the epilogue (`HM_EPI_ROWS`).
pub const EPI_ROWS: usize = 4;

impl Variant {
    /// The epilogue of a dtype.
    pub fn epilogue(dtype: DType) -> Variant {
        Variant { kernel: Kernel::CollapseEpilogue, dtype: dtype.into(), hd: 0, mask: MaskKind::None }
    }

    /// The attention variant for a runtime head dim `d`: the smallest capacity `>= d` the kernel
    /// has (None when the kernel cannot run `d` or `dtype`).
    /// A kernel that does not specialise on the mask gets its `Runtime` module.
    pub fn attention(kernel: Kernel, dtype: DType, d: usize, mask: MaskKind) -> Option<Variant> {
        let mask = if kernel.specialises_mask() { mask } else { MaskKind::Runtime };
        kernel.head_dims(dtype).iter().find(|&&c| c >= d).map(|&hd| Variant { kernel, dtype: dtype.into(), hd, mask })
    }

    /// Name of the variant, e.g. `v1_bf16_d128_causal`.
    pub fn name(&self) -> String {
        match self.kernel {
            Kernel::CollapseEpilogue => format!("{}_{}", self.kernel.name(), self.dtype.name()),
            _ => format!("{}_{}_d{}_{}", self.kernel.name(), self.dtype.name(), self.hd, self.mask.name()),
        }
    }

    /// The full NVRTC source: a `#define` prelude, the shared headers, the kernel.
    pub fn source(&self) -> String {
        let hd = if self.hd == 0 { 32 } else { self.hd };
        format!(
            "// headmix variant {}\n#define HM_DTYPE {}\n#define HM_HD {}\n#define HM_MASK {}\n#define HM_NT {}\n{}\n{}\n{}\n",
            self.name(),
            self.dtype.code(),
            hd,
            self.mask.code(),
            THREADS,
            src::COMMON,
            src::TRAITS,
            self.kernel.body()
        )
    }

    /// Tiles and launch shape (mirrors `traits.cuh` and the kernels' shared-memory carve-up).
    pub fn tiles(&self) -> Tiles {
        match self.kernel {
            Kernel::CollapseEpilogue => Tiles { br: EPI_ROWS, bc: 0, threads: 32 * EPI_ROWS, smem: 0 },
            Kernel::AttnV1 => {
                let (br, bc) = match self.hd {
                    0..=64 => (32, 64),
                    65..=128 => (32, 32),
                    _ => (16, 16),
                };
                let hdp = self.hd + 1;
                // qs [BR][HDP], ks and vs [BC][HDP], ss [BR][BC+1], three row statistics [BR].
                let floats = br * hdp + 2 * bc * hdp + br * (bc + 1) + 3 * br;
                Tiles { br, bc, threads: THREADS, smem: floats * 4 }
            }
            // 4 warps of 16 query rows; qs [64][HD+8], ks and vs [64][HD+8], all 16-bit.
            Kernel::AttnV2 => Tiles { br: 64, bc: 64, threads: THREADS, smem: 3 * 64 * (self.hd + 8) * 2 },
        }
    }
}

/// Every variant the backend can launch.
pub fn all_variants() -> Vec<Variant> {
    let mut v = Vec::new();
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        for hd in HEAD_DIMS {
            v.push(Variant { kernel: Kernel::AttnV1, dtype: dtype.into(), hd, mask: MaskKind::Runtime });
        }
        for &hd in Kernel::AttnV2.head_dims(dtype) {
            for mask in MaskKind::ALL {
                v.push(Variant { kernel: Kernel::AttnV2, dtype: dtype.into(), hd, mask });
            }
        }
        v.push(Variant::epilogue(dtype));
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traits_match_header() {
        // The header's thresholds and sizes, restated: a change to one must change the other.
        assert!(src::TRAITS.contains("#if HM_HD <= 64\n#define HM_BR 32\n#define HM_BC 64"));
        assert!(src::TRAITS.contains("#elif HM_HD <= 128\n#define HM_BR 32\n#define HM_BC 32"));
        assert!(src::TRAITS.contains("#else\n#define HM_BR 16\n#define HM_BC 16"));
        assert!(src::ATTN_V2.contains("#define V2_BR 64 ") && src::ATTN_V2.contains("#define V2_BC 64 "));
        assert!(src::ATTN_V2.contains("#define V2_HDP (HM_HD + 8) "));
        for v in all_variants() {
            let t = v.tiles();
            assert!(t.smem <= 99 * 1024, "{}: {} bytes of shared memory", v.name(), t.smem);
            if v.kernel == Kernel::AttnV1 {
                // HM_OPT = BR·HD / NT output elements per thread must be exact.
                assert_eq!((t.br * v.hd) % t.threads, 0, "{}", v.name());
            }
        }
    }
}
