//! The backward pass through the host API: [`BackwardIo`] (inputs, saved statistics, gradients),
//! its validation, and the adapter from [`Weights`] to the reference's backward layer.
//! The mathematics is in `docs/backward.md`.

use headmix_reference::backward::{Layer, NormWeights};

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
    pub q: Tensor<'a>,
    pub k: Tensor<'a>,
    pub v: Tensor<'a>,
    /// The forward's output, `[B, N, H, d]` (or `[B, N, H, P, d]` without a collapse).
    pub out: Tensor<'a>,
    /// The forward's log-sum-exp, `[B, H, N·P]`.
    pub lse: &'a [f32],
    /// `dL/dout`, the shape of `out`.
    pub dout: Tensor<'a>,
    pub dq: TensorMut<'a>,
    pub dk: TensorMut<'a>,
    pub dv: TensorMut<'a>,
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
