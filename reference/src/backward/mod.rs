//! The backward pass in f64 (or f32): the gradients of a scalar loss of the operator's output with
//! respect to `q, k, v` and every weight, written down in `docs/backward.md`.
//!
//! Two independent forms check each other, and both are checked against finite differences of the
//! forward (`tests/backward_reference.rs`):
//!
//! * [`direct::backward`]: per batch element and head, FlashAttention-2's algorithm (probabilities
//!   recomputed from the saved `lse`, `D = <do, o>`, `dS = P ∘ (dP − D)`), query-major for `dq`
//!   and key-major for `dk, dv`, the pseudo-gradients of one head mixed back at once;
//! * [`unfused::backward`]: materialise `qt, kt, vt`, textbook attention backward with the softmax
//!   Jacobian on the `N·P` virtual tokens, then the transpose of each step as a whole tensor.

pub mod direct;
pub mod norm;
pub mod unfused;

use crate::{MixWeights, Output, Params, Real};

/// The head norm's weights as the backward sees them (`[H, d]` each).
///
/// [`Layer::from_mix`] is the one place that maps the forward's [`crate::HeadNorm`] to these.
#[derive(Clone, Copy, Debug)]
pub enum NormWeights<'a, T> {
    /// `gamma[h] ∘ x / sqrt(mean(x²) + eps)`.
    Rms { gamma: &'a [T] },
    /// `gamma[h] ∘ (x − mean x) / sqrt(var x + eps) + beta[h]` (one group per head).
    Group { gamma: &'a [T], beta: &'a [T] },
}

impl<'a, T> NormWeights<'a, T> {
    pub fn gamma(&self) -> &'a [T] {
        match *self {
            NormWeights::Rms { gamma } | NormWeights::Group { gamma, .. } => gamma,
        }
    }

    /// Whether the norm subtracts the mean (Group).
    pub fn centred(&self) -> bool {
        matches!(self, NormWeights::Group { .. })
    }
}

/// The weights of one layer for the backward: mixing, optional collapse, optional head norm.
#[derive(Clone, Copy, Debug)]
pub struct Layer<'a, T> {
    /// `[Hq, H, P]`.
    pub aq: &'a [T],
    /// `[Hk, H, P]`.
    pub ak: &'a [T],
    /// `[Hk, H, P]`.
    pub av: &'a [T],
    /// `[H, H·P]`, or `None` for no collapse.
    pub r: Option<&'a [T]>,
    pub norm: Option<NormWeights<'a, T>>,
}

impl<'a, T: Real> Layer<'a, T> {
    /// The layer of the forward's weights.
    pub fn from_mix(w: &MixWeights<'a, T>) -> Layer<'a, T> {
        Layer {
            aq: w.aq,
            ak: w.ak,
            av: w.av,
            r: w.r,
            norm: w.norm.map(|n| match n {
                crate::HeadNorm::Rms { gamma } => NormWeights::Rms { gamma },
                crate::HeadNorm::Group { gamma, beta } => NormWeights::Group { gamma, beta },
            }),
        }
    }

    /// The forward's weights without the head norm (steps 1–7).
    pub fn mix_without_norm(&self) -> MixWeights<'a, T> {
        MixWeights { aq: self.aq, ak: self.ak, av: self.av, r: self.r, norm: None }
    }

    /// Vectors of `d` per attention head in the output: 1 with a collapse, `P` without.
    pub fn width(&self, p: &Params) -> usize {
        if self.r.is_some() { 1 } else { p.p }
    }
}

/// The forward of a [`Layer`]: [`crate::attention`] for steps 1–7, then [`norm::forward`] (so the
/// Group norm can be differentiated before the forward carries it).
pub fn forward<T: Real>(p: &Params, q: &[T], k: &[T], v: &[T], layer: &Layer<T>) -> Output<T> {
    let mut res = crate::attention(p, q, k, v, &layer.mix_without_norm());
    if let Some(nw) = &layer.norm {
        let width = layer.width(p);
        for (idx, x) in res.out.chunks_mut(p.d).enumerate() {
            norm::forward(nw, (idx / width) % p.h, x, p.eps);
        }
    }
    res
}

/// The gradients of a loss with respect to every input and weight of the operator.
#[derive(Clone, Debug, PartialEq)]
pub struct Grads<T> {
    /// `[B, N, Hq, d]`.
    pub dq: Vec<T>,
    /// `[B, M, Hk, d]`.
    pub dk: Vec<T>,
    /// `[B, M, Hk, d]`.
    pub dv: Vec<T>,
    /// `[Hq, H, P]`.
    pub daq: Vec<T>,
    /// `[Hk, H, P]`.
    pub dak: Vec<T>,
    /// `[Hk, H, P]`.
    pub dav: Vec<T>,
    /// `[H, H·P]` with a collapse.
    pub dr: Option<Vec<T>>,
    /// `[H, d]` with a head norm.
    pub dgamma: Option<Vec<T>>,
    /// `[H, d]` with the Group norm.
    pub dbeta: Option<Vec<T>>,
}

impl<T: Real> Grads<T> {
    /// Zero gradients of the right sizes for a problem and layer.
    pub fn zeros(p: &Params, layer: &Layer<T>) -> Grads<T> {
        let (h, pp, d) = (p.h, p.p, p.d);
        Grads {
            dq: vec![T::ZERO; p.b * p.n * p.hq * d],
            dk: vec![T::ZERO; p.b * p.m * p.hk * d],
            dv: vec![T::ZERO; p.b * p.m * p.hk * d],
            daq: vec![T::ZERO; p.hq * h * pp],
            dak: vec![T::ZERO; p.hk * h * pp],
            dav: vec![T::ZERO; p.hk * h * pp],
            dr: layer.r.map(|_| vec![T::ZERO; h * h * pp]),
            dgamma: layer.norm.map(|_| vec![T::ZERO; h * d]),
            dbeta: layer.norm.filter(|n| n.centred()).map(|_| vec![T::ZERO; h * d]),
        }
    }

    /// Every gradient with its name, in a fixed order (absent ones left out).
    pub fn named(&self) -> Vec<(&'static str, &[T])> {
        let mut v: Vec<(&'static str, &[T])> = vec![
            ("dq", &self.dq),
            ("dk", &self.dk),
            ("dv", &self.dv),
            ("daq", &self.daq),
            ("dak", &self.dak),
            ("dav", &self.dav),
        ];
        for (name, g) in [("dr", &self.dr), ("dgamma", &self.dgamma), ("dbeta", &self.dbeta)] {
            if let Some(g) = g {
                v.push((name, g));
            }
        }
        v
    }
}

/// `sum_t a[t]·b[t]`.
pub(crate) fn dot<T: Real>(a: &[T], b: &[T]) -> T {
    let mut s = T::ZERO;
    for (x, y) in a.iter().zip(b) {
        s += *x * *y;
    }
    s
}

/// `y += c·x`.
pub(crate) fn axpy<T: Real>(c: T, x: &[T], y: &mut [T]) {
    for (y, x) in y.iter_mut().zip(x) {
        *y += c * *x;
    }
}
