//! The kernel variants: one compiled instantiation of a [`KernelSpec`] of the kernel table, and
//! the NVRTC source of each (a `#define` prelude generated from the table, the shared headers,
//! the kernel file).

pub use super::kernel_table::{EPI_ROWS, KERNELS, Kernel, KernelSpec, MaskKind};
use crate::DType;

/// Kernel sources, embedded at build time by the `headmix-kernels-cuda` crate (NVRTC gets one
/// concatenated string, no includes).
pub mod src {
    pub use headmix_kernels_cuda::*;
}

/// The shared headers, in the order NVRTC gets them after the prelude (no `#include`: one
/// concatenated string). A new shared header is one more line here (and one in
/// `kernels-cuda/src/lib.rs`).
pub const HEADERS: &[(&str, &str)] = &[
    ("common.cuh", src::COMMON),
    ("traits.cuh", src::TRAITS),
    ("norm.cuh", src::NORM),
    ("mask.cuh", src::MASK),
    ("softmax.cuh", src::SOFTMAX),
    ("tiles.cuh", src::TILES),
];

impl MaskKind {
    /// The mask kind a configuration needs.
    pub fn of(cfg: &crate::Config) -> MaskKind {
        match (cfg.window, cfg.causal) {
            (Some(_), _) => MaskKind::Window,
            (None, true) => MaskKind::Causal,
            (None, false) => MaskKind::None,
        }
    }

    /// `HM_MASK` in the prelude.
    pub fn code(self) -> u32 {
        match self {
            MaskKind::None => 0,
            MaskKind::Causal => 1,
            MaskKind::Window => 2,
            MaskKind::Runtime => 3,
        }
    }

    /// The mask's part of a variant name (`dense`, `causal`, `window`, `anymask`).
    pub fn name(self) -> &'static str {
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
    /// Index into the kernel's [`KernelSpec::options`] (0 for kernels with one).
    pub option: u8,
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
    /// `HM_DTYPE` in the prelude.
    pub fn code(self) -> u32 {
        match self {
            DTypeKey::F32 => 0,
            DTypeKey::F16 => 1,
            DTypeKey::BF16 => 2,
        }
    }
    /// The dtype's part of a variant name (`f32`, `f16`, `bf16`).
    pub fn name(self) -> &'static str {
        match self {
            DTypeKey::F32 => "f32",
            DTypeKey::F16 => "f16",
            DTypeKey::BF16 => "bf16",
        }
    }
}

impl From<DTypeKey> for DType {
    fn from(d: DTypeKey) -> Self {
        match d {
            DTypeKey::F32 => DType::F32,
            DTypeKey::F16 => DType::F16,
            DTypeKey::BF16 => DType::BF16,
        }
    }
}

/// Launch shape of a variant, from the kernel table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tiles {
    /// Virtual queries per block (`HM_BR`; output rows per block for the epilogue).
    pub br: usize,
    /// Virtual keys per KV tile (`HM_BC`).
    pub bc: usize,
    /// Threads per block (`HM_NT`).
    pub threads: usize,
    /// Dynamic shared memory in bytes (`HM_SMEM`).
    pub smem: usize,
}

impl Variant {
    /// The epilogue of a dtype.
    pub fn epilogue(dtype: DType) -> Variant {
        Variant { kernel: Kernel::CollapseEpilogue, dtype: dtype.into(), hd: 0, mask: MaskKind::None, option: 0 }
    }

    /// The attention variant for a runtime head dim `d`: the smallest capacity `>= d` the kernel
    /// has (None when the kernel cannot run `d` or `dtype`), its first option.
    /// A kernel that does not specialise on the mask gets its `Runtime` module.
    pub fn attention(kernel: Kernel, dtype: DType, d: usize, mask: MaskKind) -> Option<Variant> {
        let mask = if kernel.specialises_mask() { mask } else { MaskKind::Runtime };
        kernel.head_dims(dtype).iter().find(|&&c| c >= d).map(|&hd| Variant {
            kernel,
            dtype: dtype.into(),
            hd,
            mask,
            option: 0,
        })
    }

    /// This variant's kernel-table entry.
    pub fn spec(&self) -> &'static KernelSpec {
        self.kernel.spec()
    }

    /// The variant of a name (as [`Variant::name`] writes it), if it is in [`all_variants`].
    pub fn parse(name: &str) -> Option<Variant> {
        all_variants().into_iter().find(|v| v.name() == name)
    }

    /// Name of the variant, e.g. `v1_bf16_d128_causal`.
    pub fn name(&self) -> String {
        let spec = self.spec();
        let option = spec.options[self.option as usize].name;
        let sep = if option.is_empty() { "" } else { "_" };
        if spec.head_dims.is_empty() {
            format!("{}_{}{sep}{option}", spec.name, self.dtype.name())
        } else {
            format!("{}_{}_d{}_{}{sep}{option}", spec.name, self.dtype.name(), self.hd, self.mask.name())
        }
    }

    /// Tiles and launch shape, from the kernel table.
    pub fn tiles(&self) -> Tiles {
        let spec = self.spec();
        let (br, bc) = (spec.tiles)(self.hd);
        Tiles { br, bc, threads: spec.threads, smem: (spec.smem)(self.hd, br, bc) }
    }

    /// The `#define`s that select this variant, in prelude order: every one of them comes from the
    /// kernel table (the headers and kernels restate none).
    pub fn defines(&self) -> Vec<(&'static str, i64)> {
        let (spec, t) = (self.spec(), self.tiles());
        let mut d = vec![("HM_KERNEL", spec.number as i64), ("HM_DTYPE", self.dtype.code() as i64)];
        if self.hd > 0 {
            d.push(("HM_HD", self.hd as i64));
        }
        d.extend([
            ("HM_MASK", self.mask.code() as i64),
            ("HM_NT", t.threads as i64),
            ("HM_BR", t.br as i64),
            ("HM_BC", t.bc as i64),
            ("HM_SMEM", t.smem as i64),
            ("HM_EPI_ROWS", EPI_ROWS as i64),
        ]);
        d.extend(spec.options[self.option as usize].defines.iter().copied());
        d
    }

    /// The prelude NVRTC gets first: a comment naming the variant, then [`Variant::defines`].
    pub fn prelude(&self) -> String {
        let mut p = format!("// headmix variant {} (prelude generated from kernel_table.rs)\n", self.name());
        for (name, value) in self.defines() {
            p += &format!("#define {name} {value}\n");
        }
        p
    }

    /// The full NVRTC source: the prelude, the shared headers, the kernel.
    pub fn source(&self) -> String {
        let mut s = self.prelude();
        for (_, text) in HEADERS {
            s += text;
            s += "\n";
        }
        s += self.spec().source;
        s += "\n";
        s
    }

    /// The g++ flags that build this variant on the CPU emulator (`kernels-cuda/emu/emu.cpp`):
    /// the prelude's defines, the kernel file and its entry point.
    pub fn emu_flags(&self) -> Vec<String> {
        let spec = self.spec();
        let mut f: Vec<String> = self.defines().iter().map(|(n, v)| format!("-D{n}={v}")).collect();
        f.push(format!("-DHM_KERNEL_FILE={}", spec.file)); // emu.cpp stringizes it
        f.push(format!("-DHM_ENTRY={}", spec.entry));
        f
    }
}

/// Every variant the backend can launch: each kernel-table entry × its dtypes × head-dim
/// capacities × mask kinds × options.
pub fn all_variants() -> Vec<Variant> {
    let mut v = Vec::new();
    for spec in KERNELS {
        let hds: &[usize] = if spec.head_dims.is_empty() { &[0] } else { spec.head_dims };
        for &dtype in spec.dtypes {
            for &hd in hds {
                for &mask in spec.masks {
                    for option in 0..spec.options.len() {
                        v.push(Variant { kernel: spec.kernel, dtype: dtype.into(), hd, mask, option: option as u8 });
                    }
                }
            }
        }
    }
    v
}

/// The attention variants the CPU emulator runs (`headmix kernels --emu-grid`): all of them.
pub fn emu_grid() -> Vec<Variant> {
    all_variants().into_iter().filter(|v| v.spec().number > 0).collect()
}

/// A subset of [`emu_grid`] in which every kernel runs every dtype, head-dim capacity, mask kind
/// and option at least once (what the `nvrtc_compile` test runs; `run.sh` runs the whole grid).
pub fn emu_cover() -> Vec<Variant> {
    let mut out = Vec::new();
    for spec in KERNELS.iter().filter(|s| s.number > 0) {
        let n = [spec.dtypes.len(), spec.head_dims.len(), spec.masks.len(), spec.options.len()].into_iter().max();
        for i in 0..n.unwrap_or(0) {
            out.push(Variant {
                kernel: spec.kernel,
                dtype: spec.dtypes[i % spec.dtypes.len()].into(),
                hd: spec.head_dims[i % spec.head_dims.len()],
                mask: spec.masks[i % spec.masks.len()],
                option: (i % spec.options.len()) as u8,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variant_names_are_unique_and_parse_back() {
        let all = all_variants();
        for v in &all {
            assert_eq!(Variant::parse(&v.name()), Some(*v), "{}", v.name());
            assert_eq!(all.iter().filter(|w| w.name() == v.name()).count(), 1, "{}", v.name());
        }
        assert_eq!(Variant::parse("v2_bf16_d128_causal").map(|v| v.kernel), Some(Kernel::AttnV2));
        assert_eq!(Variant::parse("v2_f32_d128_causal"), None, "v2 has no f32");
    }

    #[test]
    fn launch_shapes_fit_the_hardware() {
        for v in all_variants() {
            let t = v.tiles();
            // 227 KiB: the most one block may opt in to on sm_90 (the backend checks the device's own).
            assert!(t.smem <= 227 * 1024, "{}: {} bytes of shared memory", v.name(), t.smem);
            assert!(t.threads % 32 == 0 && t.threads <= 1024, "{}: {} threads", v.name(), t.threads);
            assert!(t.br > 0, "{}", v.name());
            if v.spec().number > 0 {
                assert!(t.bc > 0 && v.hd > 0, "{}", v.name());
            }
        }
    }

    #[test]
    fn the_prelude_defines_each_name_once_and_selects_the_variant() {
        let v = Variant::attention(Kernel::AttnV2, DType::BF16, 100, MaskKind::Causal).unwrap();
        assert_eq!(v.hd, 128, "the smallest capacity >= d");
        let d = v.defines();
        for (i, (name, _)) in d.iter().enumerate() {
            assert!(d[i + 1..].iter().all(|(n, _)| n != name), "{name} defined twice");
        }
        let get = |n: &str| d.iter().find(|(k, _)| *k == n).map(|(_, v)| *v);
        assert_eq!(get("HM_KERNEL"), Some(2));
        assert_eq!(get("HM_DTYPE"), Some(2));
        assert_eq!(get("HM_HD"), Some(128));
        assert_eq!(get("HM_MASK"), Some(1));
        assert_eq!(get("HM_BR"), Some(v.tiles().br as i64));
        assert_eq!(get("HM_SMEM"), Some(v.tiles().smem as i64));
        // A kernel that reads the mask at run time gets its one module.
        let v1 = Variant::attention(Kernel::AttnV1, DType::F32, 32, MaskKind::Window).unwrap();
        assert_eq!(v1.mask, MaskKind::Runtime);
        assert!(Variant::attention(Kernel::AttnV2, DType::F32, 32, MaskKind::None).is_none());
        assert!(Variant::attention(Kernel::AttnV1, DType::F32, 300, MaskKind::None).is_none());
    }

    #[test]
    fn the_emulator_cover_runs_every_axis_of_every_kernel() {
        let cover = emu_cover();
        for spec in KERNELS.iter().filter(|s| s.number > 0) {
            let mine: Vec<_> = cover.iter().filter(|v| v.kernel == spec.kernel).collect();
            for &d in spec.dtypes {
                assert!(mine.iter().any(|v| DType::from(v.dtype) == d), "{} {d:?}", spec.name);
            }
            for &hd in spec.head_dims {
                assert!(mine.iter().any(|v| v.hd == hd), "{} d{hd}", spec.name);
            }
            for &m in spec.masks {
                assert!(mine.iter().any(|v| v.mask == m), "{} {m:?}", spec.name);
            }
            for o in 0..spec.options.len() {
                assert!(mine.iter().any(|v| v.option as usize == o), "{} option {o}", spec.name);
            }
        }
        let grid = emu_grid();
        assert!(cover.iter().all(|v| grid.contains(v)), "the cover is part of the grid");
        assert!(grid.iter().all(|v| v.kernel != Kernel::CollapseEpilogue), "the epilogue runs inside each build");
    }
}
