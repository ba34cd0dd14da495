//! The knobs of the operator, with no validation (the `headmix` crate validates user input).

use half::{bf16, f16};

/// Which positions RoPE uses.
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
    /// Sliding window `(left, right)` in virtual tokens.
    pub window: Option<(usize, usize)>,
    pub rope: Option<Rope>,
    /// Position offset `pos0` of RoPE.
    pub pos0: usize,
    /// Softmax scale `s`.
    pub scale: f64,
    /// Head-norm epsilon (used only when `gamma` is given).
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
    /// `[H, d]`, or `None` for no head norm.
    pub gamma: Option<&'a [T]>,
}

/// What the operator returns.
#[derive(Clone, Debug, PartialEq)]
pub struct Output<T> {
    /// `[B, N, H, d]` when collapsed, `[B, N, H, P, d]` otherwise.
    pub out: Vec<T>,
    /// `[B, H, N·P]`; `-inf` for a row that sees no key.
    pub lse: Vec<T>,
}
