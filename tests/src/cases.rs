//! Random problems for the backend property suites: a method, sizes, mask, RoPE and weights,
//! drawn by proptest so failures shrink to a small case. One strategy serves every backend;
//! each backend suite chooses the head dims and sizes its device runs in reasonable time.

use headmix::{Config, DType, HeadNorm, Method, NormKind, PosMode, Rope, Weights};
use proptest::prelude::*;

use crate::Case;

/// Limits of a random problem. Every suite draws from [`specs`]; a suite that needs a narrower
/// range (a slow device, the finite differences of the backward) or a wider one (the CUDA
/// kernels' every head dim and window edge) says so here.
#[derive(Clone, Debug)]
pub struct Limits {
    pub max_batch: usize,
    pub max_heads: usize,
    /// Pseudo-heads `P` at most (IHA and custom configurations; `P` may exceed `H`).
    pub max_pseudo: usize,
    pub max_n: usize,
    /// Extra key tokens beyond `N` (a KV-cache prefix), at most (none half the time).
    pub max_extra: usize,
    pub head_dims: Vec<usize>,
    /// Also any even head dim up to this, one draw in six (zero-padded kernel tails).
    pub even_head_dims: Option<usize>,
    pub dtypes: Vec<DType>,
    /// The methods drawn; [`Method::Custom`] draws `Hq` and `Hk` in `1..=max_heads`, dense mixing.
    pub methods: Vec<Method>,
    /// Window edges `(left, right)` in virtual tokens at most (IHA local: its left edge).
    pub max_window: (usize, usize),
    /// Also draw the largest window edge the API accepts (`i32::MAX`).
    pub huge_window: bool,
    /// Position offsets in `0..=max_pos`, and in `far_pos` (inclusive) a third of the time.
    pub max_pos: usize,
    pub far_pos: Option<(usize, usize)>,
    /// Softmax scales drawn in `0.05..max` half the time (else the default); `None`: the default only.
    pub max_scale: Option<f32>,
    /// RoPE bases in `2..1e5` half the time (else 10000).
    pub random_rope_base: bool,
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
            even_head_dims: None,
            dtypes: vec![DType::F32, DType::F16, DType::BF16],
            methods: Method::ALL.to_vec(),
            max_window: (7, 3),
            huge_window: false,
            max_pos: 39,
            far_pos: None,
            max_scale: Some(0.6),
            random_rope_base: false,
        }
    }
}

/// One random problem, before its values are drawn.
#[derive(Clone, Debug)]
pub struct Spec {
    /// The method (one of [`Method::ALL`], or [`Method::Custom`]).
    pub kind: Method,
    pub batch: usize,
    pub heads: usize,
    /// Stored query heads `Hq` (`H` except for [`Method::Custom`]).
    pub q_heads: usize,
    pub kv_heads: usize,
    pub pseudo: usize,
    pub head_dim: usize,
    pub n: usize,
    pub m: usize,
    pub causal: bool,
    /// `(left, right)` in virtual tokens (IHA local always has one, `right = 0`).
    pub window: Option<(usize, usize)>,
    pub rope: Option<PosMode>,
    pub rope_base: f32,
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
        (c.q_heads, c.kv_heads, c.pseudo) = (self.q_heads, self.kv_heads, self.pseudo);
        c = c.with_causal(self.causal);
        c.window = self.window.map(|(left, right)| headmix::Window { left, right });
        if let Some(mode) = self.rope {
            c = c.with_rope(Rope { base: self.rope_base, mode });
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

/// Random problems within `limits`, over its methods.
pub fn specs(limits: Limits) -> impl Strategy<Value = Spec> {
    let l = limits.clone();
    let head_dim = match l.even_head_dims {
        Some(max) => {
            prop_oneof![5 => prop::sample::select(l.head_dims.clone()), 1 => (1..=max / 2).prop_map(|x| 2 * x)].boxed()
        }
        None => prop::sample::select(l.head_dims.clone()).boxed(),
    };
    (
        prop::sample::select(l.methods.clone()),
        1..=l.max_heads,
        1..=l.max_pseudo,
        head_dim,
        prop::sample::select(l.dtypes.clone()),
    )
        .prop_flat_map(move |(kind, heads, pseudo, head_dim, dtype)| {
            let l = limits.clone();
            let pseudo = if matches!(kind, Method::Iha | Method::IhaLocal | Method::Custom) { pseudo } else { 1 };
            let (q_choices, kv_choices): (Vec<usize>, Vec<usize>) = match kind {
                Method::Gqa => (vec![heads], (1..=heads).filter(|g| heads % g == 0).collect()),
                Method::MeaCompressed => (vec![heads], (1..=heads).collect()),
                Method::Custom => ((1..=l.max_heads).collect(), (1..=l.max_heads).collect()),
                _ => (vec![heads], vec![heads]),
            };
            let (wl, wr) = l.max_window;
            let huge = l.huge_window;
            let edge = move |max: usize| {
                let small = 0..=max;
                if huge { prop_oneof![Just(0), small, Just(i32::MAX as usize)].boxed() } else { small.boxed() }
            };
            let pos = match l.far_pos {
                Some((lo, hi)) => prop_oneof![Just(0), 0..=l.max_pos, lo..=hi].boxed(),
                None => (0..=l.max_pos).boxed(),
            };
            let base = if l.random_rope_base {
                prop_oneof![Just(10000.0f32), 2.0..1e5f32].boxed()
            } else {
                Just(10000.0f32).boxed()
            };
            (
                Just((kind, heads, pseudo, head_dim, dtype)),
                (prop::sample::select(q_choices), prop::sample::select(kv_choices)),
                1..=l.max_batch,
                1..=l.max_n,
                prop_oneof![Just(0), 0..=l.max_extra],
                any::<bool>(),
                prop::option::of((edge(wl), edge(wr))),
                (prop_oneof![Just(None), Just(Some(PosMode::Virtual)), Just(Some(PosMode::Token))], base),
                pos,
                l.max_scale.map_or(Just(None).boxed(), |max| prop::option::of(0.05f32..max).boxed()),
                (any::<bool>(), 0..5u8, any::<u64>()),
            )
        })
        .prop_map(
            |(
                (kind, heads, pseudo, head_dim, dtype),
                (q_heads, kv_heads),
                batch,
                n,
                extra,
                causal,
                window,
                (rope, rope_base),
                pos,
                scale,
                (collapse, norm_draw, seed),
            )| {
                let (causal, window) = match kind {
                    Method::Iha => (true, window),
                    Method::IhaLocal => {
                        (true, Some((window.map_or(pseudo - 1, |(l, _)| (l + 1).min(i32::MAX as usize)), 0)))
                    }
                    _ => (causal, window),
                };
                // MEA: the paper's Group norm 3/5 of the time, Rms 1/5, none 1/5; others: none 3/5.
                let mea = matches!(kind, Method::Mea | Method::MeaCompressed);
                let norm = match (mea, norm_draw) {
                    (true, 0..=2) | (false, 2) => Some(NormKind::Group),
                    (_, 3) => Some(NormKind::Rms),
                    _ => None,
                };
                Spec {
                    kind,
                    batch,
                    heads,
                    q_heads,
                    kv_heads,
                    pseudo,
                    head_dim,
                    n,
                    m: n + extra,
                    causal,
                    window,
                    rope,
                    rope_base,
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
