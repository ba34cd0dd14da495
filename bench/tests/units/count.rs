//! Tests of `bench/src/count.rs`.

use headmix::{Config, DType, Problem};
use headmix_bench::count::*;

fn problem(cfg: Config, batch: usize, n: usize, m: usize, dtype: DType, collapse: bool) -> Problem {
    Problem::new(&cfg, batch, n, m, dtype, collapse, false).unwrap()
}

/// Visible pairs by brute force over the reference's own mask.
fn brute_pairs(p: &Problem) -> u64 {
    let params = p.params();
    (0..params.nq()).flat_map(|i| (0..params.nk()).map(move |j| (i, j))).filter(|&(i, j)| params.visible(i, j)).count()
        as u64
}

#[test]
fn flops_of_full_and_causal_attention_in_closed_form() {
    // No mask: every query sees every key: 4·B·H·d·N·M.
    let p = problem(Config::mha(4, 64).with_causal(false), 2, 16, 24, DType::F32, false);
    assert_eq!(p.flops(), 4.0 * 2.0 * 4.0 * 64.0 * 16.0 * 24.0);
    // Causal, M = N = L virtual tokens per head: L(L+1)/2 pairs.
    let p = problem(Config::iha(4, 2, 64), 1, 32, 32, DType::BF16, true);
    assert_eq!(p.flops(), 4.0 * 4.0 * 64.0 * 64.0 * 65.0 / 2.0);
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
                    assert_eq!(pr.flops(), 4.0 * 2.0 * 3.0 * 8.0 * pairs as f64);
                    checked += (pairs > 0) as usize;
                }
            }
        }
    }
    assert!(checked > 100, "the shapes must see keys: {checked}");
    // IHA local, N = 64, P = 2: W = N / (2 P²) = 8 tokens: each virtual query sees W·P = 16
    // virtual keys, its own included.
    let p = problem(Config::iha_local(2, 2, 32, 64).unwrap(), 1, 64, 64, DType::F16, true);
    let want: u64 = (0..128u64).map(|i| i.min(15) + 1).sum();
    assert_eq!((p.visible_pairs(), brute_pairs(&p)), (want, want));
}

#[test]
fn bytes_count_q_k_v_read_and_out_written() {
    // GQA: H = 8, G = 2, d = 64, B = 3, N = M = 10, bf16, output [B, N, H, d].
    let p = problem(Config::gqa(8, 2, 64).unwrap(), 3, 10, 10, DType::BF16, false);
    assert_eq!(bytes(&p), ((3 * 10 * 8 * 64 + 2 * 3 * 10 * 2 * 64 + 3 * 10 * 8 * 64) * 2) as f64);
    // IHA without collapse writes [B, N, H, P, d]; f32 is 4 bytes; M > N. Collapsed: [B, N, H, d].
    let p = problem(Config::iha(4, 3, 32), 1, 5, 9, DType::F32, false);
    assert_eq!(bytes(&p), ((5 * 4 * 32 + 2 * 9 * 4 * 32 + 5 * 4 * 3 * 32) * 4) as f64);
    let p = problem(Config::iha(4, 3, 32), 1, 5, 9, DType::F32, true);
    assert_eq!(bytes(&p), ((5 * 4 * 32 + 2 * 9 * 4 * 32 + 5 * 4 * 32) * 4) as f64);
}

/// A decode call is counted as its forward problem, `N` new tokens against the `M` held ones:
/// the cache read is the stored heads only.
#[test]
fn decode_bytes_count_the_stored_heads_and_q_out() {
    // IHA, H = 16, P = 2, d = 128, bf16, B = 8 sequences of 32768 tokens, one new token each: the
    // cache read is B·M·Hk·d·2·2 bytes = 2 GiB (not P× that), q and the collapsed out 8·16·128·2.
    let p = problem(Config::iha(16, 2, 128), 8, 1, 32768, DType::BF16, true);
    assert_eq!(bytes(&p), (2u64 << 30) as f64 + 2.0 * 8.0 * 16.0 * 128.0 * 2.0);
    // Compressed MEA reads Hk = 4 heads; f32; no collapse means a [B, N, H, P, d] output.
    let p = problem(Config::mea_compressed(8, 4, 64).unwrap(), 2, 2, 10, DType::F32, false);
    assert_eq!(bytes(&p), ((2 * 2 * 10 * 4 * 64 + 2 * 2 * 8 * 64 + 2 * 2 * 8 * 64) * 4) as f64);
    // One new token of IHA P = 2 against M = 5 held tokens sees 9 + 10 virtual keys, bottom-right.
    let p = problem(Config::iha(2, 2, 8), 2, 1, 5, DType::F32, true);
    assert_eq!(p.flops(), 2.0 * 4.0 * 2.0 * 8.0 * 19.0);
}

#[test]
fn only_an_h100_sxm_and_an_h200_have_known_ceilings() {
    assert_eq!(known_peak("NVIDIA H100 80GB HBM3"), Some(H100));
    assert_eq!(known_peak("NVIDIA H200"), Some(H200));
    for other in ["host CPU (2 threads)", "NVIDIA H100 PCIe", "llvmpipe (LLVM 19.1.7, 256 bits)"] {
        assert_eq!(known_peak(other), None, "{other}");
    }
}
