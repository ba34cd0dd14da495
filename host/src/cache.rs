//! The KV cache of decode: per layer, the *stored* (source, unmixed, un-rotated) key and value
//! heads `[B, capacity, Hk, d]` of every sequence of a batch.
//!
//! headmix mixes keys into pseudo-keys and rotates them (RoPE after mixing) inside attention, at
//! each key's absolute position, so a key stored once stays valid for every later step: the cache
//! holds `Hk` heads per token, not the `H·P` mixed pseudo-heads an unfused IHA would keep.
//!
//! Two layouts:
//! * **linear**: token `t` of a sequence lives in slot `t`; appending past the capacity is an
//!   [`Error::Cache`];
//! * **ring** (IHA local, sliding windows): token `t` lives in slot `t % capacity`, and a capacity
//!   of `window tokens + max new tokens` keeps every key a new query can still see, so memory stays
//!   `O(W)` however long the generation. Older tokens are overwritten (they can never be visible
//!   again).
//!
//! Storage is behind [`KvStorage`] so device-resident caches (CUDA, wgpu) can be added as variants.

use crate::timing::Owned;
use crate::{Config, DType, Data, Error, Result, Tensor};

/// Where a cache's bytes live. Host memory only for now; device backends add their own variants.
#[non_exhaustive]
pub enum KvStorage {
    /// Host buffers `[B, capacity, Hk, d]` for keys and values, in the cache's dtype.
    Host {
        /// Keys.
        k: Owned,
        /// Values.
        v: Owned,
    },
}

impl std::fmt::Debug for KvStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KvStorage::Host { k, .. } => write!(f, "Host({} elements per tensor)", owned_len(k)),
        }
    }
}

fn owned_len(o: &Owned) -> usize {
    match o {
        Owned::F32(x) => x.len(),
        Owned::F16(x) => x.len(),
        Owned::BF16(x) => x.len(),
    }
}

/// Copy `len` elements of `src` (same dtype as `dst`) from `src_at` into `dst` at `dst_at`.
fn copy_into(dst: &mut Owned, dst_at: usize, src: &Data, src_at: usize, len: usize) {
    match (dst, src) {
        (Owned::F32(d), Data::F32(s)) => d[dst_at..dst_at + len].copy_from_slice(&s[src_at..src_at + len]),
        (Owned::F16(d), Data::F16(s)) => d[dst_at..dst_at + len].copy_from_slice(&s[src_at..src_at + len]),
        (Owned::BF16(d), Data::BF16(s)) => d[dst_at..dst_at + len].copy_from_slice(&s[src_at..src_at + len]),
        _ => unreachable!("dtypes are checked before copying"),
    }
}

/// Copy `len` elements of one owned buffer into another of the same dtype.
fn copy_owned(dst: &mut Owned, dst_at: usize, src: &Owned, src_at: usize, len: usize) {
    let data = match src {
        Owned::F32(s) => Data::F32(s),
        Owned::F16(s) => Data::F16(s),
        Owned::BF16(s) => Data::BF16(s),
    };
    copy_into(dst, dst_at, &data, src_at, len);
}

/// How token positions map to slots.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CacheLayout {
    /// Token `t` in slot `t`; the capacity bounds the sequence length.
    Linear,
    /// Token `t` in slot `t % capacity`; `window_tokens` is the number of past tokens a new query
    /// may still see (`ceil(left / P)` of the attention window), so one decode may bring at most
    /// `capacity − window_tokens` new tokens. Appends of any length are fine: only the last
    /// `capacity` tokens are kept (a long prompt, prefilled by a forward, then appended whole).
    Ring {
        /// Past tokens a new query may still see.
        window_tokens: usize,
    },
}

/// The per-layer shape every call must match.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CacheShape {
    /// Sequences `B`.
    pub batch: usize,
    /// Tokens each sequence can hold.
    pub capacity: usize,
    /// Stored key/value heads `Hk`.
    pub kv_heads: usize,
    /// Head dimension `d`.
    pub head_dim: usize,
    /// Element type.
    pub dtype: DType,
}

/// One layer's KV cache.
#[derive(Debug)]
pub struct KvCache {
    shape: CacheShape,
    layout: CacheLayout,
    storage: KvStorage,
    /// Tokens ever appended, per sequence (the absolute length of the sequence).
    lens: Vec<usize>,
}

/// Tokens of the past a query may see under a configuration's window, or `None` when the
/// configuration has no window (every past token stays visible).
///
/// The window is in virtual tokens: the first pseudo-query of token `t` (virtual index `t·P`)
/// reaches back to virtual key `t·P − left`, i.e. token `t − ceil(left / P)`. A decode of `n` new
/// tokens therefore needs the `ceil(left / P)` tokens before them plus the `n` themselves.
pub fn window_tokens(cfg: &Config) -> Option<usize> {
    cfg.window.map(|w| w.left.div_ceil(cfg.pseudo.max(1)))
}

/// Whether a ring cache can serve a configuration: a window that never looks right of the query
/// (causal, or right edge 0), so old tokens leaving the window are never needed again.
pub fn ring_fits(cfg: &Config) -> bool {
    cfg.window.is_some_and(|w| cfg.causal || w.right == 0)
}

impl KvCache {
    /// A linear cache of `capacity` tokens per sequence.
    pub fn new(batch: usize, capacity: usize, kv_heads: usize, head_dim: usize, dtype: DType) -> Result<KvCache> {
        KvCache::build(CacheShape { batch, capacity, kv_heads, head_dim, dtype }, CacheLayout::Linear)
    }

    /// A ring cache for a windowed, causal configuration (IHA local): capacity
    /// `ceil(left / P) + max_new` tokens, so a decode may bring up to `max_new` new tokens and
    /// memory stays `O(W)` however long the generation. Errors when `cfg` has no window.
    pub fn ring(cfg: &Config, batch: usize, max_new: usize, dtype: DType) -> Result<KvCache> {
        let w = window_tokens(cfg).filter(|_| ring_fits(cfg)).ok_or_else(|| Error::Cache {
            why: "a ring cache needs a sliding window that is causal or has right edge 0".into(),
        })?;
        if max_new == 0 {
            return Err(Error::Cache { why: "a ring cache needs max_new >= 1".into() });
        }
        let shape = CacheShape {
            batch,
            capacity: w.saturating_add(max_new),
            kv_heads: cfg.kv_heads,
            head_dim: cfg.head_dim,
            dtype,
        };
        KvCache::build(shape, CacheLayout::Ring { window_tokens: w })
    }

    /// A linear cache shaped for a configuration.
    pub fn for_config(cfg: &Config, batch: usize, capacity: usize, dtype: DType) -> Result<KvCache> {
        KvCache::new(batch, capacity, cfg.kv_heads, cfg.head_dim, dtype)
    }

    fn build(shape: CacheShape, layout: CacheLayout) -> Result<KvCache> {
        let s = &shape;
        for (what, v) in
            [("batch", s.batch), ("capacity", s.capacity), ("kv_heads", s.kv_heads), ("head_dim", s.head_dim)]
        {
            if v == 0 {
                return Err(Error::Cache { why: format!("{what} must be at least 1") });
            }
        }
        let elems = (s.batch as u128) * (s.capacity as u128) * (s.kv_heads as u128) * (s.head_dim as u128);
        if elems > crate::validate::MAX_INDEX as u128 {
            return Err(Error::TooLarge {
                what: "KV cache B·capacity·Hk·d",
                elements: elems,
                max: crate::validate::MAX_INDEX as u128,
            });
        }
        let len = elems as usize;
        // Poisoned with NaN: a slot read before it is written shows up in every test.
        let storage =
            KvStorage::Host { k: Owned::filled(s.dtype, len, f32::NAN), v: Owned::filled(s.dtype, len, f32::NAN) };
        Ok(KvCache { shape, layout, storage, lens: vec![0; s.batch] })
    }

    /// The shape every call must match.
    pub fn shape(&self) -> CacheShape {
        self.shape
    }

    /// Linear or ring.
    pub fn layout(&self) -> CacheLayout {
        self.layout
    }

    /// Where the cache's bytes are.
    pub fn storage(&self) -> &KvStorage {
        &self.storage
    }

    /// Element type of the cached keys and values.
    pub fn dtype(&self) -> DType {
        self.shape.dtype
    }

    /// Tokens ever appended to sequence `b` (its absolute length).
    pub fn len(&self, b: usize) -> Result<usize> {
        self.check_batch(b)?;
        Ok(self.lens[b])
    }

    /// Absolute lengths of all sequences.
    pub fn lens(&self) -> &[usize] {
        &self.lens
    }

    /// Tokens of sequence `b` held now: `min(len, capacity)`.
    pub fn stored(&self, b: usize) -> Result<usize> {
        self.check_batch(b)?;
        Ok(self.lens[b].min(self.shape.capacity))
    }

    /// Absolute position (token index) of the first token of sequence `b` held now.
    pub fn first_pos(&self, b: usize) -> Result<usize> {
        Ok(self.len(b)? - self.stored(b)?)
    }

    /// Whether every sequence is empty.
    pub fn is_empty(&self) -> bool {
        self.lens.iter().all(|&l| l == 0)
    }

    /// Bytes held by keys and values together.
    pub fn bytes(&self) -> usize {
        let s = &self.shape;
        2 * s.batch * s.capacity * s.kv_heads * s.head_dim * s.dtype.size()
    }

    /// Forget every sequence (the buffers are kept).
    pub fn clear(&mut self) {
        self.lens.iter_mut().for_each(|l| *l = 0);
    }

    /// Forget sequence `b` only, so its slot can take a new sequence (continuous batching).
    pub fn clear_seq(&mut self, b: usize) -> Result<()> {
        self.check_batch(b)?;
        self.lens[b] = 0;
        Ok(())
    }

    fn check_batch(&self, b: usize) -> Result<()> {
        if b >= self.shape.batch {
            return Err(Error::Cache {
                why: format!("batch index {b} out of range for a cache of batch {}", self.shape.batch),
            });
        }
        Ok(())
    }

    /// Check that a cache has the shape a configuration needs (the right layer's cache).
    pub fn check_config(&self, cfg: &Config) -> Result<()> {
        let s = &self.shape;
        if s.kv_heads != cfg.kv_heads || s.head_dim != cfg.head_dim {
            return Err(Error::Cache {
                why: format!(
                    "cache holds Hk = {}, d = {} but the configuration has Hk = {}, d = {} (wrong layer?)",
                    s.kv_heads, s.head_dim, cfg.kv_heads, cfg.head_dim
                ),
            });
        }
        if let CacheLayout::Ring { window_tokens: w } = self.layout {
            match window_tokens(cfg) {
                Some(need) if need <= w && ring_fits(cfg) => {}
                _ => {
                    return Err(Error::Cache {
                        why: format!(
                            "ring cache keeps {w} past tokens, but the configuration's window {:?} (causal: {}) may see more",
                            cfg.window, cfg.causal
                        ),
                    });
                }
            }
        }
        Ok(())
    }

    /// Check `k`/`v` of `tokens` tokens against the cache (shape `[.., tokens, Hk, d]`, dtype).
    fn check_new(&self, k: &Tensor, v: &Tensor, expected: &[usize]) -> Result<()> {
        for (what, t) in [("appended k", k), ("appended v", v)] {
            if t.shape != expected {
                return Err(Error::Shape { what, expected: expected.to_vec(), got: t.shape.clone() });
            }
            if t.data.len() != expected.iter().product::<usize>() {
                return Err(Error::Length { what, expected: expected.iter().product(), got: t.data.len() });
            }
            if t.dtype() != self.shape.dtype {
                return Err(Error::DType { what, expected: self.shape.dtype, got: t.dtype() });
            }
        }
        Ok(())
    }

    /// Whether `n` more tokens fit sequence `b`: a linear cache must hold all of them, a ring
    /// keeps the last `capacity` (absolute positions must stay addressable by kernels).
    fn check_room(&self, b: usize, n: usize) -> Result<()> {
        let cap = self.shape.capacity;
        let len = self.lens[b];
        match self.layout {
            CacheLayout::Linear if len + n > cap => {
                Err(Error::Cache { why: format!("sequence {b}: {len} + {n} tokens overflow the capacity {cap}") })
            }
            _ if len.saturating_add(n) > crate::validate::MAX_INDEX => Err(Error::Cache {
                why: format!("sequence {b}: {len} + {n} tokens exceed the largest position 2^31 - 1"),
            }),
            _ => Ok(()),
        }
    }

    /// Append `n` tokens to every sequence: `k`, `v` are `[B, n, Hk, d]` stored (unmixed,
    /// un-rotated) heads. All checks run before anything is written.
    pub fn append(&mut self, k: &Tensor, v: &Tensor) -> Result<()> {
        let s = self.shape;
        let n = k.shape.get(1).copied().unwrap_or(0);
        self.check_new(k, v, &[s.batch, n, s.kv_heads, s.head_dim])?;
        if n == 0 {
            return Err(Error::Empty { what: "appended tokens" });
        }
        for b in 0..s.batch {
            self.check_room(b, n)?;
        }
        for b in 0..s.batch {
            self.write(b, k, v, b * n, n);
        }
        Ok(())
    }

    /// Append `n` tokens to sequence `b` only (ragged prefill): `k`, `v` are `[n, Hk, d]`.
    pub fn append_seq(&mut self, b: usize, k: &Tensor, v: &Tensor) -> Result<()> {
        self.check_batch(b)?;
        let s = self.shape;
        let n = k.shape.first().copied().unwrap_or(0);
        self.check_new(k, v, &[n, s.kv_heads, s.head_dim])?;
        if n == 0 {
            return Err(Error::Empty { what: "appended tokens" });
        }
        self.check_room(b, n)?;
        self.write(b, k, v, 0, n);
        Ok(())
    }

    /// Write tokens `from..from+n` of `k`/`v` (token-major rows of `Hk·d`) after sequence `b`'s end.
    /// A ring skips the tokens that the last `capacity` would overwrite anyway.
    fn write(&mut self, b: usize, k: &Tensor, v: &Tensor, from: usize, n: usize) {
        let s = self.shape;
        let row = s.kv_heads * s.head_dim;
        let KvStorage::Host { k: kc, v: vc } = &mut self.storage;
        for t in n.saturating_sub(s.capacity)..n {
            let slot = (self.lens[b] + t) % s.capacity; // linear: never wraps (room checked)
            let dst = (b * s.capacity + slot) * row;
            copy_into(kc, dst, &k.data, (from + t) * row, row);
            copy_into(vc, dst, &v.data, (from + t) * row, row);
        }
        self.lens[b] += n;
    }

    /// The held tokens of sequence `b` in order (the ring unrolled): `(k, v)` of shape
    /// `[stored, Hk, d]` in the cache's dtype, oldest first.
    pub fn sequence(&self, b: usize) -> Result<(Owned, Owned)> {
        let stored = self.stored(b)?;
        let s = self.shape;
        let row = s.kv_heads * s.head_dim;
        let first = self.lens[b] - stored;
        let KvStorage::Host { k: kc, v: vc } = &self.storage;
        let mut k = Owned::filled(s.dtype, stored * row, 0.0);
        let mut v = Owned::filled(s.dtype, stored * row, 0.0);
        for t in 0..stored {
            let src = (b * s.capacity + (first + t) % s.capacity) * row;
            copy_owned(&mut k, t * row, kc, src, row);
            copy_owned(&mut v, t * row, vc, src, row);
        }
        Ok((k, v))
    }
}

/// One cache per layer, each checked against its layer's configuration at every use.
#[derive(Debug, Default)]
pub struct KvCacheStack {
    layers: Vec<KvCache>,
}

impl KvCacheStack {
    /// A cache per layer configuration: ring caches for windowed layers (room for `max_new`
    /// tokens per append), linear caches of `capacity` tokens for the others.
    pub fn new(cfgs: &[Config], batch: usize, capacity: usize, max_new: usize, dtype: DType) -> Result<KvCacheStack> {
        let layers = cfgs
            .iter()
            .map(|c| {
                if ring_fits(c) {
                    KvCache::ring(c, batch, max_new, dtype)
                } else {
                    KvCache::for_config(c, batch, capacity, dtype)
                }
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(KvCacheStack { layers })
    }

    /// A stack of existing layer caches (one batch size for all).
    pub fn from_layers(layers: Vec<KvCache>) -> Result<KvCacheStack> {
        if let Some(first) = layers.first() {
            let (b, dt) = (first.shape.batch, first.shape.dtype);
            for (i, l) in layers.iter().enumerate() {
                if l.shape.batch != b || l.shape.dtype != dt {
                    return Err(Error::Cache {
                        why: format!("layer {i}: batch/dtype {:?} differs from layer 0", l.shape),
                    });
                }
            }
        }
        Ok(KvCacheStack { layers })
    }

    /// Number of layers.
    pub fn len(&self) -> usize {
        self.layers.len()
    }

    /// Whether the stack has no layer.
    pub fn is_empty(&self) -> bool {
        self.layers.is_empty()
    }

    /// Layer `i`'s cache, checked against the configuration the caller is about to use with it.
    pub fn layer(&self, i: usize, cfg: &Config) -> Result<&KvCache> {
        let l =
            self.layers.get(i).ok_or_else(|| Error::Cache { why: format!("layer {i} of {}", self.layers.len()) })?;
        l.check_config(cfg).map_err(|e| Error::Cache { why: format!("layer {i}: {e}") })?;
        Ok(l)
    }

    /// Layer `i`'s cache for appending, checked like [`KvCacheStack::layer`].
    pub fn layer_mut(&mut self, i: usize, cfg: &Config) -> Result<&mut KvCache> {
        self.layer(i, cfg)?;
        Ok(&mut self.layers[i])
    }

    /// Bytes of all layers.
    pub fn bytes(&self) -> usize {
        self.layers.iter().map(KvCache::bytes).sum()
    }
}

/// Cache memory of one layer holding `tokens` tokens per sequence, headmix against the unfused
/// design (which stores what its attention reads: mixed pseudo-heads).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CacheBytes {
    /// headmix: the `Hk` stored source heads, keys and values.
    pub headmix: usize,
    /// Unfused: `H·P` mixed heads for IHA (`P×` larger) and MEA (a full-`H` cache, `H/Hk×`
    /// larger than compressed MEA); `Hk` heads for MHA/GQA, whose mixing is a replication.
    pub unfused: usize,
}

impl CacheBytes {
    /// `unfused / headmix`.
    pub fn ratio(&self) -> f64 {
        self.unfused as f64 / self.headmix as f64
    }
}

/// Bytes of keys plus values for `batch` sequences of `tokens` tokens (see [`CacheBytes`]).
pub fn cache_bytes(cfg: &Config, batch: usize, tokens: usize, dtype: DType) -> CacheBytes {
    use crate::Method;
    let per_head = 2 * batch * tokens * cfg.head_dim * dtype.size();
    let unfused_heads = match cfg.method {
        Method::Mha | Method::Gqa => cfg.kv_heads,
        _ => cfg.heads * cfg.pseudo,
    };
    CacheBytes { headmix: per_head * cfg.kv_heads, unfused: per_head * unfused_heads }
}
