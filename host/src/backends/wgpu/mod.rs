//! The wgpu backend: WGSL kernels (`kernels-wgsl/`) on any Vulkan, Metal, DX12 or WebGPU adapter.
//!
//! * [`open`] / [`WgpuBackend::new`] pick an adapter (discrete GPU first; override with
//!   `HEADMIX_WGPU_ADAPTER=<name substring>` and `HEADMIX_WGPU_BACKEND=vulkan|metal|dx12|gl`) and
//!   request a device with the adapter's own limits and its `SHADER_F16` / `TIMESTAMP_QUERY`.
//! * Kernels ([`Variant`]): `Flash` (default) is the tiled flash forward that mixes the stored
//!   heads in workgroup memory inside the online-softmax loop; `Naive` is one thread per virtual
//!   query, the benchmark baseline (`WgpuBackend::new()?.with_variant(Variant::Naive)`).
//! * Collapse (`r`) and head norm (`gamma`, `beta`) run in a second small pass over the f32 pseudo
//!   outputs; without either, the attention kernel writes the output itself.
//! * f16 and bf16 tensors are stored packed two per `u32` and widened in the shader, so they run
//!   on every adapter (`SHADER_F16` is not needed); arithmetic is f32 throughout.
//! * Split-KV: when the query tiles alone give too few workgroups (decode), each query tile's keys
//!   are cut into ranges run by separate workgroups and merged by a combine pass
//!   ([`WgpuBackend::with_kv_splits`] forces a count; `Some(1)` turns it off).
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
mod decode;
#[cfg(feature = "wgpu")]
mod device;
#[cfg(feature = "wgpu")]
mod kernels;
#[cfg(feature = "wgpu")]
mod launch;
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
