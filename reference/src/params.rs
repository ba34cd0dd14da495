//! The knobs of the operator, with no validation (the `headmix` crate validates user input).

use half::{bf16, f16};

use crate::Real;

/// Which positions RoPE uses; both are bottom-right aligned (with `M > N` keys, the queries are
/// the last `N` tokens).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PosMode {
    /// Virtual positions: query `i` at `pos0 + i + (M−N)·P`, key `j` at `pos0 + j`.
    Virtual,
    /// Token positions: query token `n` at `pos0 + n + (M−N)`, key token `s` at `pos0 + s`.
    Token,
}

/// Rotary embedding applied after mixing ("rotate-half" pairing, frequencies `base^(-2t/d)`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rope {
    pub base: f64,
    pub mode: PosMode,
}

/// Where a low-precision kernel must round, the reference can round too.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Rounding {
    /// No rounding: compute in the scalar type.
    #[default]
    Exact,
    /// Round mixed q/k/v, probabilities and outputs to IEEE half.
    F16,
    /// Round mixed q/k/v, probabilities and outputs to bfloat16.
    BF16,
}

impl Rounding {
    pub fn round(self, x: f64) -> f64 {
        match self {
            Rounding::Exact => x,
            Rounding::F16 => f16::from_f64(x).to_f64(),
            Rounding::BF16 => bf16::from_f64(x).to_f64(),
        }
    }
}

/// Sizes and options of one head-mixing attention call (see `docs/operator.md` in the headmix repository).
#[derive(Clone, Debug, PartialEq)]
pub struct Params {
    /// Batch size `B`.
    pub b: usize,
    /// Query tokens `N`.
    pub n: usize,
    /// Key/value tokens `M >= N`.
    pub m: usize,
    /// Stored query heads `Hq`.
    pub hq: usize,
    /// Stored key/value heads `Hk`.
    pub hk: usize,
    /// Attention heads `H`.
    pub h: usize,
    /// Pseudo-heads per head `P`.
    pub p: usize,
    /// Head dimension `d`.
    pub d: usize,
    pub causal: bool,
    /// Sliding window `(left, right)` in virtual tokens (FlashAttention's convention): query `i`
    /// at key index `i'` sees key `j` iff `i' − left <= j <= i' + right`: `left` keys before its
    /// own, its own, `right` after.
    pub window: Option<(usize, usize)>,
    pub rope: Option<Rope>,
    /// Position offset `pos0` of RoPE.
    pub pos0: usize,
    /// Softmax scale `s`.
    pub scale: f64,
    /// Head-norm epsilon (used only with a head norm).
    pub eps: f64,
    pub rounding: Rounding,
}

impl Params {
    /// Plain parameters: no mask, no RoPE, default scale `1/sqrt(d)`, eps `1e-5`.
    pub fn new(b: usize, n: usize, m: usize, hq: usize, hk: usize, h: usize, p: usize, d: usize) -> Self {
        Params {
            b,
            n,
            m,
            hq,
            hk,
            h,
            p,
            d,
            causal: false,
            window: None,
            rope: None,
            pos0: 0,
            scale: 1.0 / (d as f64).sqrt(),
            eps: 1e-5,
            rounding: Rounding::Exact,
        }
    }

    /// Number of virtual queries per head, `N·P`.
    pub fn nq(&self) -> usize {
        self.n * self.p
    }

    /// Number of virtual keys per head, `M·P`.
    pub fn nk(&self) -> usize {
        self.m * self.p
    }

    /// Whether virtual key `j` is visible to virtual query `i` (bottom-right aligned).
    pub fn visible(&self, i: usize, j: usize) -> bool {
        let ia = i + (self.m - self.n) * self.p;
        if self.causal && j > ia {
            return false;
        }
        if let Some((left, right)) = self.window
            && (j.saturating_add(left) < ia || j > ia.saturating_add(right))
        {
            return false;
        }
        true
    }

    /// RoPE position of virtual query `i`.
    pub fn q_pos(&self, i: usize) -> usize {
        match self.rope.map(|r| r.mode) {
            Some(PosMode::Token) => self.pos0 + i / self.p + (self.m - self.n),
            _ => self.pos0 + i + (self.m - self.n) * self.p,
        }
    }

    /// RoPE position of virtual key `j`.
    pub fn k_pos(&self, j: usize) -> usize {
        match self.rope.map(|r| r.mode) {
            Some(PosMode::Token) => self.pos0 + j / self.p,
            _ => self.pos0 + j,
        }
    }

    /// Number of elements of the output: `B·N·H·d` collapsed, `B·N·H·P·d` otherwise.
    pub fn out_len(&self, collapse: bool) -> usize {
        self.b * self.n * self.h * self.d * if collapse { 1 } else { self.p }
    }
}

/// Mixing weights and epilogue parameters, in the reference's scalar type.
#[derive(Clone, Copy, Debug)]
pub struct MixWeights<'a, T> {
    /// `[Hq, H, P]`.
    pub aq: &'a [T],
    /// `[Hk, H, P]`.
    pub ak: &'a [T],
    /// `[Hk, H, P]`.
    pub av: &'a [T],
    /// `[H, H·P]`, or `None` for no collapse.
    pub r: Option<&'a [T]>,
    /// Head norm after the collapse (`gamma`, `beta` are `[H, d]`), or `None` for none.
    pub norm: Option<HeadNorm<&'a [T]>>,
}

/// Which head norm runs after the collapse (step 8 of the operator).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum NormKind {
    /// MEA's GroupNorm: one group per head (PyTorch `GroupNorm(H, H*d)`), centred, weight and bias.
    Group,
    /// Per-head RMS norm: no centring, no bias.
    Rms,
}

impl NormKind {
    pub fn name(self) -> &'static str {
        match self {
            NormKind::Group => "group",
            NormKind::Rms => "rms",
        }
    }

    /// `"group"` or `"rms"`.
    pub fn parse(s: &str) -> Option<NormKind> {
        match s {
            "group" => Some(NormKind::Group),
            "rms" => Some(NormKind::Rms),
            _ => None,
        }
    }
}

/// The head norm applied to each output vector `x = out[n, h]` (length `d`), with `eps` from the
/// call's parameters; `gamma` and `beta` are `[H, d]` (row `h` for head `h`).
///
/// * `Group`: `mu = mean(x)`, `var = mean((x - mu)^2)`, `gamma[h] * (x - mu) / sqrt(var + eps) + beta[h]`
///   (MEA's head-level GroupNorm: PyTorch `GroupNorm(H, H*d)` over the concatenated heads);
/// * `Rms`: `gamma[h] * x / sqrt(mean(x^2) + eps)`.
///
/// Generic over how the vectors are held: `HeadNorm<Vec<f32>>` owns them, `HeadNorm<&[T]>` borrows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeadNorm<V> {
    Group { gamma: V, beta: V },
    Rms { gamma: V },
}

impl<V> HeadNorm<V> {
    pub fn kind(&self) -> NormKind {
        match self {
            HeadNorm::Group { .. } => NormKind::Group,
            HeadNorm::Rms { .. } => NormKind::Rms,
        }
    }

    pub fn gamma(&self) -> &V {
        match self {
            HeadNorm::Group { gamma, .. } | HeadNorm::Rms { gamma } => gamma,
        }
    }

    /// `beta` of a `Group` norm; `None` for `Rms`.
    pub fn beta(&self) -> Option<&V> {
        match self {
            HeadNorm::Group { beta, .. } => Some(beta),
            HeadNorm::Rms { .. } => None,
        }
    }

    /// The same norm with `f` applied to each vector (e.g. to convert f32 weights to f64).
    pub fn map<'a, U>(&'a self, mut f: impl FnMut(&'a V) -> U) -> HeadNorm<U> {
        match self {
            HeadNorm::Group { gamma, beta } => HeadNorm::Group { gamma: f(gamma), beta: f(beta) },
            HeadNorm::Rms { gamma } => HeadNorm::Rms { gamma: f(gamma) },
        }
    }

    /// Borrowed slices of an owned norm.
    pub fn as_slices<T>(&self) -> HeadNorm<&[T]>
    where
        V: AsRef<[T]>,
    {
        self.map(|v| v.as_ref())
    }
}

/// Applies `norm` in place to `out`, a sequence of vectors of length `d`, where vector `idx`
/// belongs to head `(idx / width) % h` (`width = P` for pseudo outputs `[B, N, H, P, d]`, 1 for
/// collapsed `[B, N, H, d]`). Two-pass statistics in `T`.
pub fn apply_head_norm<T: Real>(norm: &HeadNorm<&[T]>, out: &mut [T], h: usize, d: usize, width: usize, eps: f64) {
    let (eps, dd) = (T::from_f64(eps), T::from_f64(d as f64));
    for (idx, x) in out.chunks_mut(d).enumerate() {
        let head = (idx / width) % h;
        let g = &norm.gamma()[head * d..(head + 1) * d];
        let mut mu = T::ZERO;
        if norm.kind() == NormKind::Group {
            for &e in x.iter() {
                mu += e;
            }
            mu = mu / dd;
        }
        let mut ss = T::ZERO;
        for &e in x.iter() {
            ss += (e - mu) * (e - mu);
        }
        let inv = T::ONE / (ss / dd + eps).sqrt();
        for t in 0..d {
            x[t] = g[t] * ((x[t] - mu) * inv);
        }
        if let Some(beta) = norm.beta() {
            let b = &beta[head * d..(head + 1) * d];
            for t in 0..d {
                x[t] += b[t];
            }
        }
    }
}

/// What the operator returns.
#[derive(Clone, Debug, PartialEq)]
pub struct Output<T> {
    /// `[B, N, H, d]` when collapsed, `[B, N, H, P, d]` otherwise.
    pub out: Vec<T>,
    /// `[B, H, N·P]`; `-inf` for a row that sees no key.
    pub lse: Vec<T>,
}
