//! Validation of a call: every check runs before any backend touches an output.

use headmix_reference::{Params, Rounding};

use crate::{Config, DType, Data, Error, Result, Tensor, TensorMut, Weights};

/// Largest head dimension any backend supports.
pub const MAX_HEAD_DIM: usize = 256;
/// Largest index kernels use (they index with 32-bit signed integers).
pub const MAX_INDEX: usize = i32::MAX as usize;

/// Proof of validation: a private field of [`Problem`] and [`crate::DecodeProblem`], so that only
/// this crate's validating constructors can build one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Checked(pub(crate) ());

/// A validated call: the configuration and the sizes read off the tensors.
///
/// Only validation builds one ([`validate`], [`Problem::new`], [`Problem::for_weights`]); the
/// fields are public to read. A problem changed after validation (its fields are plain data) is
/// validated again by every backend entry ([`crate::Backend::run`], [`crate::Backend::time`]) against
/// the weights and tensors it runs with, so no entry reaches a kernel with unchecked sizes.
///
/// ```compile_fail
/// // A problem cannot be written out field by field (it would skip validation).
/// let p = headmix::Problem {
///     cfg: headmix::Config::mha(2, 8), batch: 0, n: 1, m: 1,
///     dtype: headmix::DType::F32, collapse: false, norm: false,
/// };
/// ```
/// ```
/// let cfg = headmix::Config::mha(2, 8);
/// let p = headmix::Problem::new(&cfg, 1, 4, 4, headmix::DType::F32, false, false)?;
/// assert_eq!(p.batch, 1);
/// assert!(headmix::Problem::new(&cfg, 0, 4, 4, headmix::DType::F32, false, false).is_err());
/// # Ok::<(), headmix::Error>(())
/// ```
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
    /// Whether the weights carry a head norm (its kind is in the weights).
    pub norm: bool,
    pub(crate) checked: Checked,
}

impl Problem {
    /// A problem given by sizes (no tensors): the configuration and the sizes validated as
    /// [`validate`] does. `collapse`/`norm`: whether the weights it will run with carry `r`/`gamma`.
    pub fn new(
        cfg: &Config,
        batch: usize,
        n: usize,
        m: usize,
        dtype: DType,
        collapse: bool,
        norm: bool,
    ) -> Result<Problem> {
        validate_config(cfg)?;
        validate_sizes(cfg, batch, n, m)?;
        Ok(Problem { cfg: *cfg, batch, n, m, dtype, collapse, norm, checked: Checked(()) })
    }

    /// [`Problem::new`] for the weights `w` (validated too; `collapse`/`norm` read off them).
    pub fn for_weights(cfg: &Config, w: &Weights, batch: usize, n: usize, m: usize, dtype: DType) -> Result<Problem> {
        validate_config(cfg)?;
        validate_weights(cfg, w)?;
        Problem::new(cfg, batch, n, m, dtype, w.r.is_some(), w.norm.is_some())
    }

    /// Validate the problem again (its fields may have changed since) and check the weights
    /// against it: what every backend entry runs first.
    pub fn check(&self, w: &Weights) -> Result<()> {
        let again = Problem::for_weights(&self.cfg, w, self.batch, self.n, self.m, self.dtype)?;
        if again.collapse != self.collapse || again.norm != self.norm {
            return Err(Error::ProblemMismatch {
                why: format!(
                    "problem has collapse = {}, norm = {}; the weights carry r: {}, a head norm: {}",
                    self.collapse, self.norm, again.collapse, again.norm
                ),
            });
        }
        Ok(())
    }

    /// [`Problem::check`], and the tensors of `io` against the problem (shapes, lengths, dtypes).
    pub fn check_io(&self, w: &Weights, io: &crate::Io) -> Result<()> {
        self.check(w)?;
        // (The opt-in finite check already ran when the problem was built.)
        let unchecked = self.cfg.with_check_finite(false);
        let mut again = validate(&unchecked, w, &io.q, &io.k, &io.v, &io.out, io.lse.as_deref())?;
        again.cfg.check_finite = self.cfg.check_finite;
        if again != *self {
            return Err(Error::ProblemMismatch {
                why: format!(
                    "problem has B = {}, N = {}, M = {}, dtype {:?}; the tensors have B = {}, N = {}, M = {}, dtype {:?}",
                    self.batch, self.n, self.m, self.dtype, again.batch, again.n, again.m, again.dtype
                ),
            });
        }
        Ok(())
    }

    /// Output shape: `[B, N, H, d]` with a collapse or when `P = 1`, else `[B, N, H, P, d]`.
    /// (For `P = 1` without a collapse the 5-D `[B, N, H, 1, d]` is accepted too: same layout.)
    pub fn out_shape(&self) -> Vec<usize> {
        out_shape(&self.cfg, self.batch, self.n, self.collapse)
    }

    /// Whether `shape` is an accepted output shape: [`Problem::out_shape`], or `[B, N, H, 1, d]`
    /// for `P = 1` without a collapse.
    pub fn accepts_out_shape(&self, shape: &[usize]) -> bool {
        let c = &self.cfg;
        shape == self.out_shape().as_slice()
            || (!self.collapse && c.pseudo == 1 && shape == [self.batch, self.n, c.heads, 1, c.head_dim])
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

/// The first NaN or infinity of a tensor, as [`Error::NonFinite`] with its flat index.
pub fn check_finite_data(what: &'static str, data: &Data) -> Result<()> {
    let bad = match data {
        Data::F32(s) => s.iter().position(|x| !x.is_finite()).map(|i| (i, s[i] as f64)),
        Data::F16(s) => s.iter().position(|x| !x.is_finite()).map(|i| (i, s[i].to_f64())),
        Data::BF16(s) => s.iter().position(|x| !x.is_finite()).map(|i| (i, s[i].to_f64())),
    };
    match bad {
        Some((index, value)) => Err(Error::NonFinite { what, index, value }),
        None => Ok(()),
    }
}

pub(crate) fn check_len(what: &'static str, got: usize, expected: usize) -> Result<()> {
    if got != expected { Err(Error::Length { what, expected, got }) } else { Ok(()) }
}

/// A head dimension every backend supports: positive, even, at most [`MAX_HEAD_DIM`].
pub fn validate_head_dim(d: usize) -> Result<()> {
    if d == 0 {
        return Err(Error::HeadDim { d, why: "must be positive" });
    }
    if d % 2 != 0 {
        return Err(Error::HeadDim { d, why: "must be even (RoPE pairs t with t + d/2)" });
    }
    if d > MAX_HEAD_DIM {
        return Err(Error::HeadDim { d, why: "larger than the largest supported, 256" });
    }
    Ok(())
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
    validate_head_dim(c.head_dim)?;
    weight_lens(c)?;
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
    // Kernels fold scale·log2(e) into the queries (exp2 softmax): it must stay a finite f32.
    let scale_log2 = c.softmax_scale() * std::f32::consts::LOG2_E;
    if !scale_log2.is_finite() {
        return Err(Error::Config {
            what: "scale",
            value: c.softmax_scale() as f64,
            why: "scale * log2(e) overflows f32 (must be at most f32::MAX / log2(e))",
        });
    }
    // Normal (not subnormal): devices that flush subnormals would otherwise see eps = 0.
    if !c.norm_eps.is_finite() || c.norm_eps < f32::MIN_POSITIVE {
        return Err(Error::Config {
            what: "norm_eps",
            value: c.norm_eps as f64,
            why: "must be finite, positive and a normal f32 (at least 2^-126)",
        });
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

/// Element counts of the weights `[aq, ak (= av), r, gamma]` of a configuration, each within
/// the kernels' 32-bit indices (computed without overflow).
fn weight_lens(c: &Config) -> Result<[usize; 4]> {
    let (h, p) = (c.heads as u128, c.pseudo as u128);
    let lens = [
        ("aq Hq·H·P", c.q_heads as u128 * h * p),
        ("ak/av Hk·H·P", c.kv_heads as u128 * h * p),
        ("r H·H·P", h * h * p),
        ("gamma H·d", h * c.head_dim as u128),
    ];
    for (what, elements) in lens {
        if elements > MAX_INDEX as u128 {
            return Err(Error::TooLarge { what, elements, max: MAX_INDEX as u128 });
        }
    }
    Ok(lens.map(|(_, l)| l as usize))
}

/// Checks of the weights against a configuration.
pub fn validate_weights(c: &Config, w: &Weights) -> Result<()> {
    let [aq_len, kv_len, r_len, gamma_len] = weight_lens(c)?;
    check_len("aq", w.aq.len(), aq_len)?;
    check_len("ak", w.ak.len(), kv_len)?;
    check_len("av", w.av.len(), kv_len)?;
    check_finite("aq", &w.aq)?;
    check_finite("ak", &w.ak)?;
    check_finite("av", &w.av)?;
    if let Some(r) = &w.r {
        check_len("r", r.len(), r_len)?;
        check_finite("r", r)?;
    }
    if let Some(norm) = &w.norm {
        check_len("gamma", norm.gamma().len(), gamma_len)?;
        if let Some(beta) = norm.beta() {
            check_len("beta", beta.len(), gamma_len)?;
        }
        check_finite("gamma", norm.gamma())?;
        if let Some(beta) = norm.beta() {
            check_finite("beta", beta)?;
        }
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

pub(crate) fn check_shape(what: &'static str, got: &[usize], expected: &[usize]) -> Result<()> {
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
    let problem = validate_inputs(cfg, w, q, k, v)?;
    if out.dtype() != problem.dtype {
        return Err(Error::DType { what: "out", expected: problem.dtype, got: out.dtype() });
    }
    if !problem.accepts_out_shape(&out.shape) {
        check_shape("out", &out.shape, &problem.out_shape())?;
    }
    check_len("out", out.data.len(), out.shape.iter().product())?;
    if let Some(l) = lse {
        check_len("lse", l.len(), problem.lse_len())?;
    }
    Ok(problem)
}

/// Validate the configuration, the weights and `q, k, v` of a call (the forward's and the
/// backward's common part); returns the problem they describe, in `q`'s dtype.
pub fn validate_inputs(cfg: &Config, w: &Weights, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Problem> {
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
    if cfg.check_finite {
        check_finite_data("q", &q.data)?;
        check_finite_data("k", &k.data)?;
        check_finite_data("v", &v.data)?;
    }
    let dtype = q.dtype();
    for (what, dt) in [("k", k.dtype()), ("v", v.dtype())] {
        if dt != dtype {
            return Err(Error::DType { what, expected: dtype, got: dt });
        }
    }
    Ok(Problem { cfg: *cfg, batch, n, m, dtype, collapse: w.r.is_some(), norm: w.norm.is_some(), checked: Checked(()) })
}

/// One binding of a device call for [`check_no_alias`]: its name, address range and whether
/// the call writes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Binding {
    /// The binding's name, as the error reports it (`"out"`, `"q"`...).
    pub what: &'static str,
    /// Device address of the buffer (0: absent, with `bytes` 0).
    pub addr: u64,
    /// Length of the buffer in bytes.
    pub bytes: u64,
    /// Whether the call writes this binding.
    pub written: bool,
}

/// [`Error::Alias`] when a written binding overlaps any other binding (address ranges
/// `[addr, addr + bytes)`, empty ranges overlap nothing): device entries that take pointers
/// check their outputs with it before anything is enqueued.
pub fn check_no_alias(bindings: &[Binding]) -> Result<()> {
    let end = |b: &Binding| b.addr.saturating_add(b.bytes);
    for (i, a) in bindings.iter().enumerate() {
        for (j, b) in bindings.iter().enumerate() {
            if i != j && a.written && a.bytes > 0 && b.bytes > 0 && a.addr < end(b) && b.addr < end(a) {
                return Err(Error::Alias { what: a.what, other: b.what });
            }
        }
    }
    Ok(())
}

/// The output shape of `batch × n` tokens: `[B, N, H, d]` with a collapse or when `P = 1`, else
/// `[B, N, H, P, d]` (the forward's and decode's).
pub(crate) fn out_shape(cfg: &Config, batch: usize, n: usize, collapse: bool) -> Vec<usize> {
    if collapse || cfg.pseudo == 1 {
        vec![batch, n, cfg.heads, cfg.head_dim]
    } else {
        vec![batch, n, cfg.heads, cfg.pseudo, cfg.head_dim]
    }
}
