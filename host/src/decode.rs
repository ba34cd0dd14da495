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
//! log-sum-exp combine. The trait's default ([`decode_default`]) is [`decode_per_sequence`], which
//! unrolls each sequence's cache into a contiguous view and calls the backend's [`Backend::run`].
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

pub mod split;

use crate::cache::{CacheLayout, KvCache};
use crate::timing::Owned;
use crate::validate::{MAX_INDEX, Problem, validate, validate_config, validate_weights};
use crate::{Backend, Config, DType, Data, DataMut, Error, Io, PosMode, Result, Tensor, TensorMut, Weights};

/// A validated decode call.
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
    /// Whether the weights carry `gamma`.
    pub norm: bool,
    /// Tokens held per sequence (`M` of each sequence's attention).
    pub stored: Vec<usize>,
    /// RoPE offset `pos0` of each sequence's first held token.
    pub pos0: Vec<usize>,
}

impl DecodeProblem {
    /// Output shape `[B, N, H, d]` (collapse) or `[B, N, H, P, d]`.
    pub fn out_shape(&self) -> Vec<usize> {
        let c = &self.cfg;
        if self.collapse {
            vec![self.batch, self.n, c.heads, c.head_dim]
        } else {
            vec![self.batch, self.n, c.heads, c.pseudo, c.head_dim]
        }
    }

    /// `[B, H, N·P]`.
    pub fn lse_len(&self) -> usize {
        self.batch * self.cfg.heads * self.n * self.cfg.pseudo
    }

    /// The forward problem of sequence `b`: `N` queries against its `stored[b]` keys at `pos0[b]`.
    pub fn sequence(&self, b: usize) -> Problem {
        Problem {
            cfg: self.cfg.with_pos_offset(self.pos0[b]),
            batch: 1,
            n: self.n,
            m: self.stored[b],
            dtype: self.dtype,
            collapse: self.collapse,
            norm: self.norm,
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
        let p0 = (cache.first_pos(b)? as u128) * virt_unit as u128 + cfg.pos_offset as u128;
        let last = p0 + (m as u128) * cfg.pseudo as u128;
        if last > MAX_INDEX as u128 {
            return Err(Error::Config { what: "decode position", value: last as f64, why: "above 2^31 - 1" });
        }
        stored.push(m);
        pos0.push(p0 as usize);
    }
    let problem = DecodeProblem {
        cfg: *cfg,
        batch: cs.batch,
        n,
        dtype: cs.dtype,
        collapse: w.r.is_some(),
        norm: w.gamma.is_some(),
        stored,
        pos0,
    };
    let out_shape = problem.out_shape();
    if io.out.shape != out_shape {
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
    decode_per_sequence(backend, problem, w, io)
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
