//! Random problems for the backend property suites: a method, sizes, mask, RoPE and weights,
//! drawn by proptest so failures shrink to a small case. One strategy serves every backend;
//! each backend suite chooses the head dims and sizes its device runs in reasonable time.

use headmix::{Config, DType, HeadNorm, Method, NormKind, PosMode, Rope, Weights};
use proptest::prelude::*;

use crate::Case;

/// Limits of a random problem.
#[derive(Clone, Debug)]
pub struct Limits {
    pub max_batch: usize,
    pub max_heads: usize,
    pub max_pseudo: usize,
    pub max_n: usize,
    /// Extra key tokens beyond `N` (a KV-cache prefix), at most.
    pub max_extra: usize,
    pub head_dims: Vec<usize>,
    pub dtypes: Vec<DType>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_batch: 2,
            max_heads: 4,
            max_pseudo: 4,
            max_n: 12,
            max_extra: 6,
            head_dims: vec![2, 4, 8, 16, 32],
            dtypes: vec![DType::F32, DType::F16, DType::BF16],
        }
    }
}

/// One random problem, before its values are drawn.
#[derive(Clone, Debug)]
pub struct Spec {
    /// The named method (one of [`Method::ALL`]).
    pub kind: Method,
    pub batch: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub pseudo: usize,
    pub head_dim: usize,
    pub n: usize,
    pub m: usize,
    pub causal: bool,
    /// `(left, right)` in virtual tokens (IHA local always has one, `right = 0`).
    pub window: Option<(usize, usize)>,
    pub rope: Option<PosMode>,
    pub pos_offset: usize,
    pub scale: Option<f32>,
    pub collapse: bool,
    /// The head norm (MEA always has one; `Group` or `Rms` drawn for every method).
    pub norm: Option<NormKind>,
    pub dtype: DType,
    pub seed: u64,
}

impl Spec {
    /// The configuration this spec describes.
    pub fn config(&self) -> Config {
        let (h, d) = (self.heads, self.head_dim);
        // IHA local's window is drawn (and replaced) below.
        let mut c = self.kind.config(h, self.kv_heads, self.pseudo, d, 1).expect("valid by construction");
        c = c.with_causal(self.causal);
        c.window = self.window.map(|(left, right)| headmix::Window { left, right });
        if let Some(mode) = self.rope {
            c = c.with_rope(Rope { base: 10000.0, mode });
        }
        c = c.with_pos_offset(self.pos_offset);
        if let Some(s) = self.scale {
            c = c.with_scale(s);
        }
        c
    }

    /// Random weights of the method, with `r` and the head norm present as the spec says (random
    /// `gamma` around 1 and, for `Group`, random `beta`: never the identity).
    pub fn weights(&self) -> Weights {
        let cfg = self.config();
        let mut w = Weights::random(&cfg, self.seed ^ 0x9e37_79b9);
        let mut rng = headmix::Rng::new(self.seed ^ 0x51ed);
        let (h, p, d) = (cfg.heads, cfg.pseudo, cfg.head_dim);
        w.r = self
            .collapse
            .then(|| w.r.clone().unwrap_or_else(|| rng.normal_vec(h * h * p, 1.0 / ((h * p) as f64).sqrt())));
        let gamma: Vec<f32> = (0..h * d).map(|_| (1.0 + 0.2 * rng.normal()) as f32).collect();
        w.norm = self.norm.map(|kind| match kind {
            NormKind::Rms => HeadNorm::Rms { gamma },
            NormKind::Group => HeadNorm::Group { gamma, beta: rng.normal_vec(h * d, 0.5) },
        });
        w
    }

    /// The case: fresh random inputs in the spec's dtype.
    pub fn case(&self) -> Case {
        Case::random(self.config(), self.weights(), self.batch, self.n, self.m, self.dtype, self.seed)
    }
}

/// Random problems within `limits`, over every method.
pub fn specs(limits: Limits) -> impl Strategy<Value = Spec> {
    let l = limits.clone();
    (
        prop::sample::select(Method::ALL.to_vec()),
        1..=l.max_heads,
        1..=l.max_pseudo,
        prop::sample::select(l.head_dims.clone()),
        prop::sample::select(l.dtypes.clone()),
    )
        .prop_flat_map(move |(kind, heads, pseudo, head_dim, dtype)| {
            let l = limits.clone();
            let pseudo = match kind {
                Method::Iha | Method::IhaLocal => pseudo.min(heads.max(1)).max(1),
                _ => 1,
            };
            let kv_choices: Vec<usize> = match kind {
                Method::Gqa => (1..=heads).filter(|g| heads % g == 0).collect(),
                Method::MeaCompressed => (1..=heads).collect(),
                _ => vec![heads],
            };
            (
                Just((kind, heads, pseudo, head_dim, dtype)),
                prop::sample::select(kv_choices),
                1..=l.max_batch,
                1..=l.max_n,
                0..=l.max_extra,
                any::<bool>(),
                prop_oneof![3 => Just(None), 1 => (0..8usize, 0..4usize).prop_map(Some)],
                prop_oneof![Just(None), Just(Some(PosMode::Virtual)), Just(Some(PosMode::Token))],
                0..40usize,
                prop_oneof![3 => Just(None), 1 => (0.05f32..0.6).prop_map(Some)],
                (any::<bool>(), 0..4u8, any::<u64>()),
            )
        })
        .prop_map(
            |(
                (kind, heads, pseudo, head_dim, dtype),
                kv_heads,
                batch,
                n,
                extra,
                causal,
                window,
                rope,
                pos,
                scale,
                x,
            )| {
                let (collapse_draw, norm_draw, seed) = x;
                let (causal, window) = match kind {
                    Method::Iha => (true, None),
                    Method::IhaLocal => (true, Some((window.map_or(pseudo - 1, |(l, _)| l + 1), 0))),
                    _ => (causal, window),
                };
                let collapse = collapse_draw;
                // MEA: the paper's Group norm 2/3 of the time, else Rms; others: none half the time.
                let mea = matches!(kind, Method::Mea | Method::MeaCompressed);
                let norm = match (mea, norm_draw) {
                    (true, 0 | 1 | 2) | (false, 2) => Some(NormKind::Group),
                    (_, 3) | (true, _) => Some(NormKind::Rms),
                    (false, _) => None,
                };
                Spec {
                    kind,
                    batch,
                    heads,
                    kv_heads,
                    pseudo,
                    head_dim,
                    n,
                    m: n + extra,
                    causal,
                    window,
                    rope,
                    pos_offset: pos,
                    scale,
                    collapse,
                    norm,
                    dtype,
                    seed,
                }
            },
        )
}
