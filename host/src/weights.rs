//! Mixing weights and epilogue parameters of one layer (all f32).

use crate::{Config, Method, Rng};

/// `aq [Hq, H, P]`, `ak`/`av [Hk, H, P]`, optional collapse `r [H, H·P]` and head norm `gamma [H, d]`.
/// `r = None` returns the pseudo outputs `[B, N, H, P, d]`; `gamma = None` skips the norm.
#[derive(Clone, Debug, PartialEq)]
pub struct Weights {
    /// Query mixing `[Hq, H, P]`.
    pub aq: Vec<f32>,
    /// Key mixing `[Hk, H, P]`.
    pub ak: Vec<f32>,
    /// Value mixing `[Hk, H, P]`.
    pub av: Vec<f32>,
    /// Collapse `[H, H·P]`; `None`: output the pseudo-heads.
    pub r: Option<Vec<f32>>,
    /// Head-norm scale `[H, d]`; `None`: no norm.
    pub gamma: Option<Vec<f32>>,
}

/// `a[m, h, p] = 1` iff source head `m` feeds head `h` (`m == h / (H / S)`), for every `p`.
/// With `S = H` this is the identity; with `S < H` the GQA group replication.
pub fn replication(src: usize, heads: usize, pseudo: usize) -> Vec<f32> {
    let group = (heads / src.max(1)).max(1);
    let mut a = vec![0.0; src * heads * pseudo];
    for h in 0..heads {
        let m = h / group;
        if m < src {
            for p in 0..pseudo {
                a[(m * heads + h) * pseudo + p] = 1.0;
            }
        }
    }
    a
}

impl Weights {
    /// The "no mixing" weights of a configuration: identity (or GQA replication) mixing, no
    /// collapse, and `gamma = 1` for the MEA methods (which always norm).
    pub fn identity(cfg: &Config) -> Weights {
        let (h, p) = (cfg.heads, cfg.pseudo);
        let norm = matches!(cfg.method, Method::Mea | Method::MeaCompressed);
        Weights {
            aq: replication(cfg.q_heads, h, p),
            ak: replication(cfg.kv_heads, h, p),
            av: replication(cfg.kv_heads, h, p),
            r: None,
            gamma: norm.then(|| vec![1.0; h * cfg.head_dim]),
        }
    }

    /// Random weights as a trained layer of the configuration's method would have them:
    /// MHA/GQA identity; MEA identity queries, dense keys/values, random `gamma`; IHA dense
    /// mixing and a dense collapse. Entries are `N(0, 1/fan_in)` so activations keep their scale.
    pub fn random(cfg: &Config, seed: u64) -> Weights {
        let mut rng = Rng::new(seed);
        let (h, p, d) = (cfg.heads, cfg.pseudo, cfg.head_dim);
        let mut w = Weights::identity(cfg);
        let dense = |rng: &mut Rng, src: usize| rng.normal_vec(src * h * p, 1.0 / (src as f64).sqrt());
        match cfg.method {
            Method::Mha | Method::Gqa => {}
            Method::Mea | Method::MeaCompressed => {
                w.ak = dense(&mut rng, cfg.kv_heads);
                w.av = dense(&mut rng, cfg.kv_heads);
                w.gamma = Some((0..h * d).map(|_| (1.0 + 0.1 * rng.normal()) as f32).collect());
            }
            Method::Iha | Method::IhaLocal | Method::Custom => {
                w.aq = dense(&mut rng, cfg.q_heads);
                w.ak = dense(&mut rng, cfg.kv_heads);
                w.av = dense(&mut rng, cfg.kv_heads);
                w.r = Some(rng.normal_vec(h * h * p, 1.0 / ((h * p) as f64).sqrt()));
            }
        }
        w
    }

    /// Whether the query/key/value mixing is the plain replication of [`replication`]: kernels
    /// may skip the mixing then.
    pub fn is_replication(&self, cfg: &Config) -> bool {
        let (h, p) = (cfg.heads, cfg.pseudo);
        p == 1
            && self.aq == replication(cfg.q_heads, h, p)
            && self.ak == replication(cfg.kv_heads, h, p)
            && self.av == replication(cfg.kv_heads, h, p)
    }
}
