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
//! Storage is behind [`KvStorage`]: host buffers, or a device-resident [`DeviceKv`] that a
//! device backend allocates ([`KvCache::new_on`], [`KvCache::ring_on`]): `[B, capacity, Hk, d]`
//! keys and values in device memory, allocated once, appended on the device (host tokens are
//! uploaded once, device tokens copied device to device), per-sequence lengths on the device as
//! well as the host. A decode on the cache's own device reads it in place; its bytes cross to the
//! host only through [`KvCache::sequence`] / [`KvCache::to_host`], which [`KvCache::host_traffic`]
//! counts.
//!
//! Kernels index within one sequence with 32 bits (`capacity·Hk·d <= 2^31 − 1`) and address the
//! sequence's base with 64 bits, so `B·capacity·Hk·d` may exceed 2^31 (B = 8 at 128k tokens).

use std::any::Any;
#[cfg(any(feature = "cuda", feature = "wgpu"))]
use std::sync::atomic::{AtomicU64, Ordering};

use crate::timing::Owned;
use crate::{Backend, BackendKind, Config, DType, Data, Error, Result, Tensor};

/// Where a cache's bytes live.
#[non_exhaustive]
pub enum KvStorage {
    /// Host buffers `[B, capacity, Hk, d]` for keys and values, in the cache's dtype.
    Host {
        /// Keys.
        k: Owned,
        /// Values.
        v: Owned,
    },
    /// Device buffers of a device backend (see [`DeviceKv`]).
    Device(Box<dyn DeviceKv>),
}

/// Bytes of cache data that crossed between host and device, counted by a device storage.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HostTraffic {
    /// Host to device: the appended tokens' keys and values uploaded from host tensors.
    pub uploaded: u64,
    /// Device to host: cache bytes read back ([`KvCache::sequence`], [`KvCache::to_host`]).
    pub downloaded: u64,
}

/// The byte counters behind [`DeviceKv::traffic`], shared by the device storages: each adds
/// every cache byte it moves between host and device.
#[cfg(any(feature = "cuda", feature = "wgpu"))]
#[derive(Debug, Default)]
pub(crate) struct TrafficCounter {
    uploaded: AtomicU64,
    downloaded: AtomicU64,
}

#[cfg(any(feature = "cuda", feature = "wgpu"))]
impl TrafficCounter {
    /// Count `bytes` moved host to device.
    pub(crate) fn upload(&self, bytes: u64) {
        self.uploaded.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Count `bytes` moved device to host.
    pub(crate) fn download(&self, bytes: u64) {
        self.downloaded.fetch_add(bytes, Ordering::Relaxed);
    }

    /// The counts so far.
    pub(crate) fn get(&self) -> HostTraffic {
        HostTraffic {
            uploaded: self.uploaded.load(Ordering::Relaxed),
            downloaded: self.downloaded.load(Ordering::Relaxed),
        }
    }
}

/// A host buffer of `dtype` from the little-endian bytes of a device buffer (a device storage's
/// read back).
#[cfg(any(feature = "cuda", feature = "wgpu"))]
pub(crate) fn owned_from_le_bytes(dtype: DType, b: &[u8]) -> Owned {
    match dtype {
        DType::F32 => Owned::F32(bytemuck::pod_collect_to_vec(b)),
        DType::F16 => Owned::F16(b.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]])).collect()),
        DType::BF16 => Owned::BF16(b.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]])).collect()),
    }
}

/// A device-resident cache storage: `[B, capacity, Hk, d]` keys and values plus the
/// per-sequence lengths, in one device's memory. Implemented by the device backends; the
/// decode kernels of that backend read it in place.
pub trait DeviceKv: Send + Sync {
    /// The backend kind whose device holds the buffers.
    fn backend(&self) -> BackendKind;
    /// Write `rows` token rows (`Hk·d` elements each) of the host tensors `k`, `v` from element
    /// `src_at` into sequence `b`, slots `slot..slot + rows` (contiguous, no wrap).
    fn write_rows(&mut self, b: usize, slot: usize, k: &Data, v: &Data, src_at: usize, rows: usize) -> Result<()>;
    /// Publish the per-sequence absolute lengths to the device (after the rows are written).
    fn set_lens(&mut self, lens: &[usize]) -> Result<()>;
    /// Read the whole key and value buffers back to the host (counted as traffic).
    fn read_back(&self) -> Result<(Owned, Owned)>;
    /// Cache bytes moved between host and device so far.
    fn traffic(&self) -> HostTraffic;
    /// For the owning backend to downcast to its own storage type.
    fn as_any(&self) -> &dyn Any;
    /// For the owning backend to downcast to its own storage type, mutably.
    fn as_any_mut(&mut self) -> &mut dyn Any;
}

impl std::fmt::Debug for KvStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KvStorage::Host { k, .. } => write!(f, "Host({} elements per tensor)", owned_len(k)),
            KvStorage::Device(d) => write!(f, "Device({})", d.backend()),
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

fn clone_owned(o: &Owned) -> Owned {
    match o {
        Owned::F32(x) => Owned::F32(x.clone()),
        Owned::F16(x) => Owned::F16(x.clone()),
        Owned::BF16(x) => Owned::BF16(x.clone()),
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

impl CacheShape {
    /// Elements of one sequence's keys (`capacity·Hk·d`), what kernels index with 32 bits.
    pub fn seq_elements(&self) -> u128 {
        (self.capacity as u128) * (self.kv_heads as u128) * (self.head_dim as u128)
    }

    /// Elements of the keys of all sequences (`B·capacity·Hk·d`; the values as many).
    pub fn elements(&self) -> u128 {
        self.batch as u128 * self.seq_elements()
    }

    /// Bytes of keys and values together.
    pub fn bytes(&self) -> u128 {
        2 * self.elements() * self.dtype.size() as u128
    }

    /// Bytes of one token's keys (`Hk·d` elements; its values as many).
    #[cfg(any(feature = "cuda", feature = "wgpu"))]
    pub(crate) fn row_bytes(&self) -> usize {
        self.kv_heads * self.head_dim * self.dtype.size()
    }

    /// Byte offset of slot `slot` of sequence `b` in the key (or value) buffer.
    #[cfg(any(feature = "cuda", feature = "wgpu"))]
    pub(crate) fn slot_offset(&self, b: usize, slot: usize) -> usize {
        (b * self.capacity + slot) * self.row_bytes()
    }

    /// The byte range of `rows` token rows from element `src_at` of host keys (or values)
    /// `[.., Hk, d]`: what [`DeviceKv::write_rows`] copies.
    #[cfg(any(feature = "cuda", feature = "wgpu"))]
    pub(crate) fn rows_bytes(&self, src_at: usize, rows: usize) -> std::ops::Range<usize> {
        let es = self.dtype.size();
        src_at * es..(src_at + rows * self.kv_heads * self.head_dim) * es
    }

    /// The checks every cache shape passes before anything is allocated: no zero size, one
    /// sequence within 32-bit kernel indices (`capacity·Hk·d <= 2^31 − 1`), the whole cache
    /// addressable on this host. `B·capacity·Hk·d` itself may exceed 2^31: kernels address a
    /// sequence's base with 64 bits.
    pub fn check(&self) -> Result<()> {
        for (what, v) in [
            ("batch", self.batch),
            ("capacity", self.capacity),
            ("kv_heads", self.kv_heads),
            ("head_dim", self.head_dim),
        ] {
            if v == 0 {
                return Err(Error::Cache { why: format!("{what} must be at least 1") });
            }
        }
        let max = crate::validate::MAX_INDEX as u128;
        if self.seq_elements() > max {
            return Err(Error::TooLarge {
                what: "KV cache capacity·Hk·d of one sequence",
                elements: self.seq_elements(),
                max,
            });
        }
        if self.bytes() > isize::MAX as u128 {
            return Err(Error::TooLarge { what: "KV cache bytes", elements: self.bytes(), max: isize::MAX as u128 });
        }
        Ok(())
    }
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
/// For IHA-local's window `(W·P − 1, 0)` that is `W` past tokens when `P > 1` (the first
/// pseudo-query of a token still sees the last `P − 1` pseudo-keys of token `t − W`) and `W − 1`
/// when `P = 1` (a window of `W` tokens, the query's own included).
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
        let (shape, layout) = KvCache::ring_shape(cfg, batch, max_new, dtype)?;
        KvCache::build(shape, layout)
    }

    /// A linear cache shaped for a configuration.
    pub fn for_config(cfg: &Config, batch: usize, capacity: usize, dtype: DType) -> Result<KvCache> {
        KvCache::new(batch, capacity, cfg.kv_heads, cfg.head_dim, dtype)
    }

    /// A linear cache on `backend`'s device (host memory for the CPU backend): `[B, capacity,
    /// Hk, d]` keys and values allocated once there; decode on that backend reads it in place.
    pub fn new_on(
        backend: &dyn Backend,
        batch: usize,
        capacity: usize,
        kv_heads: usize,
        head_dim: usize,
        dtype: DType,
    ) -> Result<KvCache> {
        KvCache::build_on(Some(backend), CacheShape { batch, capacity, kv_heads, head_dim, dtype }, CacheLayout::Linear)
    }

    /// A linear cache shaped for a configuration, on `backend`'s device.
    pub fn for_config_on(
        backend: &dyn Backend,
        cfg: &Config,
        batch: usize,
        capacity: usize,
        dtype: DType,
    ) -> Result<KvCache> {
        KvCache::new_on(backend, batch, capacity, cfg.kv_heads, cfg.head_dim, dtype)
    }

    /// A ring cache (see [`KvCache::ring`]) on `backend`'s device.
    pub fn ring_on(backend: &dyn Backend, cfg: &Config, batch: usize, max_new: usize, dtype: DType) -> Result<KvCache> {
        let (shape, layout) = KvCache::ring_shape(cfg, batch, max_new, dtype)?;
        KvCache::build_on(Some(backend), shape, layout)
    }

    fn ring_shape(cfg: &Config, batch: usize, max_new: usize, dtype: DType) -> Result<(CacheShape, CacheLayout)> {
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
        Ok((shape, CacheLayout::Ring { window_tokens: w }))
    }

    fn build(shape: CacheShape, layout: CacheLayout) -> Result<KvCache> {
        KvCache::build_on(None, shape, layout)
    }

    /// Check the shape, then allocate on `backend` (host buffers when `None` or when the
    /// backend keeps caches on the host).
    fn build_on(backend: Option<&dyn Backend>, shape: CacheShape, layout: CacheLayout) -> Result<KvCache> {
        // A head dimension no kernel runs is refused now, not at the first decode.
        crate::validate::validate_head_dim(shape.head_dim)?;
        shape.check()?;
        let storage = match backend {
            Some(b) => b.new_cache_storage(&shape)?,
            None => None,
        };
        let storage = match storage {
            Some(d) => KvStorage::Device(d),
            None => {
                let len = usize::try_from(shape.elements()).map_err(|_| Error::TooLarge {
                    what: "KV cache elements on this host",
                    elements: shape.elements(),
                    max: usize::MAX as u128,
                })?;
                // Poisoned with NaN: a slot read before it is written shows up in every test.
                // Allocation failure (more than the host has) is an error, not an abort.
                KvStorage::Host {
                    k: Owned::try_filled("KV cache keys", shape.dtype, len, f32::NAN)?,
                    v: Owned::try_filled("KV cache values", shape.dtype, len, f32::NAN)?,
                }
            }
        };
        Ok(KvCache { shape, layout, storage, lens: vec![0; shape.batch] })
    }

    /// The backend kind whose device holds the cache (`Cpu` for host memory).
    pub fn location(&self) -> BackendKind {
        match &self.storage {
            KvStorage::Host { .. } => BackendKind::Cpu,
            KvStorage::Device(d) => d.backend(),
        }
    }

    /// Whether the cache lives in host memory.
    pub fn is_host(&self) -> bool {
        matches!(self.storage, KvStorage::Host { .. })
    }

    /// The device storage, for the backend that owns it.
    pub fn device_storage(&self) -> Option<&dyn DeviceKv> {
        match &self.storage {
            KvStorage::Device(d) => Some(d.as_ref()),
            KvStorage::Host { .. } => None,
        }
    }

    /// The device storage, mutable (device-to-device appends of the owning backend).
    pub fn device_storage_mut(&mut self) -> Option<&mut dyn DeviceKv> {
        match &mut self.storage {
            KvStorage::Device(d) => Some(d.as_mut()),
            KvStorage::Host { .. } => None,
        }
    }

    /// Cache bytes moved between host and device so far (zero for a host cache).
    pub fn host_traffic(&self) -> HostTraffic {
        match &self.storage {
            KvStorage::Device(d) => d.traffic(),
            KvStorage::Host { .. } => HostTraffic::default(),
        }
    }

    /// A host copy of the cache, same layout and lengths (reads a device cache back, counted).
    pub fn to_host(&self) -> Result<KvCache> {
        let (k, v) = self.storage_on_host()?;
        Ok(KvCache {
            shape: self.shape,
            layout: self.layout,
            storage: KvStorage::Host { k, v },
            lens: self.lens.clone(),
        })
    }

    /// The key and value buffers `[B, capacity, Hk, d]` on the host (a copy).
    fn storage_on_host(&self) -> Result<(Owned, Owned)> {
        match &self.storage {
            KvStorage::Host { k, v } => Ok((clone_owned(k), clone_owned(v))),
            KvStorage::Device(d) => d.read_back(),
        }
    }

    /// Slots `[first, first + n)` of sequence `b` that `n` tokens appended now would fill,
    /// as runs `(token index in the append, slot, rows)` that do not wrap; a ring skips the
    /// tokens the last `capacity` would overwrite anyway.
    fn runs(&self, b: usize, n: usize) -> Vec<(usize, usize, usize)> {
        let cap = self.shape.capacity;
        let mut runs = Vec::new();
        let mut t = n.saturating_sub(cap);
        while t < n {
            let slot = (self.lens[b] + t) % cap; // linear: never wraps (room checked)
            let rows = (n - t).min(cap - slot);
            runs.push((t, slot, rows));
            t += rows;
        }
        runs
    }

    /// Device caches: append sequence `b`'s tokens by device-side copies, `copy(t, slot, rows)`
    /// moving rows `t..t + rows` of the caller's device tensors to slots `slot..`; the caller
    /// (the owning backend) has checked the source. Lengths are updated after the copies.
    pub fn append_with(
        &mut self,
        n: usize,
        seqs: &[usize],
        mut copy: impl FnMut(&mut dyn DeviceKv, usize, usize, usize, usize) -> Result<()>,
    ) -> Result<()> {
        if n == 0 {
            return Err(Error::Empty { what: "appended tokens" });
        }
        for &b in seqs {
            self.check_batch(b)?;
            self.check_room(b, n)?;
        }
        let runs: Vec<_> = seqs.iter().map(|&b| (b, self.runs(b, n))).collect();
        let KvStorage::Device(d) = &mut self.storage else {
            return Err(Error::Cache { why: "device-to-device append on a host cache".into() });
        };
        for (b, rs) in runs {
            for (t, slot, rows) in rs {
                copy(d.as_mut(), b, t, slot, rows)?;
            }
        }
        for &b in seqs {
            self.lens[b] += n;
        }
        d.set_lens(&self.lens)
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

    /// Forget every sequence (the buffers are kept; a device cache's lengths are reset there too).
    pub fn clear(&mut self) -> Result<()> {
        self.lens.iter_mut().for_each(|l| *l = 0);
        self.sync_lens()
    }

    /// Forget sequence `b` only, so its slot can take a new sequence (continuous batching).
    pub fn clear_seq(&mut self, b: usize) -> Result<()> {
        self.check_batch(b)?;
        self.lens[b] = 0;
        self.sync_lens()
    }

    /// Publish the host lengths to a device storage.
    fn sync_lens(&mut self) -> Result<()> {
        match &mut self.storage {
            KvStorage::Device(d) => d.set_lens(&self.lens),
            KvStorage::Host { .. } => Ok(()),
        }
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
            self.write(b, k, v, b * n, n)?;
        }
        self.sync_lens()
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
        self.write(b, k, v, 0, n)?;
        self.sync_lens()
    }

    /// Write tokens `from..from+n` of `k`/`v` (token-major rows of `Hk·d`) after sequence `b`'s end.
    /// A ring skips the tokens that the last `capacity` would overwrite anyway.
    fn write(&mut self, b: usize, k: &Tensor, v: &Tensor, from: usize, n: usize) -> Result<()> {
        let s = self.shape;
        let row = s.kv_heads * s.head_dim;
        let runs = self.runs(b, n);
        match &mut self.storage {
            KvStorage::Host { k: kc, v: vc } => {
                for (t, slot, rows) in runs {
                    let dst = (b * s.capacity + slot) * row;
                    copy_into(kc, dst, &k.data, (from + t) * row, rows * row);
                    copy_into(vc, dst, &v.data, (from + t) * row, rows * row);
                }
            }
            KvStorage::Device(d) => {
                for (t, slot, rows) in runs {
                    d.write_rows(b, slot, &k.data, &v.data, (from + t) * row, rows)?;
                }
            }
        }
        self.lens[b] += n;
        Ok(())
    }

    /// The first NaN or infinity among the held tokens, as [`Error::NonFinite`] naming
    /// `"cache k"` or `"cache v"` and the flat index in the storage `[B, capacity, Hk, d]`
    /// (the opt-in check of [`Config::check_finite`] for decode).
    pub fn check_finite(&self) -> Result<()> {
        let s = self.shape;
        let row = s.kv_heads * s.head_dim;
        let KvStorage::Host { k, v } = &self.storage else {
            return Err(Error::Unsupported {
                backend: self.location().name(),
                why: "check_finite reads host memory; this cache is device-resident (check tokens before append)"
                    .into(),
            });
        };
        for (what, buf) in [("cache k", k), ("cache v", v)] {
            for b in 0..s.batch {
                let held = self.lens[b].min(s.capacity);
                // A ring holds its tokens in some `held` slots; a linear cache in the first ones.
                let slots = (self.lens[b] - held..self.lens[b]).map(|t| t % s.capacity);
                for slot in slots {
                    let at = (b * s.capacity + slot) * row;
                    let bad = match buf {
                        Owned::F32(x) => {
                            x[at..at + row].iter().position(|e| !e.is_finite()).map(|i| (i, x[at + i] as f64))
                        }
                        Owned::F16(x) => {
                            x[at..at + row].iter().position(|e| !e.is_finite()).map(|i| (i, x[at + i].to_f64()))
                        }
                        Owned::BF16(x) => {
                            x[at..at + row].iter().position(|e| !e.is_finite()).map(|i| (i, x[at + i].to_f64()))
                        }
                    };
                    if let Some((i, value)) = bad {
                        return Err(Error::NonFinite { what, index: at + i, value });
                    }
                }
            }
        }
        Ok(())
    }

    /// The held tokens of sequence `b` in order (the ring unrolled): `(k, v)` of shape
    /// `[stored, Hk, d]` in the cache's dtype, oldest first.
    pub fn sequence(&self, b: usize) -> Result<(Owned, Owned)> {
        let stored = self.stored(b)?;
        let s = self.shape;
        let row = s.kv_heads * s.head_dim;
        let first = self.lens[b] - stored;
        let host;
        let (kc, vc) = match &self.storage {
            KvStorage::Host { k, v } => (k, v),
            KvStorage::Device(d) => {
                host = d.read_back()?;
                (&host.0, &host.1)
            }
        };
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

    /// [`KvCacheStack::new`] with every layer on `backend`'s device.
    pub fn new_on(
        backend: &dyn Backend,
        cfgs: &[Config],
        batch: usize,
        capacity: usize,
        max_new: usize,
        dtype: DType,
    ) -> Result<KvCacheStack> {
        let layers = cfgs
            .iter()
            .map(|c| {
                if ring_fits(c) {
                    KvCache::ring_on(backend, c, batch, max_new, dtype)
                } else {
                    KvCache::for_config_on(backend, c, batch, capacity, dtype)
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
