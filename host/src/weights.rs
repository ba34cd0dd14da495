//! Mixing weights and epilogue parameters of one layer (all f32).

use headmix_reference::{MixWeights, NormKind};

use crate::validate::MAX_INDEX;
use crate::{Config, Error, Method, Result, Rng};

/// The head norm of a layer, owning its `[H, d]` vectors:
/// `HeadNorm::Group { gamma, beta }` (MEA's GroupNorm, PyTorch `GroupNorm(H, H*d)`: centred per
/// head, weight and bias) or `HeadNorm::Rms { gamma }` (per-head RMS norm, no centring, no bias).
/// See [`headmix_reference::HeadNorm`] for the formulas.
pub type HeadNorm = headmix_reference::HeadNorm<Vec<f32>>;

/// `aq [Hq, H, P]`, `ak`/`av [Hk, H, P]`, optional collapse `r [H, H·P]` and optional head norm
/// (`gamma`, and `beta` for `Group`, each `[H, d]`).
/// `r = None` returns the pseudo outputs (`[B, N, H, P, d]`, or `[B, N, H, d]` when `P = 1`);
/// `norm = None` skips the norm.
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
    /// Head norm after the collapse (`Group` or `Rms`, `[H, d]` vectors); `None`: no norm.
    pub norm: Option<HeadNorm>,
}

/// The identity norm of a kind: `gamma = 1` (and `beta = 0`), `[H, d]`.
pub fn identity_norm(kind: NormKind, heads: usize, head_dim: usize) -> HeadNorm {
    let gamma = vec![1.0; heads * head_dim];
    match kind {
        NormKind::Group => HeadNorm::Group { gamma, beta: vec![0.0; heads * head_dim] },
        NormKind::Rms => HeadNorm::Rms { gamma },
    }
}

/// `a[m, h, p] = 1` iff source head `m` feeds head `h` (`m == h / (H / S)`), for every `p`.
/// With `S = H` this is the identity; with `S < H` the GQA group replication. Sizes whose
/// product `S·H·P` overflows or exceeds what kernels index (2^31 − 1) give an empty vector,
/// which validation refuses (see [`try_replication`] for the error).
pub fn replication(src: usize, heads: usize, pseudo: usize) -> Vec<f32> {
    try_replication(src, heads, pseudo).unwrap_or_default()
}

/// [`replication`], with sizes beyond the kernels' reach an [`Error::TooLarge`] and a failed
/// allocation an [`Error::OutOfMemory`].
pub fn try_replication(src: usize, heads: usize, pseudo: usize) -> Result<Vec<f32>> {
    let len = weight_len("mixing weights S·H·P", &[src, heads, pseudo])?;
    let mut a = zeros("mixing weights", len)?;
    let group = (heads / src.max(1)).max(1);
    for h in 0..heads {
        let m = h / group;
        if m < src {
            for p in 0..pseudo {
                a[(m * heads + h) * pseudo + p] = 1.0;
            }
        }
    }
    Ok(a)
}

/// The product of `dims`, refused above [`MAX_INDEX`] (kernels index weights with 32-bit ints).
fn weight_len(what: &'static str, dims: &[usize]) -> Result<usize> {
    let len = dims.iter().fold(1u128, |acc, &x| acc.saturating_mul(x as u128));
    if len > MAX_INDEX as u128 {
        return Err(Error::TooLarge { what, elements: len, max: MAX_INDEX as u128 });
    }
    Ok(len as usize)
}

/// A zeroed vector, or [`Error::OutOfMemory`].
fn zeros(what: &'static str, len: usize) -> Result<Vec<f32>> {
    let mut v = Vec::new();
    v.try_reserve_exact(len).map_err(|_| Error::OutOfMemory { what, bytes: 4 * len as u128 })?;
    v.resize(len, 0.0);
    Ok(v)
}

/// `len` normal values (see [`Rng::normal_vec`]), or an error for sizes beyond reach.
fn normals(rng: &mut Rng, what: &'static str, dims: &[usize], std: f64) -> Result<Vec<f32>> {
    let mut v = zeros(what, weight_len(what, dims)?)?;
    v.iter_mut().for_each(|x| *x = (rng.normal() * std) as f32);
    Ok(v)
}

impl Weights {
    /// Weights with every vector empty: what the infallible constructors return for sizes
    /// beyond reach; every entry point refuses them (and the configuration) with a typed error.
    fn empty() -> Weights {
        Weights { aq: Vec::new(), ak: Vec::new(), av: Vec::new(), r: None, norm: None }
    }

    /// The "no mixing" weights of a configuration: identity (or GQA replication) mixing, no
    /// collapse, and for the MEA methods (which always norm) the paper's `Group` norm with
    /// `gamma = 1`, `beta = 0`. Sizes beyond what
    /// kernels index give empty weights (refused by validation); [`Weights::try_identity`] says why.
    pub fn identity(cfg: &Config) -> Weights {
        Weights::try_identity(cfg).unwrap_or_else(|_| Weights::empty())
    }

    /// [`Weights::identity`], or the typed error of sizes beyond reach / a failed allocation.
    pub fn try_identity(cfg: &Config) -> Result<Weights> {
        let (h, p) = (cfg.heads, cfg.pseudo);
        let norm = matches!(cfg.method, Method::Mea | Method::MeaCompressed);
        let norm = if norm {
            let len = weight_len("gamma H·d", &[h, cfg.head_dim])?;
            let mut gamma = zeros("gamma", len)?;
            gamma.iter_mut().for_each(|x| *x = 1.0);
            Some(HeadNorm::Group { gamma, beta: zeros("beta", len)? })
        } else {
            None
        };
        Ok(Weights {
            aq: try_replication(cfg.q_heads, h, p)?,
            ak: try_replication(cfg.kv_heads, h, p)?,
            av: try_replication(cfg.kv_heads, h, p)?,
            r: None,
            norm,
        })
    }

    /// Random weights as a trained layer of the configuration's method would have them:
    /// MHA/GQA identity; MEA identity queries, dense keys/values, a `Group` norm with random
    /// `gamma = 1 + 0.1·N(0, 1)` and `beta = 0.1·N(0, 1)`; IHA dense mixing and a dense collapse.
    /// Entries are `N(0, 1/fan_in)` so activations keep their scale.
    /// Sizes beyond what kernels index give empty weights; [`Weights::try_random`] says why.
    pub fn random(cfg: &Config, seed: u64) -> Weights {
        Weights::try_random(cfg, seed).unwrap_or_else(|_| Weights::empty())
    }

    /// [`Weights::random`], or the typed error of sizes beyond reach / a failed allocation.
    pub fn try_random(cfg: &Config, seed: u64) -> Result<Weights> {
        let mut rng = Rng::new(seed);
        let (h, p, d) = (cfg.heads, cfg.pseudo, cfg.head_dim);
        let mut w = Weights::try_identity(cfg)?;
        let dense = |rng: &mut Rng, src: usize| normals(rng, "mixing weights", &[src, h, p], 1.0 / (src as f64).sqrt());
        match cfg.method {
            Method::Mha | Method::Gqa => {}
            Method::Mea | Method::MeaCompressed => {
                w.ak = dense(&mut rng, cfg.kv_heads)?;
                w.av = dense(&mut rng, cfg.kv_heads)?;
                let mut gamma = zeros("gamma", weight_len("gamma H·d", &[h, d])?)?;
                gamma.iter_mut().for_each(|x| *x = (1.0 + 0.1 * rng.normal()) as f32);
                let beta = normals(&mut rng, "beta", &[h, d], 0.1)?;
                w.norm = Some(HeadNorm::Group { gamma, beta });
            }
            Method::Iha | Method::IhaLocal | Method::Custom => {
                w.aq = dense(&mut rng, cfg.q_heads)?;
                w.ak = dense(&mut rng, cfg.kv_heads)?;
                w.av = dense(&mut rng, cfg.kv_heads)?;
                let hp = h.saturating_mul(p);
                w.r = Some(normals(&mut rng, "collapse H·H·P", &[h, h, p], 1.0 / (hp as f64).sqrt())?);
            }
        }
        Ok(w)
    }

    /// The weights as the reference takes them (borrowed, f32).
    pub fn mix(&self) -> MixWeights<'_, f32> {
        let norm = self.norm.as_ref().map(|n| n.as_slices());
        MixWeights { aq: &self.aq, ak: &self.ak, av: &self.av, r: self.r.as_deref(), norm }
    }

    /// The same weights with the head norm switched to `kind` (`None`: no norm). A `Group` norm
    /// becoming `Rms` drops `beta`; an `Rms` norm becoming `Group` gets `beta = 0`; a layer with
    /// no norm gets the identity norm of the kind (`gamma = 1`, `beta = 0`).
    pub fn with_norm_kind(mut self, kind: Option<NormKind>, cfg: &Config) -> Weights {
        let (h, d) = (cfg.heads, cfg.head_dim);
        self.norm = match (kind, self.norm.take()) {
            (None, _) => None,
            (Some(k), None) => Some(identity_norm(k, h, d)),
            (Some(NormKind::Rms), Some(n)) => Some(HeadNorm::Rms { gamma: n.gamma().clone() }),
            (Some(NormKind::Group), Some(n)) => {
                let beta = n.beta().cloned().unwrap_or_else(|| vec![0.0; n.gamma().len()]);
                Some(HeadNorm::Group { gamma: n.gamma().clone(), beta })
            }
        };
        self
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
