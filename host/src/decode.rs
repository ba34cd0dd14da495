//! Decode: attention of `n_new` new tokens (their `n_new·P` virtual queries per head) against a
//! [`KvCache`] that already holds them (append first, then decode).
//!
//! The cache holds the stored heads (`Hk` source or compressed heads, unmixed and un-rotated);
//! mixing and RoPE happen inside attention, so a cached key stays valid for every later step.
//! Every sequence of the batch has its own length. For sequence `b` holding `S` tokens whose first
//! is at absolute token `f`, the call is the forward pass with `N = n_new`, `M = S`,
//! bottom-right aligned, and RoPE offset `pos0 = cfg.pos_offset + f·P` (virtual positions) or
//! `cfg.pos_offset + f` (token positions): query `i` is rotated at `pos0 + i + (S − N)·P` and key `j`
//! at `pos0 + j`, exactly the positions these rows and keys have in a forward over the whole
//! sequence. `cfg.pos_offset` is therefore the position of the sequence's token 0. For a causal
//! configuration, a forward on the prompt followed by decode steps equals one forward over the
//! whole sequence (a ring cache keeps exactly the tokens a windowed query can still see).
//!
//! The CPU backend's [`Backend::decode`] runs [`split::decode_host`]: the split-KV
//! (flash-decoding) algorithm device kernels follow, per-chunk `(o, lse)` and an exact
//! log-sum-exp combine. On a cache allocated on a device ([`KvCache::new_on`]), the wgpu and CUDA
//! backends run their decode kernels on the cache in place (one workgroup/block per (sequence,
//! split of the [`band`]) owning all heads, each cached tile read once); the host paths refuse a
//! device cache. The trait's default ([`decode_default`]) is [`decode_per_sequence`], which
//! unrolls each sequence's host cache into a contiguous view and calls the backend's [`Backend::run`].
//!
//! ```
//! use headmix::cache::KvCache;
//! use headmix::decode::DecodeIo;
//! use headmix::{BackendKind, Config, DType, Tensor, TensorMut, Weights};
//!
//! let cfg = Config::iha(4, 2, 16); // H = 4, P = 2, d = 16, causal
//! let w = Weights::random(&cfg, 0);
//! let backend = headmix::open(BackendKind::Cpu)?;
//! let mut cache = KvCache::for_config(&cfg, 1, 128, DType::F32)?; // batch 1, 128 tokens
//! // Prefill: run a forward on the prompt (not shown), then cache its stored k/v heads.
//! let prompt = vec![0.1f32; 10 * 4 * 16];
//! cache.append(&Tensor::new(&prompt, &[1, 10, 4, 16]), &Tensor::new(&prompt, &[1, 10, 4, 16]))?;
//! // Each generated token: append its k/v, then decode its q.
//! let (k, v, q) = (vec![0.2f32; 64], vec![0.3f32; 64], vec![0.4f32; 64]);
//! cache.append(&Tensor::new(&k, &[1, 1, 4, 16]), &Tensor::new(&v, &[1, 1, 4, 16]))?;
//! let mut out = vec![0f32; 64]; // [B, N, H, d]
//! let io = DecodeIo {
//!     q: Tensor::new(&q, &[1, 1, 4, 16]),
//!     cache: &cache,
//!     out: TensorMut::new(&mut out, &[1, 1, 4, 16]),
//!     lse: None,
//! };
//! headmix::decode(backend.as_ref(), &cfg, &w, io)?;
//! # Ok::<(), headmix::Error>(())
//! ```

pub mod plan;
pub mod split;

use crate::cache::{CacheLayout, KvCache};
use crate::timing::Owned;
use crate::validate::{Checked, MAX_INDEX, Problem, validate, validate_config, validate_weights};
use crate::{Backend, Config, DType, Data, DataMut, Error, Io, PosMode, Result, Tensor, TensorMut, Weights};

/// A validated decode call. Only validation builds one ([`validate_decode`],
/// [`DecodeProblem::new`]); fields are public to read, and every backend entry validates the
/// problem again against the call's cache and tensors ([`DecodeProblem::check_io`]).
#[derive(Clone, Debug, PartialEq)]
pub struct DecodeProblem {
    /// The configuration.
    pub cfg: Config,
    /// Batch `B` (the cache's).
    pub batch: usize,
    /// New tokens per sequence `N`.
    pub n: usize,
    /// Element type of q, the cache and the output.
    pub dtype: DType,
    /// Whether the weights carry `r` (output `[B,N,H,d]`), else `[B,N,H,P,d]`.
    pub collapse: bool,
    /// Whether the weights carry a head norm.
    pub norm: bool,
    /// Tokens held per sequence (`M` of each sequence's attention).
    pub stored: Vec<usize>,
    /// RoPE offset `pos0` of each sequence's first held token.
    pub pos0: Vec<usize>,
    checked: Checked,
}

impl DecodeProblem {
    /// A decode problem given by sizes (no cache; for models and reports): sequence `b` holds
    /// `stored[b]` tokens, the first at RoPE offset `pos0[b]`. Validated as a decode call is:
    /// configuration, `N >= 1`, `N <= stored[b]`, and each sequence's forward problem.
    pub fn new(
        cfg: &Config,
        n: usize,
        dtype: DType,
        collapse: bool,
        norm: bool,
        stored: Vec<usize>,
        pos0: Vec<usize>,
    ) -> Result<DecodeProblem> {
        validate_config(cfg)?;
        let batch = stored.len();
        if batch == 0 {
            return Err(Error::Empty { what: "batch" });
        }
        if pos0.len() != batch {
            return Err(Error::Length { what: "pos0 (one per sequence)", expected: batch, got: pos0.len() });
        }
        if n == 0 {
            return Err(Error::Empty { what: "query sequence" });
        }
        for (&m, &p0) in stored.iter().zip(&pos0) {
            Problem::new(&cfg.with_pos_offset(p0), 1, n, m, dtype, collapse, norm)?;
        }
        Ok(DecodeProblem { cfg: *cfg, batch, n, dtype, collapse, norm, stored, pos0, checked: Checked(()) })
    }

    /// Validate the call again (the problem's fields may have changed since) and check that it
    /// is the problem of these weights, cache and tensors: what every decode entry runs first.
    pub fn check_io(&self, w: &Weights, io: &DecodeIo) -> Result<()> {
        // (The opt-in finite check already ran when the problem was built.)
        let mut again = validate_decode(&self.cfg.with_check_finite(false), w, io)?;
        again.cfg.check_finite = self.cfg.check_finite;
        if again != *self {
            return Err(Error::ProblemMismatch {
                why: format!(
                    "decode problem has B = {}, N = {}, stored {:?}, pos0 {:?}; the call has B = {}, N = {}, stored {:?}, pos0 {:?}",
                    self.batch, self.n, self.stored, self.pos0, again.batch, again.n, again.stored, again.pos0
                ),
            });
        }
        Ok(())
    }

    /// `[B, N, H, d]` with a collapse or when `P = 1`, else `[B, N, H, P, d]` (as
    /// [`Problem::out_shape`]; `[B, N, H, 1, d]` is accepted too for `P = 1`).
    pub fn out_shape(&self) -> Vec<usize> {
        crate::validate::out_shape(&self.cfg, self.batch, self.n, self.collapse)
    }

    /// `[B, H, N·P]`.
    pub fn lse_len(&self) -> usize {
        self.batch * self.cfg.heads * self.n * self.cfg.pseudo
    }

    /// The forward problem of sequence `b`: `N` queries against its `stored[b]` keys at `pos0[b]`.
    pub fn sequence(&self, b: usize) -> Problem {
        // Each sequence's problem was validated when this one was built.
        Problem {
            cfg: self.cfg.with_pos_offset(self.pos0[b]),
            batch: 1,
            n: self.n,
            m: self.stored[b],
            dtype: self.dtype,
            collapse: self.collapse,
            norm: self.norm,
            checked: Checked(()),
        }
    }
}

/// The tensors of one decode call: new queries `[B, N, Hq, d]`, the cache (new tokens appended),
/// the output and optional `lse [B, H, N·P]`.
#[derive(Debug)]
pub struct DecodeIo<'a> {
    /// The new tokens' queries `[B, N, Hq, d]`.
    pub q: Tensor<'a>,
    /// The layer's cache, holding the new tokens already.
    pub cache: &'a KvCache,
    /// Output `[B, N, H, d]` (collapse) or `[B, N, H, P, d]`.
    pub out: TensorMut<'a>,
    /// Log-sum-exp `[B, H, N·P]`, when asked for.
    pub lse: Option<&'a mut [f32]>,
}

/// Validate a decode call: configuration, weights, the cache against the configuration (the
/// right layer), shapes, dtypes, and that every sequence holds at least the `N` new tokens.
pub fn validate_decode(cfg: &Config, w: &Weights, io: &DecodeIo) -> Result<DecodeProblem> {
    validate_config(cfg)?;
    validate_weights(cfg, w)?;
    let cache = io.cache;
    cache.check_config(cfg)?;
    let cs = cache.shape();
    let q = &io.q;
    if q.shape.len() != 4 {
        return Err(Error::Shape { what: "q (expected [B, N, Hq, d])", expected: vec![], got: q.shape.clone() });
    }
    let n = q.shape[1];
    let expected = [cs.batch, n, cfg.q_heads, cfg.head_dim];
    if q.shape != expected {
        return Err(Error::Shape {
            what: "q (batch must be the cache's)",
            expected: expected.to_vec(),
            got: q.shape.clone(),
        });
    }
    if q.data.len() != expected.iter().product::<usize>() {
        return Err(Error::Length { what: "q", expected: expected.iter().product(), got: q.data.len() });
    }
    if n == 0 {
        return Err(Error::Empty { what: "query sequence" });
    }
    for (what, dt) in [("q", q.dtype()), ("out", io.out.dtype())] {
        if dt != cs.dtype {
            return Err(Error::DType { what, expected: cs.dtype, got: dt });
        }
    }
    let virt_unit = match cfg.rope.map(|r| r.mode) {
        Some(PosMode::Token) => 1,
        _ => cfg.pseudo,
    };
    let (mut stored, mut pos0) = (Vec::new(), Vec::new());
    for b in 0..cs.batch {
        let m = cache.stored(b)?;
        if n > m {
            return Err(Error::QueryLongerThanKeys { n, m });
        }
        if let CacheLayout::Ring { window_tokens } = cache.layout()
            && n > cs.capacity - window_tokens
        {
            return Err(Error::Cache {
                why: format!("{n} new tokens exceed the ring's room {}", cs.capacity - window_tokens),
            });
        }
        // Sizes of this sequence's attention must stay addressable by 32-bit kernel indices.
        let virt = (m as u128)
            * (cfg.heads.max(cfg.q_heads).max(cfg.kv_heads) as u128)
            * (cfg.pseudo as u128)
            * (cfg.head_dim as u128);
        if virt > MAX_INDEX as u128 {
            return Err(Error::TooLarge { what: "M·H·P·d of one sequence", elements: virt, max: MAX_INDEX as u128 });
        }
        // The sequence's RoPE offset: the same limit as a forward's `pos_offset`, so a decode
        // accepts exactly the positions a forward over the held tokens accepts.
        let p0 = (cache.first_pos(b)? as u128) * virt_unit as u128 + cfg.pos_offset as u128;
        if p0 > MAX_INDEX as u128 {
            return Err(Error::Config { what: "pos_offset", value: p0 as f64, why: "above 2^31 - 1" });
        }
        stored.push(m);
        pos0.push(p0 as usize);
    }
    if cfg.check_finite {
        crate::validate::check_finite_data("q", &q.data)?;
        cache.check_finite()?;
    }
    let problem = DecodeProblem {
        cfg: *cfg,
        batch: cs.batch,
        n,
        dtype: cs.dtype,
        collapse: w.r.is_some(),
        norm: w.norm.is_some(),
        stored,
        pos0,
        checked: Checked(()),
    };
    let out_shape = problem.out_shape();
    if !(Problem { batch: problem.batch, ..problem.sequence(0) }).accepts_out_shape(&io.out.shape) {
        return Err(Error::Shape { what: "out", expected: out_shape, got: io.out.shape.clone() });
    }
    if io.out.data.len() != out_shape.iter().product::<usize>() {
        return Err(Error::Length { what: "out", expected: out_shape.iter().product(), got: io.out.data.len() });
    }
    if let Some(l) = &io.lse
        && l.len() != problem.lse_len()
    {
        return Err(Error::Length { what: "lse", expected: problem.lse_len(), got: l.len() });
    }
    Ok(problem)
}

/// The band `[lo, hi)` of held tokens that any of the `n·P` new virtual queries of a sequence
/// holding `stored >= n` tokens can see under the mask: what device decode kernels visit.
pub fn band(cfg: &Config, stored: usize, n: usize) -> (usize, usize) {
    let p = cfg.pseudo as u64;
    let (off, nq, nk) = ((stored - n) as u64 * p, n as u64 * p, stored as u64 * p);
    let mut lo = 0u64;
    let mut hi = nk - 1;
    if let Some(w) = cfg.window {
        lo = off.saturating_sub(w.left as u64);
        hi = hi.min(off + nq - 1 + w.right as u64);
    }
    if cfg.causal {
        hi = hi.min(off + nq - 1);
    }
    ((lo / p) as usize, (hi / p) as usize + 1)
}

/// Device (or host) time of repeated decode calls and the cache bytes each call reads.
#[derive(Clone, Debug, PartialEq)]
pub struct DecodeTiming {
    /// Seconds per decode call, and the clock that measured them.
    pub timing: crate::Timing,
    /// Cache bytes one call reads (counted from the bands, not measured).
    pub cache_bytes_read: u64,
}

/// Cache bytes one decode of `problem` reads on a cache of `shape`: each held token of every
/// sequence's visible [`band`], keys and values, once (for global attention, the stored-head
/// cache size).
pub fn cache_bytes_read(problem: &DecodeProblem) -> u64 {
    let c = &problem.cfg;
    let row = (c.kv_heads * c.head_dim * problem.dtype.size()) as u64;
    problem.stored.iter().map(|&m| band(c, m, problem.n)).map(|(lo, hi)| 2 * (hi - lo) as u64 * row).sum()
}

/// Random new queries and an output of `n` tokens per sequence for timing decode on `cache`.
pub(crate) fn timing_io(
    cfg: &Config,
    w: &Weights,
    cache: &KvCache,
    n: usize,
) -> (Owned, Vec<usize>, Owned, Vec<usize>) {
    let s = cache.shape();
    let q = Owned::from_f32(s.dtype, &crate::Rng::new(1).normal_vec(s.batch * n * cfg.q_heads * cfg.head_dim, 1.0));
    let out_shape: Vec<usize> = if w.r.is_some() {
        vec![s.batch, n, cfg.heads, cfg.head_dim]
    } else {
        vec![s.batch, n, cfg.heads, cfg.pseudo, cfg.head_dim]
    };
    let out = Owned::filled(s.dtype, out_shape.iter().product(), f32::NAN);
    (q, vec![s.batch, n, cfg.q_heads, cfg.head_dim], out, out_shape)
}

/// [`Backend::time_decode`]'s default: the host clock around `reps` calls of [`decode()`] after
/// one warm-up call.
pub fn time_decode_host<B: Backend + ?Sized>(
    backend: &B,
    cfg: &Config,
    w: &Weights,
    cache: &KvCache,
    n: usize,
    reps: usize,
) -> Result<DecodeTiming> {
    let (q, qs, mut out, os) = timing_io(cfg, w, cache, n);
    let mut seconds = Vec::with_capacity(reps);
    let mut bytes = 0;
    for rep in 0..=reps {
        let io = DecodeIo { q: q.tensor(&qs), cache, out: out.tensor_mut(&os), lse: None };
        let problem = validate_decode(cfg, w, &io)?;
        bytes = cache_bytes_read(&problem);
        let t = std::time::Instant::now();
        backend.decode(&problem, w, io)?;
        if rep > 0 {
            seconds.push(t.elapsed().as_secs_f64());
        }
    }
    Ok(DecodeTiming { timing: crate::Timing { seconds, extra_bytes: 0, clock: "wall clock" }, cache_bytes_read: bytes })
}

/// Validate, then decode on `backend` (see the module docs for the positions and masks).
///
/// `io.q` holds the `N` new tokens `[B, N, Hq, d]`, already appended to `io.cache`; the output is
/// `[B, N, H, d]` with a collapse (else `[B, N, H, P, d]`), equal to those rows of a forward over
/// each whole cached sequence.
///
/// ```
/// use headmix::cache::KvCache;
/// use headmix::decode::{DecodeIo, decode};
/// use headmix::{Config, DType, Tensor, TensorMut, Weights};
///
/// let cfg = Config::mea(2, 8); // H = 2 heads, d = 8, dense key/value mixing, head norm
/// let w = Weights::random(&cfg, 1); // no collapse `r`: the output is [B, N, H, P, d]
/// let mut cache = KvCache::for_config(&cfg, 1, 16, DType::F32)?; // batch 1, up to 16 tokens
/// let kv: Vec<f32> = (0..3 * 2 * 8).map(|i| (i as f32 * 0.37).sin()).collect();
/// cache.append(&Tensor::new(&kv, &[1, 3, 2, 8]), &Tensor::new(&kv, &[1, 3, 2, 8]))?; // 3 tokens
/// let q = vec![0.5f32; 2 * 8]; // the newest token's query
/// let mut out = vec![0f32; 2 * 8];
/// let cpu = headmix::open(headmix::BackendKind::Cpu)?;
/// let io = DecodeIo {
///     q: Tensor::new(&q, &[1, 1, 2, 8]),
///     cache: &cache,
///     out: TensorMut::new(&mut out, &[1, 1, 2, 1, 8]),
///     lse: None,
/// };
/// decode(cpu.as_ref(), &cfg, &w, io)?;
/// assert!(out.iter().all(|x| x.is_finite()));
/// # Ok::<(), headmix::Error>(())
/// ```
pub fn decode(backend: &dyn Backend, cfg: &Config, w: &Weights, io: DecodeIo<'_>) -> Result<()> {
    let problem = validate_decode(cfg, w, &io)?;
    backend.decode(&problem, w, io)
}

/// Validate, then decode on the host by split-KV with at most `splits` chunks per sequence
/// (clamped to `1..=M`): the flash-decoding algorithm of [`split`], written out. Used by the CPU backend
/// (with [`split::DEFAULT_CHUNK_TOKENS`]); this entry point lets tests pick the split count.
pub fn decode_split(cfg: &Config, w: &Weights, io: DecodeIo<'_>, splits: usize) -> Result<()> {
    let problem = validate_decode(cfg, w, &io)?;
    check_host_cache(io.cache, crate::BackendKind::Cpu)?;
    split::decode_host(&problem, w, io, Some(splits))
}

/// What [`Backend::decode`] does unless a backend overrides it: [`decode_per_sequence`], which
/// needs nothing but the backend's [`Backend::run`]. (The CPU backend overrides it with the
/// split-KV algorithm on the host cache, [`split::decode_host`].)
pub fn decode_default<B: Backend + ?Sized>(
    backend: &B,
    problem: &DecodeProblem,
    w: &Weights,
    io: DecodeIo<'_>,
) -> Result<()> {
    check_host_cache(io.cache, backend.kind())?;
    decode_per_sequence(backend, problem, w, io)
}

/// Host decode paths refuse a device-resident cache: only its own backend's decode kernels read
/// it, in place (reading it back here would hide a cache on the wrong backend).
pub fn check_host_cache(cache: &KvCache, backend: crate::BackendKind) -> Result<()> {
    if cache.is_host() {
        return Ok(());
    }
    Err(Error::Cache {
        why: format!(
            "the cache lives on the {} device; decode it with that backend (this is the {backend} backend)",
            cache.location()
        ),
    })
}

fn sub_data<'a>(d: &Data<'a>, at: usize, len: usize) -> Data<'a> {
    match *d {
        Data::F32(s) => Data::F32(&s[at..at + len]),
        Data::F16(s) => Data::F16(&s[at..at + len]),
        Data::BF16(s) => Data::BF16(&s[at..at + len]),
    }
}

fn write_at(dst: &mut DataMut, at: usize, src: &Owned) {
    match (dst, src) {
        (DataMut::F32(d), Owned::F32(s)) => d[at..at + s.len()].copy_from_slice(s),
        (DataMut::F16(d), Owned::F16(s)) => d[at..at + s.len()].copy_from_slice(s),
        (DataMut::BF16(d), Owned::BF16(s)) => d[at..at + s.len()].copy_from_slice(s),
        _ => unreachable!("output dtype is validated"),
    }
}

/// The generic decode: per sequence, unroll its cache into a contiguous `[1, S, Hk, d]` view and
/// run `backend`'s forward with `M = S` and the sequence's `pos0`. Outputs are written only after
/// every sequence ran.
pub fn decode_per_sequence<B: Backend + ?Sized>(
    backend: &B,
    problem: &DecodeProblem,
    w: &Weights,
    io: DecodeIo<'_>,
) -> Result<()> {
    problem.check_io(w, &io)?;
    let c = &problem.cfg;
    let q_row = problem.n * c.q_heads * c.head_dim;
    let out_row: usize = problem.out_shape()[1..].iter().product();
    let lse_row = c.heads * problem.n * c.pseudo;
    let mut results = Vec::with_capacity(problem.batch);
    for b in 0..problem.batch {
        let (k, v) = io.cache.sequence(b)?;
        let m = problem.stored[b];
        let seq_cfg = c.with_pos_offset(problem.pos0[b]);
        let q =
            Tensor { data: sub_data(&io.q.data, b * q_row, q_row), shape: vec![1, problem.n, c.q_heads, c.head_dim] };
        let kv_shape = [1, m, c.kv_heads, c.head_dim];
        let mut out_shape = problem.out_shape();
        out_shape[0] = 1;
        let mut out = Owned::filled(problem.dtype, out_row, f32::NAN);
        let mut lse = vec![f32::NAN; lse_row];
        let (kt, vt) = (k.tensor(&kv_shape), v.tensor(&kv_shape));
        let ot = out.tensor_mut(&out_shape);
        let seq = validate(&seq_cfg, w, &q, &kt, &vt, &ot, Some(&lse))?;
        backend.supports(&seq)?;
        backend.run(&seq, w, Io { q, k: kt, v: vt, out: ot, lse: Some(&mut lse) })?;
        results.push((out, lse));
    }
    let mut out = io.out;
    let mut lse_out = io.lse;
    for (b, (o, l)) in results.iter().enumerate() {
        write_at(&mut out.data, b * out_row, o);
        if let Some(dst) = lse_out.as_deref_mut() {
            dst[b * lse_row..(b + 1) * lse_row].copy_from_slice(l);
        }
    }
    Ok(())
}
