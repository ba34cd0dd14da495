//! The host side of `attn_v3`: which tensors the attention kernel reads directly and which go
//! through the tensor-core pre-mix, the selection tables, the RoPE tables, and the counted bytes
//! of a plan. Pure functions of the configuration and weights, testable without a GPU.

use crate::Config;

/// The one-hot selection a mixing matrix `w [S, H, P]` is (every `(h, p)` column one weight
/// exactly 1, the others exactly 0), as the stored head of each `h*P + p`; `None` for dense
/// mixing. A selection reads only its head (NaN policy): MHA, GQA, the identity, any one-hot.
pub fn selection(w: &[f32], s: usize, hp: usize) -> Option<Vec<i32>> {
    if w.len() != s * hp {
        return None;
    }
    let mut sel = vec![-1i32; hp];
    for m in 0..s {
        for (c, slot) in sel.iter_mut().enumerate() {
            match w[m * hp + c] {
                x if x == 1.0 && *slot < 0 => *slot = m as i32,
                0.0 => {}
                _ => return None,
            }
        }
    }
    sel.iter().all(|&m| m >= 0).then_some(sel)
}

/// How `attn_v3` gets the rows of one tensor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// The stored heads, through the selection table (no mixing, no extra bytes).
    Stored(Vec<i32>),
    /// A pre-mix into a scratch `[B, L, H*P, d]` (dense weights, or RoPE, which rotates the
    /// mixed rows); `Some(sel)`: the pre-mix copies the selected head (no multiply by 0).
    Premixed(Option<Vec<i32>>),
}

impl Source {
    /// Whether the attention reads the stored heads (no pre-mix).
    pub fn is_stored(&self) -> bool {
        matches!(self, Source::Stored(_))
    }
}

/// Which tensors `attn_v3` reads stored and which it pre-mixes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct V3Plan {
    /// Queries.
    pub q: Source,
    /// Keys.
    pub k: Source,
    /// Values.
    pub v: Source,
}

impl V3Plan {
    /// The plan of a configuration and its mixing weights. Queries and keys are pre-mixed when
    /// their mixing is dense or RoPE is on (the pre-mix rotates after mixing), values when
    /// dense.
    pub fn new(cfg: &Config, aq: &[f32], ak: &[f32], av: &[f32]) -> V3Plan {
        let hp = cfg.heads * cfg.pseudo;
        let rope = cfg.rope.is_some();
        let pick = |w: &[f32], s: usize, rotated: bool| match selection(w, s, hp) {
            Some(sel) if !rotated => Source::Stored(sel),
            sel => Source::Premixed(sel),
        };
        V3Plan { q: pick(aq, cfg.q_heads, rope), k: pick(ak, cfg.kv_heads, rope), v: pick(av, cfg.kv_heads, false) }
    }

    /// Bytes the attention kernel reads from q, k and v per batch element and head, for N
    /// queries and M keys with causal tile skipping ignored (`e` bytes per element): each
    /// virtual query row once, each virtual key and value row once per query tile of 128.
    /// For MHA (P = 1, stored rows) this is FlashAttention-2's count: `N*d*e + 2*ceil(N/128)*M*d*e`.
    pub fn attention_bytes(cfg: &Config, n: usize, m: usize, e: usize) -> usize {
        let (p, d) = (cfg.pseudo, cfg.head_dim);
        let tiles = (n * p).div_ceil(128);
        n * p * d * e + 2 * tiles * m * p * d * e
    }

    /// Bytes the pre-mix passes move (reads of the stored heads, writes of the scratch rows).
    pub fn premix_bytes(&self, cfg: &Config, batch: usize, n: usize, m: usize, e: usize) -> usize {
        let (hp, d) = (cfg.heads * cfg.pseudo, cfg.head_dim);
        let one = |src: &Source, l: usize, s: usize| match src {
            Source::Stored(_) => 0,
            Source::Premixed(_) => batch * l * (s + hp) * d * e,
        };
        one(&self.q, n, cfg.q_heads) + one(&self.k, m, cfg.kv_heads) + one(&self.v, m, cfg.kv_heads)
    }
}

/// Division by `p` for dividends below 2^31 as `umulhi(n, mul) >> shr` (CUTLASS's FastDivmod):
/// `mul = ceil(2^(31 + l) / p)`, `shr = l - 1` with `l = ceil(log2 p)`; `(0, 0)` for `p = 1`
/// (the kernel divides by 1 by not dividing).
pub fn fast_div(p: u32) -> (u32, u32) {
    if p <= 1 {
        return (0, 0);
    }
    let l = 32 - (p - 1).leading_zeros();
    ((((1u64 << (31 + l)) + p as u64 - 1) / p as u64) as u32, l - 1)
}

/// Two-level RoPE table for positions `[first, last]`: `angle(pos, t) = pos * base^(-2t/d)` with
/// `pos = hi*128 + lo`; `hi` rows for `hi` in `[first >> 7, last >> 7]` and 128 `lo` rows, each
/// `d/2` (cos, sin) pairs, computed in f64 and stored as f32. The kernel combines them with one
/// complex product (no transcendental on the device): error ~2e-7, within the f32 tolerance.
pub struct RopeTables {
    /// `(cos, sin)` of `hi*128` positions, rows `hi0 ..`.
    pub hi: Vec<f32>,
    /// `(cos, sin)` of positions `0 .. 128`.
    pub lo: Vec<f32>,
    /// The first `hi` row.
    pub hi0: u32,
}

/// The [`RopeTables`] of positions `[first, last]` for head dim `d`.
pub fn rope_tables(base: f32, d: usize, first: u64, last: u64) -> RopeTables {
    let half = d / 2;
    let (hi0, hi1) = (first >> 7, last >> 7);
    let freq: Vec<f64> = (0..half).map(|u| (base as f64).powf(-2.0 * u as f64 / d as f64)).collect();
    let pairs = |rows: std::ops::Range<u64>, unit: f64| {
        let mut t = Vec::with_capacity((rows.end - rows.start) as usize * half * 2);
        for r in rows {
            for f in &freq {
                let (s, c) = (r as f64 * unit * f).sin_cos();
                t.push(c as f32);
                t.push(s as f32);
            }
        }
        t
    };
    RopeTables { hi: pairs(hi0..hi1 + 1, 128.0), lo: pairs(0..128, 1.0), hi0: hi0 as u32 }
}

/// Dynamic shared memory of `hm_v3_mix` for `s` stored heads (mirrors `attn_v3.cu`): the f32
/// y tile `[64][HD+4]`, two x stages `[Spad][HD+8]` and three weight planes `[64][Spad+8]`.
pub fn mix_smem(hd: usize, s: usize) -> usize {
    let sp = s.div_ceil(16) * 16;
    64 * (hd + 4) * 4 + 2 * sp * (hd + 8) * 2 + 3 * 64 * (sp + 8) * 2
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{PosMode, Rope, Weights};

    fn identity(s: usize, h: usize, p: usize) -> Vec<f32> {
        let mut w = vec![0.0; s * h * p];
        for hh in 0..h {
            for pp in 0..p {
                w[hh * h * p + hh * p + pp] = 1.0;
            }
        }
        w
    }

    #[test]
    fn selection_detects_one_hot_columns_only() {
        assert_eq!(selection(&identity(3, 3, 1), 3, 3), Some(vec![0, 1, 2]));
        // GQA: 4 heads over 2 stored heads.
        let mut g = vec![0.0; 2 * 4];
        for h in 0..4 {
            g[(h / 2) * 4 + h] = 1.0;
        }
        assert_eq!(selection(&g, 2, 4), Some(vec![0, 0, 1, 1]));
        // Negative controls: a weight 0.5, a column with two ones, an empty column.
        let mut w = identity(3, 3, 1);
        w[4] = 0.5;
        assert_eq!(selection(&w, 3, 3), None);
        let mut w = identity(3, 3, 1);
        w[1] = 1.0;
        assert_eq!(selection(&w, 3, 3), None);
        let mut w = identity(3, 3, 1);
        w[0] = 0.0;
        assert_eq!(selection(&w, 3, 3), None);
    }

    #[test]
    fn mha_and_gqa_take_the_selection_path_and_read_flash_attention_bytes() {
        for cfg in [Config::mha(16, 128), Config::gqa(16, 4, 128).unwrap()] {
            let w = Weights::random(&cfg, 1);
            let plan = V3Plan::new(&cfg, &w.aq, &w.ak, &w.av);
            assert!(plan.q.is_stored() && plan.k.is_stored() && plan.v.is_stored(), "{plan:?}");
            assert_eq!(plan.premix_bytes(&cfg, 1, 4096, 4096, 2), 0, "no pre-mix bytes");
            // FlashAttention-2 (128-row query tiles): Q once, K and V once per query tile.
            let (n, d, e) = (4096, 128, 2);
            assert_eq!(V3Plan::attention_bytes(&cfg, n, n, e), n * d * e + 2 * (n / 128) * n * d * e);
        }
        // Negative control: IHA's dense weights are pre-mixed, and so is MHA's q/k under RoPE.
        let cfg = Config::iha(4, 2, 64);
        let w = Weights::random(&cfg, 2);
        let plan = V3Plan::new(&cfg, &w.aq, &w.ak, &w.av);
        assert!(!plan.q.is_stored() && !plan.k.is_stored() && !plan.v.is_stored(), "{plan:?}");
        let cfg = Config::mha(4, 64).with_rope(Rope { base: 1e4, mode: PosMode::Virtual });
        let w = Weights::random(&cfg, 3);
        let plan = V3Plan::new(&cfg, &w.aq, &w.ak, &w.av);
        assert!(matches!(plan.q, Source::Premixed(Some(_))) && plan.v.is_stored(), "{plan:?}");
    }

    #[test]
    fn fast_division_is_exact_below_2_pow_31() {
        let q =
            |n: u32, (m, s): (u32, u32), p: u32| if p == 1 { n } else { (((n as u64 * m as u64) >> 32) as u32) >> s };
        let mut rng = crate::Rng::new(7);
        for p in (1..=70u32).chain([127, 128, 129, 1000, 65535, 1 << 20, i32::MAX as u32]) {
            let f = fast_div(p);
            for n in (0..2000u32).chain((0..2000).map(|_| (rng.normal().abs() * 3e8) as u32 % (1 << 31))) {
                assert_eq!(q(n, f, p), n / p, "{n} / {p}");
            }
            let top = (1u32 << 31) - 1;
            assert_eq!(q(top, f, p), top / p, "{top} / {p}");
        }
        // Negative control: a multiplier one too small fails somewhere.
        let (m, s) = fast_div(7);
        assert!((0..1u32 << 31).step_by(9973).any(|n| q(n, (m - 1, s), 7) != n / 7));
    }

    #[test]
    fn rope_tables_rebuild_the_f64_angle() {
        let (base, d) = (10000.0f32, 64usize);
        let t = rope_tables(base, d, 1000, 70_000);
        let half = d / 2;
        for pos in [1000u64, 1127, 4096, 69_999, 70_000] {
            for u in [0usize, 1, 7, 31] {
                let (h, l) = (((pos >> 7) - t.hi0 as u64) as usize, (pos & 127) as usize);
                let (ch, sh) = (t.hi[(h * half + u) * 2] as f64, t.hi[(h * half + u) * 2 + 1] as f64);
                let (cl, sl) = (t.lo[(l * half + u) * 2] as f64, t.lo[(l * half + u) * 2 + 1] as f64);
                let ang = pos as f64 * (base as f64).powf(-2.0 * u as f64 / d as f64);
                assert!((ch * cl - sh * sl - ang.cos()).abs() < 1e-6, "cos at {pos}, {u}");
                assert!((sh * cl + ch * sl - ang.sin()).abs() < 1e-6, "sin at {pos}, {u}");
            }
        }
    }
}
