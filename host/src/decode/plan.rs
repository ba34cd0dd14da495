//! Host-side planning shared by the device decode kernels (CUDA `decode_v1`/`decode_v2`, WGSL
//! `decode.wgsl`): which mixing matrices are selections, how many bytes of a RoPE position the
//! kernels compose and their (cos, sin) table, the visible bands and the flash-decoding split of
//! a call. Each backend adds only what is its own (tile sizes, launch limits, packing).

use crate::decode::{DecodeProblem, band};
use crate::{Config, PosMode, Weights};

/// Whether a mixing matrix `a` `[heads, H·P]` (row-major, `hp = H·P` columns) is a selection:
/// every column one-hot with weight exactly 1 (MHA, GQA, identity). The kernels then skip the
/// zero weights, so a pseudo-head reads only its selected head (NaN policy 1).
pub fn is_selection(a: &[f32], heads: usize, hp: usize) -> bool {
    // The reference's one selection test (columns `hp` = `H·P` read as `H·P` heads of `P = 1`).
    headmix_reference::mixing::selection(a, heads, hp, 1).is_some()
}

/// The kernels' selection bits: bit 0 `aq`, bit 1 `ak`, bit 2 `av` is a selection.
pub fn selection_bits(cfg: &Config, w: &Weights) -> u32 {
    let hp = cfg.heads * cfg.pseudo;
    (is_selection(&w.aq, cfg.q_heads, hp) as u32)
        | (is_selection(&w.ak, cfg.kv_heads, hp) as u32) << 1
        | (is_selection(&w.av, cfg.kv_heads, hp) as u32) << 2
}

/// The largest RoPE position a decode of sequences holding `lens` tokens (of a cache of
/// `capacity` slots) rotates to (at least 0).
pub fn max_position(cfg: &Config, lens: &[usize], capacity: usize) -> u64 {
    let p = cfg.pseudo;
    let unit = match cfg.rope.map(|r| r.mode) {
        Some(PosMode::Token) => 1,
        _ => p,
    };
    lens.iter()
        .map(|&l| {
            let held = l.min(capacity);
            cfg.pos_offset as u64 + ((l - held) * unit) as u64 + (held * p) as u64
        })
        .max()
        .unwrap_or(1)
        .max(1)
        - 1
}

/// Bytes of a position the kernels' RoPE table composes (one table level per byte); 0 without
/// RoPE.
pub fn rope_levels(cfg: &Config, lens: &[usize], capacity: usize) -> u32 {
    if cfg.rope.is_none() {
        return 0;
    }
    (64 - max_position(cfg, lens, capacity).leading_zeros()).div_ceil(8).max(1)
}

/// RoPE table by levels: for level `l`, byte value `b` and frequency index `t`, the (cos, sin) of
/// `b · 256^l · base^(−2t/d)` computed in f64 (`[levels, 256, d/2, 2]`). The kernels compose one
/// entry per byte of a position, so any position below 2^32 is exact to a few f32 ulps with no
/// transcendental or f64 on the device.
pub fn rope_table(levels: u32, d: usize, base: f64) -> Vec<f32> {
    let half = d / 2;
    let mut table = Vec::with_capacity(levels as usize * 256 * half * 2);
    for l in 0..levels {
        for b in 0..256u64 {
            let pos = (b << (8 * l)) as f64;
            for t in 0..half {
                let (sin, cos) = (pos * base.powf(-2.0 * t as f64 / d as f64)).sin_cos();
                table.push(cos as f32);
                table.push(sin as f32);
            }
        }
    }
    table
}

/// The visible [`band`] of every sequence of a validated problem, and the widest one's length.
pub fn bands(problem: &DecodeProblem) -> (Vec<(usize, usize)>, usize) {
    let bands: Vec<(usize, usize)> = problem.stored.iter().map(|&m| band(&problem.cfg, m, problem.n)).collect();
    let widest = bands.iter().map(|(lo, hi)| hi - lo).max().unwrap_or(1).max(1);
    (bands, widest)
}

/// The flash-decoding split of a band of `widest` held tokens into at most `want` splits:
/// `(splits, tokens per split)`, no empty split at the end.
pub fn split(widest: usize, want: usize) -> (usize, usize) {
    let tokens = widest.div_ceil(want.clamp(1, widest.max(1)));
    (widest.div_ceil(tokens), tokens)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selection_is_one_hot_with_weight_one() {
        assert!(is_selection(&[1.0, 0.0, 0.0, 1.0], 2, 2));
        assert!(!is_selection(&[1.0, 0.0, 0.5, 1.0], 2, 2)); // a second non-zero weight
        assert!(!is_selection(&[2.0, 0.0, 0.0, 1.0], 2, 2)); // weight not 1
        assert!(!is_selection(&[0.0, 0.0, 1.0, 0.0], 2, 2)); // an empty column
    }

    #[test]
    fn split_covers_the_band_without_an_empty_split() {
        for widest in 1..60 {
            for want in 1..20 {
                let (s, t) = split(widest, want);
                assert!(s <= want.max(1) && s * t >= widest && (s - 1) * t < widest, "{widest} {want}");
            }
        }
    }

    #[test]
    fn rope_levels_cover_the_largest_position() {
        let cfg = Config::iha(2, 2, 16).with_rope(crate::Rope::default());
        assert_eq!(rope_levels(&cfg, &[100], 128), 1); // positions < 256
        assert_eq!(rope_levels(&cfg, &[200], 256), 2); // 399 needs two bytes
        assert_eq!(rope_levels(&Config::iha(2, 2, 16), &[200], 256), 0);
    }
}
