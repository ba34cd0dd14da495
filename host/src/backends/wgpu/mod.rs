//! The wgpu backend: WGSL kernels (`kernels-wgsl/`) on any Vulkan, Metal, DX12 or WebGPU adapter.
//!
//! * [`open`] / [`WgpuBackend::new`] pick an adapter (discrete GPU first; override with
//!   `HEADMIX_WGPU_ADAPTER=<name substring>` and `HEADMIX_WGPU_BACKEND=vulkan|metal|dx12|gl`) and
//!   request a device with the adapter's own limits and its `SHADER_F16` / `TIMESTAMP_QUERY`.
//! * Kernels ([`Variant`]): `Flash` (default) or `Naive`, the benchmark baseline
//!   (`WgpuBackend::new()?.with_variant(Variant::Naive)`); [`WgpuBackend::with_kv_splits`] forces
//!   the split-KV count (`Some(1)` turns it off). The WGSL passes (flash, naive, combine,
//!   epilogue, decode), their bindings and the f16/bf16 packing: `kernels-wgsl/README.md`.
//! * Mesa's llvmpipe (lavapipe) silently ends an invocation's loops after 65535 iterations; on it
//!   the flash kernel splits the keys to stay under a budget and calls that cannot are refused
//!   with `Error::Unsupported` ([`WgpuBackend::loop_budget`], `HEADMIX_WGPU_LOOP_BUDGET`).
//! * Buffers above the adapter's storage-binding limit are refused (`Error::Unsupported`), never
//!   truncated; wgpu validation, out-of-memory and device-loss errors become `Error::Device`.
//! * Device tensors: [`WgpuTensor`] is a typed handle (buffer, owning backend, dtype, length)
//!   made by [`WgpuBackend::alloc_tensor`] / [`WgpuBackend::upload_tensor`] and read by
//!   [`WgpuBackend::download_tensor`]; [`WgpuBackend::forward_buffers`] (zero copy) and
//!   [`WgpuBackend::append_buffers`] take them and refuse another backend's handle with
//!   `Error::ForeignBuffer` (by identity: this works across devices and wgpu instances, which
//!   wgpu itself cannot tell apart). A buffer of another wgpu library on the same device
//!   ([`WgpuBackend::from_device`]) enters through the `unsafe` [`WgpuBackend::adopt_buffer`].
//! * [`crate::Backend::time`] uses GPU timestamps where the adapter has `TIMESTAMP_QUERY`
//!   (`Timing::clock` = "wgpu timestamps"), else the host clock around submit + wait.

#[cfg(feature = "wgpu")]
mod backend;
#[cfg(feature = "wgpu")]
mod backward;
#[cfg(feature = "wgpu")]
mod decode;
#[cfg(feature = "wgpu")]
mod device;
#[cfg(feature = "wgpu")]
mod kernels;
#[cfg(feature = "wgpu")]
mod launch;
#[cfg(feature = "wgpu")]
mod pack;
#[cfg(feature = "wgpu")]
mod tensor;

/// The wgpu crate headmix is built against, for [`WgpuBackend::forward_buffers`] callers.
#[cfg(feature = "wgpu")]
pub use ::wgpu;
#[cfg(feature = "wgpu")]
pub use backend::{DeviceIo, WgpuBackend};
#[cfg(feature = "wgpu")]
pub use decode::WgpuKv;
#[cfg(feature = "wgpu")]
pub use device::{ADAPTER_VAR, BACKEND_VAR};
#[cfg(feature = "wgpu")]
pub use tensor::WgpuTensor;

use crate::{Backend, Result};

/// Which attention kernel a [`WgpuBackend`] launches.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Variant {
    /// Tiled flash forward with on-chip mixing (the production kernel).
    #[default]
    Flash,
    /// One thread per virtual query, no tiling, no workgroup memory: the benchmark baseline.
    Naive,
}

impl Variant {
    /// Short name of the variant.
    pub fn name(self) -> &'static str {
        match self {
            Variant::Flash => "flash",
            Variant::Naive => "naive",
        }
    }
}

/// Open the wgpu backend on the best adapter.
pub fn open() -> Result<Box<dyn Backend>> {
    #[cfg(feature = "wgpu")]
    {
        Ok(Box::new(WgpuBackend::new()?))
    }
    #[cfg(not(feature = "wgpu"))]
    {
        Err(crate::Error::device("wgpu", "headmix was built without the `wgpu` feature"))
    }
}
