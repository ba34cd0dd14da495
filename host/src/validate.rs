//! Validation of a call: every check runs before any backend touches an output.

use headmix_reference::{Params, Rounding};

use crate::{Config, DType, Error, Result, Tensor, TensorMut, Weights};

/// Largest head dimension any backend supports.
pub const MAX_HEAD_DIM: usize = 256;
/// Largest index kernels use (they index with 32-bit signed integers).
pub const MAX_INDEX: usize = i32::MAX as usize;

/// A validated call: the configuration and the sizes read off the tensors.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Problem {
    /// The configuration.
    pub cfg: Config,
    /// Batch `B`.
    pub batch: usize,
    /// Query tokens `N`.
    pub n: usize,
    /// Key/value tokens `M`.
    pub m: usize,
    /// Element type of q, k, v and the output.
    pub dtype: DType,
    /// Whether the weights carry `r` (output `[B,N,H,d]`), else `[B,N,H,P,d]`.
    pub collapse: bool,
    /// Whether the weights carry `gamma`.
    pub norm: bool,
}

impl Problem {
    /// Output shape.
    pub fn out_shape(&self) -> Vec<usize> {
        let c = &self.cfg;
        if self.collapse {
            vec![self.batch, self.n, c.heads, c.head_dim]
        } else {
            vec![self.batch, self.n, c.heads, c.pseudo, c.head_dim]
        }
    }

    /// Length of the log-sum-exp output `[B, H, N·P]`.
    pub fn lse_len(&self) -> usize {
        self.batch * self.cfg.heads * self.n * self.cfg.pseudo
    }

    /// The reference's parameters for this problem.
    pub fn params(&self) -> Params {
        let c = &self.cfg;
        let mut p = Params::new(self.batch, self.n, self.m, c.q_heads, c.kv_heads, c.heads, c.pseudo, c.head_dim);
        p.causal = c.causal;
        p.window = c.window.map(|w| (w.left, w.right));
        p.rope = c.rope.map(|r| headmix_reference::Rope { base: r.base as f64, mode: r.mode });
        p.pos0 = c.pos_offset;
        p.scale = c.softmax_scale() as f64;
        p.eps = c.norm_eps as f64;
        p.rounding = Rounding::Exact;
        p
    }

    /// Visible (query, key) pairs per (batch, head), counted exactly: the attention work.
    pub fn visible_pairs(&self) -> u64 {
        let p = self.params();
        let (nq, nk) = (p.nq() as i64, p.nk() as i64);
        let off = ((self.m - self.n) * self.cfg.pseudo) as i64;
        let mut total = 0u64;
        for i in 0..nq {
            let ia = i + off;
            let mut lo = 0i64;
            let mut hi = nk - 1;
            if self.cfg.causal {
                hi = hi.min(ia);
            }
            if let Some(w) = self.cfg.window {
                lo = lo.max(ia - w.left as i64);
                hi = hi.min(ia.saturating_add(w.right as i64));
            }
            if hi >= lo {
                total += (hi - lo + 1) as u64;
            }
        }
        total
    }

    /// FLOPs of the attention: `4 · B · H · d ·` visible pairs (the issue's count; mixing excluded).
    pub fn flops(&self) -> f64 {
        4.0 * self.batch as f64 * self.cfg.heads as f64 * self.cfg.head_dim as f64 * self.visible_pairs() as f64
    }
}

fn check_finite(what: &'static str, xs: &[f32]) -> Result<()> {
    match xs.iter().position(|x| !x.is_finite()) {
        Some(index) => Err(Error::NonFinite { what, index, value: xs[index] as f64 }),
        None => Ok(()),
    }
}

fn check_len(what: &'static str, got: usize, expected: usize) -> Result<()> {
    if got != expected { Err(Error::Length { what, expected, got }) } else { Ok(()) }
}

/// Checks of the configuration alone.
pub fn validate_config(c: &Config) -> Result<()> {
    for (what, v) in [("heads", c.heads), ("q_heads", c.q_heads), ("kv_heads", c.kv_heads)] {
        if v == 0 {
            return Err(Error::ZeroHeads { what });
        }
    }
    if c.pseudo == 0 {
        return Err(Error::ZeroPseudoHeads);
    }
    let d = c.head_dim;
    if d == 0 {
        return Err(Error::HeadDim { d, why: "must be positive" });
    }
    if d % 2 != 0 {
        return Err(Error::HeadDim { d, why: "must be even (RoPE pairs t with t + d/2)" });
    }
    if d > MAX_HEAD_DIM {
        return Err(Error::HeadDim { d, why: "larger than the largest supported, 256" });
    }
    if let Some(w) = c.window
        && (w.left > MAX_INDEX || w.right > MAX_INDEX)
    {
        return Err(Error::Window { left: w.left, right: w.right, max: MAX_INDEX });
    }
    if let Some(s) = c.scale
        && (!s.is_finite() || s <= 0.0)
    {
        return Err(Error::Config { what: "scale", value: s as f64, why: "must be finite and positive" });
    }
    if !c.norm_eps.is_finite() || c.norm_eps <= 0.0 {
        return Err(Error::Config { what: "norm_eps", value: c.norm_eps as f64, why: "must be finite and positive" });
    }
    if let Some(r) = c.rope
        && (!r.base.is_finite() || r.base <= 1.0)
    {
        return Err(Error::Config { what: "rope base", value: r.base as f64, why: "must be finite and above 1" });
    }
    if c.pos_offset > MAX_INDEX {
        return Err(Error::Config { what: "pos_offset", value: c.pos_offset as f64, why: "above 2^31 - 1" });
    }
    Ok(())
}

/// Checks of the weights against a configuration.
pub fn validate_weights(c: &Config, w: &Weights) -> Result<()> {
    let (h, p) = (c.heads, c.pseudo);
    check_len("aq", w.aq.len(), c.q_heads * h * p)?;
    check_len("ak", w.ak.len(), c.kv_heads * h * p)?;
    check_len("av", w.av.len(), c.kv_heads * h * p)?;
    check_finite("aq", &w.aq)?;
    check_finite("ak", &w.ak)?;
    check_finite("av", &w.av)?;
    if let Some(r) = &w.r {
        check_len("r", r.len(), h * h * p)?;
        check_finite("r", r)?;
    }
    if let Some(g) = &w.gamma {
        check_len("gamma", g.len(), h * c.head_dim)?;
        check_finite("gamma", g)?;
    }
    Ok(())
}

/// Checks of the sizes of a call: non-empty, `N <= M`, and every virtual-token index within
/// the kernels' 32-bit range. Shared by [`validate`] and the device entry points that take sizes
/// instead of host tensors.
pub fn validate_sizes(cfg: &Config, batch: usize, n: usize, m: usize) -> Result<()> {
    if batch == 0 {
        return Err(Error::Empty { what: "batch" });
    }
    if n == 0 {
        return Err(Error::Empty { what: "query sequence" });
    }
    if n > m {
        return Err(Error::QueryLongerThanKeys { n, m });
    }
    let virt = (batch as u128)
        * (m as u128)
        * (cfg.heads.max(cfg.q_heads).max(cfg.kv_heads) as u128)
        * (cfg.pseudo as u128)
        * (cfg.head_dim as u128);
    if virt > MAX_INDEX as u128 {
        return Err(Error::TooLarge { what: "B·M·H·P·d", elements: virt, max: MAX_INDEX as u128 });
    }
    Ok(())
}

fn check_shape(what: &'static str, got: &[usize], expected: &[usize]) -> Result<()> {
    if got != expected {
        return Err(Error::Shape { what, expected: expected.to_vec(), got: got.to_vec() });
    }
    Ok(())
}

/// Validate a whole forward call; returns the problem the backends run.
pub fn validate(
    cfg: &Config,
    w: &Weights,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    out: &TensorMut,
    lse: Option<&[f32]>,
) -> Result<Problem> {
    validate_config(cfg)?;
    validate_weights(cfg, w)?;
    if q.shape.len() != 4 {
        return Err(Error::Shape { what: "q (expected [B, N, Hq, d])", expected: vec![], got: q.shape.clone() });
    }
    let (batch, n) = (q.shape[0], q.shape[1]);
    if k.shape.len() != 4 {
        return Err(Error::Shape { what: "k (expected [B, M, Hk, d])", expected: vec![], got: k.shape.clone() });
    }
    let m = k.shape[1];
    check_shape("q", &q.shape, &[batch, n, cfg.q_heads, cfg.head_dim])?;
    check_shape("k", &k.shape, &[batch, m, cfg.kv_heads, cfg.head_dim])?;
    check_shape("v", &v.shape, &k.shape)?;
    validate_sizes(cfg, batch, n, m)?;
    check_len("q", q.data.len(), q.shape.iter().product())?;
    check_len("k", k.data.len(), k.shape.iter().product())?;
    check_len("v", v.data.len(), v.shape.iter().product())?;
    let dtype = q.dtype();
    for (what, dt) in [("k", k.dtype()), ("v", v.dtype()), ("out", out.dtype())] {
        if dt != dtype {
            return Err(Error::DType { what, expected: dtype, got: dt });
        }
    }
    let problem = Problem { cfg: *cfg, batch, n, m, dtype, collapse: w.r.is_some(), norm: w.gamma.is_some() };
    check_shape("out", &out.shape, &problem.out_shape())?;
    check_len("out", out.data.len(), out.shape.iter().product())?;
    if let Some(l) = lse {
        check_len("lse", l.len(), problem.lse_len())?;
    }
    Ok(problem)
}
