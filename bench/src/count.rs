//! What one forward call does and moves: FLOPs, bytes, and the ceilings they are compared with.

use headmix::{DecodeProblem, Problem};

/// Measured dense bf16 tensor-core throughput of an H100 (SXM) that headmix is compared with,
/// in TFLOP/s: a measured ceiling, used only as the denominator of "% of peak".
pub const H100_MEASURED_DENSE_BF16_TFLOPS: f64 = 790.0;

/// Measured device-to-device copy bandwidth of an H100 (SXM), in TB/s: a measured ceiling,
/// used only as the denominator of "% of bandwidth".
pub const H100_MEASURED_COPY_TB_S: f64 = 3.0;

/// FLOPs of the attention: `4 · B · H · d ·` visible (query, key) pairs, where a sliding window
/// or the causal mask only counts the pairs it lets through (mixing and collapse excluded).
pub fn flops(problem: &Problem) -> f64 {
    problem.flops()
}

/// Bytes of one call at the memory-bound minimum: q, k, v read once and the output written once
/// (`[B, N, H, d]` when collapsed, else `[B, N, H, P, d]`), in the problem's dtype.
pub fn bytes(problem: &Problem) -> f64 {
    let c = &problem.cfg;
    let (b, n, m, d) = (problem.batch as f64, problem.n as f64, problem.m as f64, c.head_dim as f64);
    let q = b * n * c.q_heads as f64 * d;
    let kv = 2.0 * b * m * c.kv_heads as f64 * d;
    let out = problem.out_shape().iter().product::<usize>() as f64;
    (q + kv + out) * problem.dtype.size() as f64
}

/// Bytes of cache one decode call reads: the stored heads of every held token of every sequence,
/// keys and values, `Σ_b held_b · Hk · d · 2 ·` dtype size (`B·M·Hk·d·2·size` when all sequences
/// hold `M` tokens). The mixed pseudo-heads are never read: they are built on chip.
pub fn decode_cache_bytes(problem: &DecodeProblem) -> f64 {
    let c = &problem.cfg;
    let held: usize = problem.stored.iter().sum();
    (2 * held * c.kv_heads * c.head_dim * problem.dtype.size()) as f64
}

/// Bytes of one decode call at the memory-bound minimum: the cache read ([`decode_cache_bytes`]),
/// the new queries `[B, N, Hq, d]` read and the output written.
pub fn decode_bytes(problem: &DecodeProblem) -> f64 {
    let c = &problem.cfg;
    let q = problem.batch * problem.n * c.q_heads * c.head_dim;
    let out = problem.out_shape().iter().product::<usize>();
    decode_cache_bytes(problem) + ((q + out) * problem.dtype.size()) as f64
}

/// FLOPs of one decode call: per sequence, `4 · H · d ·` the pairs its new queries see.
pub fn decode_flops(problem: &DecodeProblem) -> f64 {
    (0..problem.batch).map(|b| problem.sequence(b).flops()).sum()
}

/// Throughput in TFLOP/s of `flops` done in `seconds`.
pub fn tflops(flops: f64, seconds: f64) -> f64 {
    flops / seconds / 1e12
}

/// Bandwidth in GB/s (10⁹ bytes per second) of `bytes` moved in `seconds`.
pub fn gb_s(bytes: f64, seconds: f64) -> f64 {
    bytes / seconds / 1e9
}

/// The measured ceilings of a device, when headmix knows them.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Peak {
    /// Which device the ceilings were measured on.
    pub device: &'static str,
    /// Dense bf16 (and f16) tensor-core TFLOP/s.
    pub tflops: f64,
    /// Device-to-device copy TB/s.
    pub tb_s: f64,
}

/// The H100 SXM ceilings: the only device with known ceilings so far.
pub const H100: Peak =
    Peak { device: "H100 SXM", tflops: H100_MEASURED_DENSE_BF16_TFLOPS, tb_s: H100_MEASURED_COPY_TB_S };

/// The ceilings of a device by the name its driver reports: an H100 other than the PCIe card
/// (`NVIDIA H100 80GB HBM3` is the SXM part). Any other device: `None`, printed as `-`.
pub fn known_peak(device: &str) -> Option<Peak> {
    let d = device.to_ascii_uppercase();
    (d.contains("H100") && !d.contains("PCIE")).then_some(H100)
}

/// Percent of a ceiling, `None` when the device has none.
pub fn pct_peak_flops(tflops: f64, peak: Option<Peak>) -> Option<f64> {
    peak.map(|p| 100.0 * tflops / p.tflops)
}

/// Percent of the copy bandwidth ceiling, `None` when the device has none.
pub fn pct_peak_bw(gb_s: f64, peak: Option<Peak>) -> Option<f64> {
    peak.map(|p| 100.0 * gb_s / (p.tb_s * 1000.0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use headmix::{Config, DType};

    fn problem(cfg: Config, batch: usize, n: usize, m: usize, dtype: DType, collapse: bool) -> Problem {
        Problem::new(&cfg, batch, n, m, dtype, collapse, false).unwrap()
    }

    /// Visible pairs by brute force over the reference's own mask.
    fn brute_pairs(p: &Problem) -> u64 {
        let params = p.params();
        let mut count = 0;
        for i in 0..params.nq() {
            for j in 0..params.nk() {
                count += params.visible(i, j) as u64;
            }
        }
        count
    }

    #[test]
    fn flops_of_full_and_causal_attention_in_closed_form() {
        // No mask: every query sees every key: 4·B·H·d·N·M.
        let p = problem(Config::mha(4, 64), 2, 16, 24, DType::F32, false);
        assert_eq!(flops(&p), 4.0 * 2.0 * 4.0 * 64.0 * 16.0 * 24.0);
        // Causal, M = N = L virtual tokens per head: L(L+1)/2 pairs.
        let p = problem(Config::iha(4, 2, 64), 1, 32, 32, DType::BF16, true);
        let l = 64.0;
        assert_eq!(flops(&p), 4.0 * 4.0 * 64.0 * l * (l + 1.0) / 2.0);
    }

    /// The closed-form count equals the brute-force count over the reference's mask for small
    /// shapes: causal or not, one- and two-sided windows (wider than the sequence too), `M > N`.
    #[test]
    fn flops_equal_brute_force_visible_pairs_on_small_shapes() {
        let windows = [None, Some((0, 0)), Some((2, 1)), Some((5, 0)), Some((0, 3)), Some((1000, 1000))];
        let mut checked = 0;
        for (n, m) in [(1, 1), (3, 3), (4, 9), (7, 7), (2, 5)] {
            for p in [1, 2, 3] {
                for causal in [false, true] {
                    for window in windows {
                        let mut cfg = Config::iha(3, p, 8).with_causal(causal);
                        if let Some((l, r)) = window {
                            cfg = cfg.with_window(l, r);
                        }
                        let pr = problem(cfg, 2, n, m, DType::F32, true);
                        let pairs = brute_pairs(&pr);
                        assert_eq!(pr.visible_pairs(), pairs, "N={n} M={m} P={p} causal={causal} {window:?}");
                        assert_eq!(flops(&pr), 4.0 * 2.0 * 3.0 * 8.0 * pairs as f64);
                        checked += (pairs > 0) as usize;
                    }
                }
            }
        }
        assert!(checked > 100, "the shapes must see keys: {checked}");
    }

    #[test]
    fn windowed_flops_count_only_visible_pairs() {
        // IHA local, N = 64, P = 2: window W = N / (2 P²) = 8 tokens = 16 virtual tokens back.
        let cfg = Config::iha_local(2, 2, 32, 64).unwrap();
        let p = problem(cfg, 1, 64, 64, DType::F16, true);
        assert_eq!(p.visible_pairs(), brute_pairs(&p));
        // Each row sees min(i, 16) + 1 keys over L = 128 virtual rows.
        let want: u64 = (0..128u64).map(|i| i.min(16) + 1).sum();
        assert_eq!(p.visible_pairs(), want);
        assert_eq!(flops(&p), 4.0 * 2.0 * 32.0 * want as f64);
        // And the window cuts the work below the global causal count.
        let global = problem(Config::iha(2, 2, 32), 1, 64, 64, DType::F16, true);
        assert!(flops(&p) < flops(&global));
        // With a KV cache (M > N) and a two-sided window, still the reference's mask.
        let cfg = Config::iha(3, 3, 16).with_window(5, 2);
        let p = problem(cfg, 2, 7, 11, DType::F32, true);
        assert_eq!(p.visible_pairs(), brute_pairs(&p));
    }

    #[test]
    fn bytes_count_q_k_v_read_and_out_written() {
        // GQA: H = 8, G = 2, d = 64, B = 3, N = M = 10, bf16, output [B, N, H, d].
        let cfg = Config::gqa(8, 2, 64).unwrap();
        let p = problem(cfg, 3, 10, 10, DType::BF16, false);
        let want = (3 * 10 * 8 * 64 + 2 * 3 * 10 * 2 * 64 + 3 * 10 * 8 * 64) * 2;
        assert_eq!(bytes(&p), want as f64);
        // IHA without collapse writes [B, N, H, P, d]; f32 is 4 bytes; M > N.
        let p = problem(Config::iha(4, 3, 32), 1, 5, 9, DType::F32, false);
        let want = (5 * 4 * 32 + 2 * 9 * 4 * 32 + 5 * 4 * 3 * 32) * 4;
        assert_eq!(bytes(&p), want as f64);
        // Collapsed, the output is back to [B, N, H, d].
        let p = problem(Config::iha(4, 3, 32), 1, 5, 9, DType::F32, true);
        let want = (5 * 4 * 32 + 2 * 9 * 4 * 32 + 5 * 4 * 32) * 4;
        assert_eq!(bytes(&p), want as f64);
    }

    fn decode_problem(cfg: Config, stored: Vec<usize>, n: usize, dtype: DType, collapse: bool) -> DecodeProblem {
        let batch = stored.len();
        DecodeProblem::new(&cfg, n, dtype, collapse, false, stored, vec![0; batch]).unwrap()
    }

    #[test]
    fn decode_bytes_count_the_stored_heads_and_q_out() {
        // IHA, H = 16, P = 4, d = 128, bf16, B = 8 sequences of 32768 tokens, one new token each:
        // the cache read is B·M·Hk·d·2·2 bytes = 8·32768·16·128·2·2 = 2 GiB (not P× that: the
        // pseudo-heads are mixed on chip), q is 8·16·128·2 bytes, the collapsed out the same.
        let p = decode_problem(Config::iha(16, 4, 128), vec![32768; 8], 1, DType::BF16, true);
        assert_eq!(decode_cache_bytes(&p), (2u64 << 30) as f64);
        assert_eq!(decode_bytes(&p), (2u64 << 30) as f64 + 2.0 * 8.0 * 16.0 * 128.0 * 2.0);
        // Compressed MEA reads Hk = 4 heads; ragged sequences count what each holds; f32; no
        // collapse means a [B, N, H, P, d] output (P = 1 here).
        let cfg = Config::mea_compressed(8, 4, 64).unwrap();
        let p = decode_problem(cfg, vec![10, 7], 2, DType::F32, false);
        let want = (2 * (10 + 7) * 4 * 64 + 2 * 2 * 8 * 64 + 2 * 2 * 8 * 64) * 4;
        assert_eq!(decode_bytes(&p), want as f64);
        // Decode FLOPs: one new token of IHA P = 2 (2 virtual queries, causal, bottom-right) against
        // M = 5 held tokens (10 virtual keys) sees 9 + 10 keys; 4·B·H·d per pair, per sequence.
        let p = decode_problem(Config::iha(2, 2, 8), vec![5, 5], 1, DType::F32, true);
        assert_eq!(decode_flops(&p), 2.0 * 4.0 * 2.0 * 8.0 * 19.0);
    }

    #[test]
    fn rates_and_percentages() {
        assert_eq!(tflops(2e12, 0.5), 4.0);
        assert_eq!(gb_s(3e9, 1.5), 2.0);
        let h100 = known_peak("NVIDIA H100 80GB HBM3");
        assert_eq!(h100, Some(H100));
        assert!((pct_peak_flops(395.0, h100).unwrap() - 50.0).abs() < 1e-12);
        assert!((pct_peak_bw(1500.0, h100).unwrap() - 50.0).abs() < 1e-12);
        // No ceiling known for a CPU, an H100 PCIe card or another GPU: no percentage.
        for other in ["host CPU (2 threads)", "NVIDIA H100 PCIe", "NVIDIA H200", "llvmpipe (LLVM 19.1.7, 256 bits)"] {
            assert_eq!(known_peak(other), None, "{other}");
            assert_eq!(pct_peak_flops(1.0, known_peak(other)), None);
        }
    }
}
