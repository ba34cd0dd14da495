//! What one call does and moves: FLOPs, bytes, and the measured ceilings they are compared with.

use headmix::Problem;

/// The measured ceilings of a device, used only as the denominators of "% of peak".
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Peak {
    /// Which device the ceilings were measured on.
    pub device: &'static str,
    /// Dense bf16 (and f16) tensor-core TFLOP/s.
    pub tflops: f64,
    /// Device-to-device copy TB/s.
    pub tb_s: f64,
}

/// The H100 SXM's measured ceilings.
pub const H100: Peak = Peak { device: "H100 SXM", tflops: 790.0, tb_s: 3.0 };
/// The H200's measured ceilings (the machine headmix is benchmarked on): its 4.3 TB/s copy
/// bandwidth is the denominator of every decode row's `%copy` and counted roofline.
pub const H200: Peak = Peak { device: "H200", tflops: 790.0, tb_s: 4.3 };

/// The ceilings of a device by the name its driver reports: an H200, or an H100 other than the
/// PCIe card (`NVIDIA H100 80GB HBM3` is the SXM part). Any other device: `None`, printed as `-`.
pub fn known_peak(device: &str) -> Option<Peak> {
    let d = device.to_ascii_uppercase();
    if d.contains("H200") { Some(H200) } else { (d.contains("H100") && !d.contains("PCIE")).then_some(H100) }
}

/// Bytes of one call at the memory-bound minimum: q, k, v read once and the output written once
/// (`[B, N, H, d]` when collapsed, else `[B, N, H, P, d]`), in the problem's dtype. For a decode
/// call (`N` new tokens against `M` held ones) k and v are the cache read: the stored heads only,
/// `B·M·Hk·d·2·` dtype size; the mixed pseudo-heads are built on chip and never read.
pub fn bytes(problem: &Problem) -> f64 {
    let c = &problem.cfg;
    let q = problem.batch * problem.n * c.q_heads * c.head_dim;
    let kv = 2 * problem.batch * problem.m * c.kv_heads * c.head_dim;
    let out: usize = problem.out_shape().iter().product();
    ((q + kv + out) * problem.dtype.size()) as f64
}
