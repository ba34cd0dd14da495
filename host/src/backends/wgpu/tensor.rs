//! Device tensors of the wgpu backend: [`WgpuTensor`], a typed handle on a wgpu buffer that
//! remembers which backend made it, and the backend's methods that make, fill and read them.
//!
//! Why handles: wgpu 30 cannot tell a buffer of another wgpu *instance* from one of its own
//! (wgpu-core resolves the buffer's id in the calling device's instance, so a foreign buffer
//! reaches an unrelated buffer or panics). A raw `&wgpu::Buffer` entry would make that reachable
//! from safe code. Every safe device entry ([`WgpuBackend::forward_buffers`],
//! [`WgpuBackend::append_buffers`], ...) therefore takes `WgpuTensor`s and compares their owner
//! with its own: a handle of another backend is [`Error::ForeignBuffer`], whatever its device or
//! instance. A raw buffer becomes a handle only through [`WgpuBackend::adopt_buffer`], an
//! `unsafe fn` whose precondition is that the buffer comes from the same wgpu instance.

use std::sync::Arc;

use wgpu::util::DeviceExt;

use super::WgpuBackend;
use super::device::device_err;
use crate::{DType, Data, DataMut, Error, Result};

/// The identity of a [`WgpuBackend`] (and of the backends [`WgpuBackend::fork`],
/// [`WgpuBackend::with_variant`] and [`WgpuBackend::with_kv_splits`] derive from it): compared
/// by address, kept alive by every handle, so two live identities never compare equal.
#[derive(Clone, Debug)]
pub(crate) struct Owner(Arc<()>);

impl Owner {
    pub(crate) fn new() -> Owner {
        Owner(Arc::new(()))
    }

    /// Whether both are the identity of one backend (address identity: never across backends,
    /// devices or wgpu instances).
    pub(crate) fn is(&self, other: &Owner) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

/// A tensor in a [`WgpuBackend`]'s device memory: the wgpu buffer, the backend that owns it, its
/// dtype and element count. Elements are little-endian and densely packed from offset 0 (f16
/// and bf16 two per 32-bit word, element `2w` in the low half), the layout the kernels read.
///
/// Made by [`WgpuBackend::alloc_tensor`] (zeroed), [`WgpuBackend::upload_tensor`] (host data) or
/// [`WgpuBackend::adopt_buffer`] (a buffer the caller made on the backend's device, `unsafe`);
/// read back with [`WgpuBackend::download_tensor`]. A handle works only on the backend that made
/// it (or its [`WgpuBackend::fork`]s): any other backend answers [`Error::ForeignBuffer`].
/// Cloning is cheap and shares the buffer (a clone aliases the original).
///
/// ```
/// use headmix::backends::wgpu::{DeviceIo, WgpuBackend};
/// use headmix::{Config, DType, Error, Weights};
/// let Ok(gpu) = WgpuBackend::new() else { return Ok(()) }; // no adapter here
/// let cfg = Config::mha(2, 32);
/// let w = Weights::random(&cfg, 1);
/// let x: Vec<f32> = (0..4 * 2 * 32).map(|i| (i as f32 * 0.37).sin()).collect(); // [1, 4, 2, 32]
/// let (q, k, v) = (gpu.upload_tensor(&x)?, gpu.upload_tensor(&x)?, gpu.upload_tensor(&x)?);
/// let out = gpu.alloc_tensor(DType::F32, x.len())?;
/// let io = DeviceIo { q: &q, k: &k, v: &v, out: &out, lse: None };
/// gpu.forward_buffers(&cfg, &w, 1, 4, 4, DType::F32, io)?;
/// assert_eq!(gpu.download_f32(&out)?.len(), x.len()); // waits for the queue
/// // Another backend (here another wgpu instance) refuses the handle.
/// let other = WgpuBackend::new()?;
/// assert_eq!(other.download_f32(&out), Err(Error::ForeignBuffer { what: "downloaded tensor" }));
/// # Ok::<(), Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct WgpuTensor {
    buffer: wgpu::Buffer,
    owner: Owner,
    dtype: DType,
    len: usize,
}

impl WgpuTensor {
    /// The wgpu buffer (to record the caller's own passes on it, e.g. with
    /// [`WgpuBackend::device`] and [`WgpuBackend::queue`]).
    pub fn buffer(&self) -> &wgpu::Buffer {
        &self.buffer
    }

    /// Element type.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the tensor has no element.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes the elements take (`len · dtype size`; the buffer may be up to 3 bytes longer).
    pub fn bytes(&self) -> u64 {
        self.len as u64 * self.dtype.size() as u64
    }

    /// Whether `backend` owns this handle (it made it, or is a fork of the backend that did).
    pub fn belongs_to(&self, backend: &WgpuBackend) -> bool {
        self.owner.is(&backend.owner)
    }
}

/// Bytes of `len` elements of `dtype`, refused above the device's largest buffer.
fn tensor_bytes(backend: &WgpuBackend, what: &'static str, dtype: DType, len: usize) -> Result<u64> {
    let bytes = len as u128 * dtype.size() as u128;
    let max = backend.device().limits().max_buffer_size as u128;
    if bytes > max {
        return Err(Error::TooLarge { what, elements: len as u128, max: max / dtype.size() as u128 });
    }
    Ok(bytes as u64)
}

/// wgpu copies and mappings move whole 4-byte words.
fn padded(bytes: u64) -> u64 {
    bytes.div_ceil(wgpu::COPY_BUFFER_ALIGNMENT).max(1) * wgpu::COPY_BUFFER_ALIGNMENT
}

impl WgpuBackend {
    /// Usage of the buffers [`WgpuBackend::alloc_tensor`] and [`WgpuBackend::upload_tensor`]
    /// make: bindable, and copyable both ways (append to a cache, read back, the caller's copies).
    pub const TENSOR_USAGE: wgpu::BufferUsages =
        wgpu::BufferUsages::STORAGE.union(wgpu::BufferUsages::COPY_SRC).union(wgpu::BufferUsages::COPY_DST);

    /// A zeroed tensor of `len` elements of `dtype` on this device ([`WgpuBackend::TENSOR_USAGE`]).
    /// Above the device's largest buffer: [`Error::TooLarge`]; out of memory: [`Error::Device`].
    pub fn alloc_tensor(&self, dtype: DType, len: usize) -> Result<WgpuTensor> {
        let bytes = tensor_bytes(self, "device tensor", dtype, len)?;
        let buffer = self.scoped(|| Ok(self.buffer("headmix tensor", padded(bytes), Self::TENSOR_USAGE)))?;
        Ok(WgpuTensor { buffer, owner: self.owner.clone(), dtype, len })
    }

    /// A tensor on this device holding `data` (its dtype and length), uploaded once
    /// ([`WgpuBackend::TENSOR_USAGE`]; counted in [`WgpuBackend::host_traffic`]).
    pub fn upload_tensor<'a>(&self, data: impl Into<Data<'a>>) -> Result<WgpuTensor> {
        let data = data.into();
        let (dtype, len) = (data.dtype(), data.len());
        tensor_bytes(self, "uploaded tensor", dtype, len)?;
        let bytes = data.bytes();
        self.uploaded.fetch_add(bytes.len() as u64, std::sync::atomic::Ordering::Relaxed);
        let buffer = self.scoped(|| {
            // `create_buffer_init` pads to 4 bytes with zeros; an empty tensor gets one word.
            let contents = if bytes.is_empty() { &[0u8; 4][..] } else { bytes };
            Ok(self.device().create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some("headmix tensor"),
                contents,
                usage: Self::TENSOR_USAGE,
            }))
        })?;
        Ok(WgpuTensor { buffer, owner: self.owner.clone(), dtype, len })
    }

    /// Wait for the queue, then copy `t` into `out` (same dtype and length). Needs
    /// `BufferUsages::COPY_SRC` (every tensor this backend allocates has it). A handle of another
    /// backend is [`Error::ForeignBuffer`]; nothing is written to `out` on an error.
    pub fn download_tensor(&self, t: &WgpuTensor, mut out: DataMut<'_>) -> Result<()> {
        self.check_tensor("downloaded tensor", t, out.dtype(), out.len())?;
        if t.len != out.len() {
            return Err(Error::Length { what: "download destination", expected: t.len, got: out.len() });
        }
        let bytes = self.read_tensor(t)?;
        out.bytes_mut().copy_from_slice(&bytes[..t.bytes() as usize]);
        Ok(())
    }

    /// [`WgpuBackend::download_tensor`] into a new `Vec<f32>` (f16 and bf16 widened).
    pub fn download_f32(&self, t: &WgpuTensor) -> Result<Vec<f32>> {
        self.check_tensor("downloaded tensor", t, t.dtype, t.len)?;
        let bytes = self.read_tensor(t)?;
        let bytes = &bytes[..t.bytes() as usize];
        Ok(match t.dtype {
            DType::F32 => bytes.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes"))).collect(),
            DType::F16 => bytes.chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
            DType::BF16 => bytes.chunks_exact(2).map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
        })
    }

    /// The padded bytes of a checked tensor, after the queue's work.
    fn read_tensor(&self, t: &WgpuTensor) -> Result<Vec<u8>> {
        if !t.buffer.usage().contains(wgpu::BufferUsages::COPY_SRC) {
            return Err(device_err("downloaded tensor lacks BufferUsages::COPY_SRC"));
        }
        self.check_faults()?;
        let size = padded(t.bytes()).min(t.buffer.size());
        self.scoped(|| {
            use wgpu::BufferUsages as U;
            let staging = self.buffer("headmix tensor read back", size, U::MAP_READ | U::COPY_DST);
            let mut enc = self.device().create_command_encoder(&Default::default());
            enc.copy_buffer_to_buffer(&t.buffer, 0, &staging, 0, size);
            self.queue.submit([enc.finish()]);
            self.read_back(&staging)
        })
    }

    /// Adopt a buffer the caller created (e.g. another wgpu library sharing this backend's device
    /// through [`WgpuBackend::from_device`]) as a tensor of `len` elements of `dtype`. Refused:
    /// a buffer shorter than `len · dtype size` ([`Error::Length`], in bytes), without
    /// `BufferUsages::STORAGE` ([`Error::Device`]), or of another device of the same wgpu
    /// instance ([`Error::ForeignBuffer`] named `what`, found by a validated bind group).
    ///
    /// # Safety
    /// `buffer` must come from a device of the same `wgpu::Instance` as this backend's device
    /// (best: from [`WgpuBackend::device`] itself). wgpu 30 cannot check this: a buffer of another
    /// instance is resolved by its id in this instance, which reaches an unrelated buffer or
    /// panics inside wgpu. Handles made by the backend ([`WgpuBackend::alloc_tensor`],
    /// [`WgpuBackend::upload_tensor`]) need no `unsafe`.
    pub unsafe fn adopt_buffer(
        &self,
        what: &'static str,
        buffer: wgpu::Buffer,
        dtype: DType,
        len: usize,
    ) -> Result<WgpuTensor> {
        let bytes = len as u128 * dtype.size() as u128;
        if (buffer.size() as u128) < bytes {
            return Err(Error::Length {
                what,
                expected: usize::try_from(bytes).unwrap_or(usize::MAX),
                got: buffer.size() as usize,
            });
        }
        if !buffer.usage().contains(wgpu::BufferUsages::STORAGE) {
            return Err(device_err(format!("{what} lacks BufferUsages::STORAGE")));
        }
        self.check_own_device(what, &buffer)?;
        Ok(WgpuTensor { buffer, owner: self.owner.clone(), dtype, len })
    }

    /// [`Error::ForeignBuffer`] unless this backend owns `t`; then [`Error::DType`] unless it
    /// holds `dtype`, [`Error::Length`] unless it holds at least `len` elements.
    pub(super) fn check_tensor(&self, what: &'static str, t: &WgpuTensor, dtype: DType, len: usize) -> Result<()> {
        if !t.owner.is(&self.owner) {
            return Err(Error::ForeignBuffer { what });
        }
        if t.dtype != dtype {
            return Err(Error::DType { what, expected: dtype, got: t.dtype });
        }
        if t.len < len {
            return Err(Error::Length { what, expected: len, got: t.len });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::Owner;

    /// Identities compare by address: a clone is the same owner, a new one never is.
    #[test]
    fn owners_compare_by_identity() {
        let a = Owner::new();
        let b = Owner::new();
        assert!(a.is(&a.clone()));
        assert!(!a.is(&b));
        assert!(!b.is(&a));
    }
}
