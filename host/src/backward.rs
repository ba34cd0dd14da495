//! The backward pass through the host API: [`BackwardIo`] (inputs, saved statistics, gradients),
//! its validation, and the adapter from [`Weights`] to the reference's backward layer.
//! The mathematics is in `docs/backward.md`.

use headmix_reference::Real;
use headmix_reference::backward::{Grads, Layer, NormWeights};

use crate::timing::Owned;
use crate::validate::{Problem, check_len, check_shape, validate_inputs};
use crate::{Config, Error, Result, Tensor, TensorMut, Weights};

/// The gradients of the weights (all f32, laid out as the weights).
#[derive(Debug)]
pub struct WeightGrads<'a> {
    /// `[Hq, H, P]`.
    pub daq: &'a mut [f32],
    /// `[Hk, H, P]`.
    pub dak: &'a mut [f32],
    /// `[Hk, H, P]`.
    pub dav: &'a mut [f32],
    /// `[H, H·P]`: required when the weights carry `r`, absent otherwise.
    pub dr: Option<&'a mut [f32]>,
    /// `[H, d]`: required when the weights carry a head norm, absent otherwise.
    pub dgamma: Option<&'a mut [f32]>,
    /// `[H, d]`: required with the Group norm's `beta`, absent otherwise.
    pub dbeta: Option<&'a mut [f32]>,
}

/// The inputs and outputs of one backward call on host memory.
///
/// In: the forward's `q, k, v`, its `out` and `lse` (the saved statistic), and `dout = dL/dout`.
/// Out: `dq, dk, dv` (dtype of `q`) and the weight gradients. Every output is overwritten (not
/// accumulated into); nothing is written unless validation passes.
#[derive(Debug)]
pub struct BackwardIo<'a> {
    /// The forward's stored queries `[B, N, Hq, d]`.
    pub q: Tensor<'a>,
    /// The forward's stored keys `[B, M, Hk, d]`.
    pub k: Tensor<'a>,
    /// The forward's stored values `[B, M, Hk, d]`.
    pub v: Tensor<'a>,
    /// The forward's output, `[B, N, H, d]` (or `[B, N, H, P, d]` without a collapse).
    pub out: Tensor<'a>,
    /// The forward's log-sum-exp, `[B, H, N·P]`.
    pub lse: &'a [f32],
    /// `dL/dout`, the shape of `out`.
    pub dout: Tensor<'a>,
    /// `dL/dq`, the shape and dtype of `q`.
    pub dq: TensorMut<'a>,
    /// `dL/dk`, the shape of `k` (dtype of `q`).
    pub dk: TensorMut<'a>,
    /// `dL/dv`, the shape of `v` (dtype of `q`).
    pub dv: TensorMut<'a>,
    /// The gradients of the weights.
    pub dw: WeightGrads<'a>,
}

/// The Group norm's `beta` of the weights, if they carry a Group norm.
fn beta(w: &Weights) -> Option<&[f32]> {
    match &w.norm {
        Some(crate::HeadNorm::Group { beta, .. }) => Some(beta),
        _ => None,
    }
}

/// The reference's backward layer of the weights.
pub fn layer(w: &Weights) -> Layer<'_, f32> {
    let norm = w.norm.as_ref().map(|n| match n {
        crate::HeadNorm::Group { gamma, beta } => NormWeights::Group { gamma, beta },
        crate::HeadNorm::Rms { gamma } => NormWeights::Rms { gamma },
    });
    Layer { aq: &w.aq, ak: &w.ak, av: &w.av, r: w.r.as_deref(), norm }
}

fn check_optional(
    what: &'static str,
    got: Option<usize>,
    expected: Option<usize>,
    why_absent: &'static str,
) -> Result<()> {
    match (got, expected) {
        (Some(got), Some(expected)) => check_len(what, got, expected),
        (None, None) => Ok(()),
        (None, Some(expected)) => Err(Error::Length { what, expected, got: 0 }),
        (Some(got), None) => Err(Error::Shape { what: why_absent, expected: vec![], got: vec![got] }),
    }
}

/// Validate a whole backward call; returns the problem the backends run.
pub fn validate_backward(cfg: &Config, w: &Weights, io: &BackwardIo) -> Result<Problem> {
    let problem = validate_inputs(cfg, w, &io.q, &io.k, &io.v)?;
    let dtype = problem.dtype;
    let out_shape = problem.out_shape();
    for (what, t) in [("out", &io.out), ("dout", &io.dout)] {
        if t.dtype() != dtype {
            return Err(Error::DType { what, expected: dtype, got: t.dtype() });
        }
        check_shape(what, &t.shape, &out_shape)?;
        check_len(what, t.data.len(), out_shape.iter().product())?;
    }
    check_len("lse", io.lse.len(), problem.lse_len())?;
    for (what, t, like) in [("dq", &io.dq, &io.q), ("dk", &io.dk, &io.k), ("dv", &io.dv, &io.v)] {
        if t.dtype() != dtype {
            return Err(Error::DType { what, expected: dtype, got: t.dtype() });
        }
        check_shape(what, &t.shape, &like.shape)?;
        check_len(what, t.data.len(), like.shape.iter().product())?;
    }
    let c = &problem.cfg;
    let (h, p, d) = (c.heads, c.pseudo, c.head_dim);
    check_len("daq", io.dw.daq.len(), c.q_heads * h * p)?;
    check_len("dak", io.dw.dak.len(), c.kv_heads * h * p)?;
    check_len("dav", io.dw.dav.len(), c.kv_heads * h * p)?;
    let len = |x: &Option<&mut [f32]>| x.as_ref().map(|s| s.len());
    check_optional("dr", len(&io.dw.dr), w.r.as_ref().map(|_| h * h * p), "dr (the weights have no r: pass None)")?;
    check_optional(
        "dgamma",
        len(&io.dw.dgamma),
        w.norm.as_ref().map(|_| h * d),
        "dgamma (the weights have no head norm: pass None)",
    )?;
    check_optional(
        "dbeta",
        len(&io.dw.dbeta),
        beta(w).map(|_| h * d),
        "dbeta (the weights have no Group norm: pass None)",
    )?;
    Ok(problem)
}

/// Owned gradient buffers of one problem: `dq, dk, dv` in the problem's dtype, the weight
/// gradients in f32; a convenience for callers that do not hold their own.
pub struct GradBuffers {
    /// `dq`, `[B, N, Hq, d]` elements in the problem's dtype.
    pub dq: Owned,
    /// `dk`, `[B, M, Hk, d]` elements in the problem's dtype.
    pub dk: Owned,
    /// `dv`, `[B, M, Hk, d]` elements in the problem's dtype.
    pub dv: Owned,
    /// `daq`, the size of the weights' `aq`.
    pub daq: Vec<f32>,
    /// `dak`, the size of the weights' `ak`.
    pub dak: Vec<f32>,
    /// `dav`, the size of the weights' `av`.
    pub dav: Vec<f32>,
    /// `dr`, when the weights carry `r`.
    pub dr: Option<Vec<f32>>,
    /// `dgamma`, when the weights carry a head norm.
    pub dgamma: Option<Vec<f32>>,
    /// `dbeta`, when the weights carry a Group norm's `beta`.
    pub dbeta: Option<Vec<f32>>,
}

impl GradBuffers {
    /// Buffers of the right sizes for `problem` and `w`, every element `fill` (NaN poisons them).
    pub fn new(problem: &Problem, w: &Weights, fill: f32) -> GradBuffers {
        let c = &problem.cfg;
        let (q_len, kv_len) =
            (problem.batch * problem.n * c.q_heads * c.head_dim, problem.batch * problem.m * c.kv_heads * c.head_dim);
        let like = |x: &Vec<f32>| vec![fill; x.len()];
        GradBuffers {
            dq: Owned::filled(problem.dtype, q_len, fill),
            dk: Owned::filled(problem.dtype, kv_len, fill),
            dv: Owned::filled(problem.dtype, kv_len, fill),
            daq: like(&w.aq),
            dak: like(&w.ak),
            dav: like(&w.av),
            dr: w.r.as_ref().map(like),
            dgamma: w.norm.as_ref().map(|n| like(n.gamma())),
            dbeta: beta(w).map(|b| vec![fill; b.len()]),
        }
    }

    /// `dq, dk, dv` (shapes `q_shape`, `kv_shape`) and the weight gradients, as [`BackwardIo`]
    /// takes them.
    pub fn outputs(
        &mut self,
        q_shape: &[usize],
        kv_shape: &[usize],
    ) -> (TensorMut<'_>, TensorMut<'_>, TensorMut<'_>, WeightGrads<'_>) {
        let GradBuffers { dq, dk, dv, daq, dak, dav, dr, dgamma, dbeta } = self;
        let dw = WeightGrads {
            daq,
            dak,
            dav,
            dr: dr.as_deref_mut(),
            dgamma: dgamma.as_deref_mut(),
            dbeta: dbeta.as_deref_mut(),
        };
        (dq.tensor_mut(q_shape), dk.tensor_mut(kv_shape), dv.tensor_mut(kv_shape), dw)
    }

    /// Every gradient as f32, in the reference's [`Grads`] (to compare with it).
    pub fn to_grads(&self) -> Grads<f32> {
        Grads {
            dq: self.dq.to_f32(),
            dk: self.dk.to_f32(),
            dv: self.dv.to_f32(),
            daq: self.daq.clone(),
            dak: self.dak.clone(),
            dav: self.dav.clone(),
            dr: self.dr.clone(),
            dgamma: self.dgamma.clone(),
            dbeta: self.dbeta.clone(),
        }
    }
}

/// The f64 reference gradients of a problem (its own f64 forward for `out` and `lse`), from f32
/// values of the inputs, weights and `dout`.
pub fn reference_grads(problem: &Problem, w: &Weights, q: &[f32], k: &[f32], v: &[f32], dout: &[f32]) -> Grads<f64> {
    reference_grads_in::<f64>(problem, w, q, k, v, dout)
}

/// [`reference_grads`] computed in `T` (f32 gives "the reference run in the same precision").
pub fn reference_grads_in<T: Real>(
    problem: &Problem,
    w: &Weights,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    dout: &[f32],
) -> Grads<T> {
    let f = |x: &[f32]| x.iter().map(|&v| T::from_f64(v as f64)).collect::<Vec<T>>();
    let (aq, ak, av) = (f(&w.aq), f(&w.ak), f(&w.av));
    let (r, gamma, b) = (w.r.as_deref().map(f), w.norm.as_ref().map(|n| f(n.gamma())), beta(w).map(f));
    let norm = gamma.as_deref().map(|gamma| match b.as_deref() {
        Some(beta) => NormWeights::Group { gamma, beta },
        None => NormWeights::Rms { gamma },
    });
    let layer = Layer { aq: &aq, ak: &ak, av: &av, r: r.as_deref(), norm };
    let p = problem.params();
    let (q, k, v) = (f(q), f(k), f(v));
    let fw = headmix_reference::backward::forward(&p, &q, &k, &v, &layer);
    headmix_reference::backward::direct::backward(&p, &q, &k, &v, &layer, Some(&fw.out), &fw.lse, &f(dout))
}
