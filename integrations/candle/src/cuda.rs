//! CUDA tensors without copies: the device pointers of candle's `CudaStorage` go to headmix's
//! zero-copy entry ([`CudaBackend::forward_device`]) on candle's own stream, and the output is a
//! fresh `CudaSlice` allocated on that stream and wrapped as a candle `CudaStorage`.
//!
//! Both libraries use cudarc 0.19 and the device's primary context, so candle's stream is a
//! stream of headmix's context. One headmix backend is opened per device ordinal and kept for
//! the process (NVRTC modules are cached by headmix); a [`HeadMix`]'s weights are uploaded once
//! per device and reused.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use candle_core::cuda::{CudaDType, CudaStorage};
use candle_core::{DType, Layout, Result, Shape};
use headmix::backends::cuda::cudarc::driver::{CudaSlice, CudaStream};
use headmix::backends::cuda::{CudaBackend, DeviceElem, DeviceWeights};

use super::{HeadMix, OP, check_dtypes, wrap};

/// The headmix CUDA backend of a device ordinal, opened on first use.
fn backend(ordinal: usize) -> Result<Arc<CudaBackend>> {
    static BACKENDS: OnceLock<Mutex<HashMap<usize, Arc<CudaBackend>>>> = OnceLock::new();
    let mut map = BACKENDS.get_or_init(Default::default).lock().unwrap_or_else(|e| e.into_inner());
    if let Some(b) = map.get(&ordinal) {
        return Ok(b.clone());
    }
    let b = Arc::new(CudaBackend::new(ordinal).map_err(wrap)?);
    map.insert(ordinal, b.clone());
    Ok(b)
}

/// A [`HeadMix`]'s weights on each device they were used on.
#[derive(Default)]
pub(crate) struct WeightCache(Mutex<HashMap<usize, Arc<DeviceWeights>>>);

impl std::fmt::Debug for WeightCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WeightCache")
    }
}

/// The slice of a contiguous layout, or candle's `RequiresContiguous`.
fn view<'a, T>(s: &'a CudaSlice<T>, l: &Layout) -> Result<headmix::backends::cuda::cudarc::driver::CudaView<'a, T>> {
    match l.contiguous_offsets() {
        Some((start, end)) => Ok(s.slice(start..end)),
        None => Err(candle_core::Error::RequiresContiguous { op: OP }),
    }
}

impl HeadMix {
    fn device_weights(
        &self,
        backend: &CudaBackend,
        ordinal: usize,
        stream: &Arc<CudaStream>,
    ) -> Result<Arc<DeviceWeights>> {
        let mut map = self.device_weights.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(w) = map.get(&ordinal) {
            return Ok(w.clone());
        }
        let w = Arc::new(backend.upload_weights(&self.cfg, &self.weights, stream).map_err(wrap)?);
        map.insert(ordinal, w.clone());
        Ok(w)
    }

    /// The CUDA forward on contiguous storages, enqueued on candle's stream.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn cuda_run(
        &self,
        q: &CudaStorage,
        lq: &Layout,
        k: &CudaStorage,
        lk: &Layout,
        v: &CudaStorage,
        lv: &Layout,
        want_lse: bool,
    ) -> Result<(CudaStorage, Shape, Option<CudaStorage>)> {
        use candle_core::backend::BackendStorage;
        check_dtypes(q.dtype(), k.dtype(), v.dtype())?;
        if lv.dims() != lk.dims() {
            return Err(candle_core::Error::ShapeMismatchBinaryOp {
                lhs: lk.shape().clone(),
                rhs: lv.shape().clone(),
                op: OP,
            });
        }
        let shape = self.out_shape(lq.dims());
        match q.dtype() {
            DType::F32 => self.cuda_typed::<f32>((q, lq), (k, lk), (v, lv), shape, want_lse),
            DType::F16 => self.cuda_typed::<half::f16>((q, lq), (k, lk), (v, lv), shape, want_lse),
            DType::BF16 => self.cuda_typed::<half::bf16>((q, lq), (k, lk), (v, lv), shape, want_lse),
            other => Err(candle_core::Error::UnsupportedDTypeForOp(other, OP)),
        }
    }

    fn cuda_typed<T: DeviceElem + CudaDType>(
        &self,
        q: (&CudaStorage, &Layout),
        k: (&CudaStorage, &Layout),
        v: (&CudaStorage, &Layout),
        shape: Shape,
        want_lse: bool,
    ) -> Result<(CudaStorage, Shape, Option<CudaStorage>)> {
        let dev = q.0.device.clone();
        let stream = dev.cuda_stream();
        let ordinal = stream.context().ordinal();
        let backend = backend(ordinal)?;
        let weights = self.device_weights(&backend, ordinal, &stream)?;
        let (qv, kv, vv) = (
            view(q.0.as_cuda_slice::<T>()?, q.1)?,
            view(k.0.as_cuda_slice::<T>()?, k.1)?,
            view(v.0.as_cuda_slice::<T>()?, v.1)?,
        );
        // SAFETY: headmix writes every element of `out` (rows that see no key are zeros) and of
        // `lse`, and validates every size before enqueuing anything.
        let mut out = unsafe { dev.alloc::<T>(shape.elem_count())? };
        let mut lse = match want_lse {
            true => Some(unsafe { dev.alloc::<f32>(self.lse_shape(q.1.dims()).elem_count())? }),
            false => None,
        };
        backend
            .forward_device(&self.cfg, &weights, q.1.dims()[0], &qv, &kv, &vv, &mut out, lse.as_mut(), &stream)
            .map_err(wrap)?;
        let lse = lse.map(|l| CudaStorage::wrap_cuda_slice(l, dev.clone()));
        Ok((CudaStorage::wrap_cuda_slice(out, dev), shape, lse))
    }
}
