//! Device-side entry points: weights uploaded once, tensors already on the device, launches
//! enqueued asynchronously on the caller's stream.

use std::ffi::c_void;
use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut, DeviceRepr};

use super::args::HmArgs;
use super::variants::Kernel;
use super::{CudaBackend, dev_err, drv};
use crate::validate::{Binding, Problem, validate_config, validate_weights};
use crate::{Config, DType, Error, NormKind, Result, Weights};

/// Element types of device tensors.
pub trait DeviceElem: DeviceRepr {
    /// The headmix dtype of this element type.
    const DTYPE: DType;
    /// Round an f32 to this type.
    fn from_f32(x: f32) -> Self;
}
impl DeviceElem for f32 {
    const DTYPE: DType = DType::F32;
    fn from_f32(x: f32) -> Self {
        x
    }
}
impl DeviceElem for half::f16 {
    const DTYPE: DType = DType::F16;
    fn from_f32(x: f32) -> Self {
        half::f16::from_f32(x)
    }
}
impl DeviceElem for half::bf16 {
    const DTYPE: DType = DType::BF16;
    fn from_f32(x: f32) -> Self {
        half::bf16::from_f32(x)
    }
}

/// Raw device pointers of one call (`lse = 0`: not asked for).
#[derive(Clone, Copy, Debug)]
pub struct RawIo {
    /// Device pointer of `q`.
    pub q: u64,
    /// Device pointer of `k`.
    pub k: u64,
    /// Device pointer of `v`.
    pub v: u64,
    /// Device pointer of the output.
    pub out: u64,
    /// Device pointer of the lse (0: none).
    pub lse: u64,
}

/// Outputs (`out`, `lse`) may not overlap any other tensor of the call: [`Error::Alias`].
fn check_bindings(pb: &Problem, io: &RawIo) -> Result<()> {
    let c = &pb.cfg;
    let es = pb.dtype.size() as u64;
    let out_len: usize = pb.out_shape().iter().product();
    let binding = |what, addr, elements: usize, size: u64, written| Binding {
        what,
        addr,
        bytes: if addr == 0 { 0 } else { elements as u64 * size },
        written,
    };
    crate::validate::check_no_alias(&[
        binding("q", io.q, pb.batch * pb.n * c.q_heads * c.head_dim, es, false),
        binding("k", io.k, pb.batch * pb.m * c.kv_heads * c.head_dim, es, false),
        binding("v", io.v, pb.batch * pb.m * c.kv_heads * c.head_dim, es, false),
        binding("out", io.out, out_len, es, true),
        binding("lse", io.lse, pb.lse_len(), 4, true),
    ])
}

/// A layer's mixing weights on the device: f32, packed `aq | ak | av | r | gamma | beta`,
/// validated against the configuration they were uploaded for. Upload once, reuse for every call.
pub struct DeviceWeights {
    pub(super) buf: CudaSlice<f32>,
    /// Element offsets of aq, ak, av, r, gamma, beta in `buf`.
    pub(super) offsets: [usize; 6],
    collapse: bool,
    norm: Option<NormKind>,
    /// (Hq, Hk, H, P, d) the weights were validated for.
    dims: [usize; 5],
}

impl DeviceWeights {
    /// Whether the weights carry a collapse `r` (output `[B,N,H,d]`, else `[B,N,H,P,d]`).
    pub fn collapse(&self) -> bool {
        self.collapse
    }

    /// Whether the weights carry a head norm.
    pub fn norm(&self) -> bool {
        self.norm.is_some()
    }

    /// The kind of head norm the weights carry.
    pub fn norm_kind(&self) -> Option<NormKind> {
        self.norm
    }

    fn check(&self, cfg: &Config) -> Result<()> {
        let dims = [cfg.q_heads, cfg.kv_heads, cfg.heads, cfg.pseudo, cfg.head_dim];
        if dims != self.dims {
            return Err(Error::Shape {
                what: "device weights (uploaded for another (Hq, Hk, H, P, d))",
                expected: dims.to_vec(),
                got: self.dims.to_vec(),
            });
        }
        Ok(())
    }
}

fn dims_of(cfg: &Config) -> [usize; 5] {
    [cfg.q_heads, cfg.kv_heads, cfg.heads, cfg.pseudo, cfg.head_dim]
}

impl CudaBackend {
    /// Validate `w` against `cfg` and upload it on `stream` (asynchronously).
    pub fn upload_weights(&self, cfg: &Config, w: &Weights, stream: &Arc<CudaStream>) -> Result<DeviceWeights> {
        validate_config(cfg)?;
        validate_weights(cfg, w)?;
        self.check_stream(stream)?;
        let mut packed = Vec::with_capacity(w.aq.len() + w.ak.len() + w.av.len() + 1);
        let mut offsets = [0usize; 6];
        let (gamma, beta) = (w.norm.as_ref().map(|n| n.gamma()), w.norm.as_ref().and_then(|n| n.beta()));
        for (slot, part) in [Some(&w.aq), Some(&w.ak), Some(&w.av), w.r.as_ref(), gamma, beta].into_iter().enumerate() {
            offsets[slot] = packed.len();
            if let Some(part) = part {
                packed.extend_from_slice(part);
            }
        }
        packed.push(0.0); // never empty
        let buf = stream.clone_htod(&packed).map_err(drv("uploading the weights"))?;
        let norm = w.norm.as_ref().map(|n| n.kind());
        Ok(DeviceWeights { buf, offsets, collapse: w.r.is_some(), norm, dims: dims_of(cfg) })
    }

    fn check_stream(&self, stream: &Arc<CudaStream>) -> Result<()> {
        if !Arc::ptr_eq(stream.context(), &self.ctx) && stream.context().cu_ctx() != self.ctx.cu_ctx() {
            return Err(dev_err("the stream belongs to another CUDA context than this backend's"));
        }
        Ok(())
    }

    /// The problem of a device call, validated as the host API validates (the weights were
    /// validated at upload).
    pub fn problem(
        &self,
        cfg: &Config,
        w: &DeviceWeights,
        batch: usize,
        n: usize,
        m: usize,
        dtype: DType,
    ) -> Result<Problem> {
        validate_config(cfg)?;
        w.check(cfg)?;
        if cfg.check_finite {
            return Err(Error::Unsupported {
                backend: "cuda",
                why: "check_finite validates host tensors; the device entries take device memory (check it before upload)"
                    .into(),
            });
        }
        let pb = Problem::new(cfg, batch, n, m, dtype, w.collapse, w.norm.is_some())?;
        crate::Backend::supports(self, &pb)?;
        Ok(pb)
    }

    /// Zero-copy entry: tensors already on the device (`CudaSlice`s or views), launched
    /// asynchronously on `stream` (of this backend's context). `q: [B,N,Hq,d]`, `k, v: [B,M,Hk,d]`,
    /// `out` as [`Problem::out_shape`], `lse: [B,H,N·P]`; N and M are read off the lengths. Every
    /// size is checked before anything is enqueued.
    pub fn forward_device<T, Q, K, V, O>(
        &self,
        cfg: &Config,
        w: &DeviceWeights,
        batch: usize,
        q: &Q,
        k: &K,
        v: &V,
        out: &mut O,
        lse: Option<&mut CudaSlice<f32>>,
        stream: &Arc<CudaStream>,
    ) -> Result<()>
    where
        T: DeviceElem,
        Q: DevicePtr<T>,
        K: DevicePtr<T>,
        V: DevicePtr<T>,
        O: DevicePtrMut<T>,
    {
        self.check_stream(stream)?;
        let per_q = batch.max(1) * cfg.q_heads.max(1) * cfg.head_dim.max(1);
        let per_k = batch.max(1) * cfg.kv_heads.max(1) * cfg.head_dim.max(1);
        let (n, m) = (q.len() / per_q, k.len() / per_k);
        if q.len() != n * per_q {
            return Err(Error::Length { what: "q (device)", expected: n * per_q, got: q.len() });
        }
        for (what, len) in [("k (device)", k.len()), ("v (device)", v.len())] {
            if len != m * per_k {
                return Err(Error::Length { what, expected: m * per_k, got: len });
            }
        }
        let pb = self.problem(cfg, w, batch, n, m, T::DTYPE)?;
        let out_len: usize = pb.out_shape().iter().product();
        if out.len() != out_len {
            return Err(Error::Length { what: "out (device)", expected: out_len, got: out.len() });
        }
        if let Some(l) = &lse
            && l.len() != pb.lse_len()
        {
            return Err(Error::Length { what: "lse (device)", expected: pb.lse_len(), got: l.len() });
        }
        let (qp, _gq) = q.device_ptr(stream);
        let (kp, _gk) = k.device_ptr(stream);
        let (vp, _gv) = v.device_ptr(stream);
        let (op, _go) = out.device_ptr_mut(stream);
        let mut lse = lse;
        let (lp, _gl) = match lse.as_mut() {
            Some(l) => {
                let (p, g) = l.device_ptr_mut(stream);
                (p, Some(g))
            }
            None => (0, None),
        };
        check_bindings(&pb, &RawIo { q: qp, k: kp, v: vp, out: op, lse: lp })?;
        // SAFETY: the pointers come from live device buffers of the checked lengths, guarded
        // until the launches are enqueued on `stream`.
        unsafe { self.launch(&pb, w, RawIo { q: qp, k: kp, v: vp, out: op, lse: lp }, stream) }
    }

    /// Raw entry: device pointers (`lse = 0` for none) and a `CUstream` of this backend's context
    /// (null = the legacy default stream). Asynchronous; sizes are validated, pointers cannot be.
    ///
    /// # Safety
    /// Every pointer must address device memory of this context holding the tensor implied by
    /// the configuration and sizes (`dtype` elements; lse f32), valid until the stream's work
    /// completes; `stream` must be a live stream of this context.
    pub unsafe fn forward_raw(
        &self,
        cfg: &Config,
        w: &DeviceWeights,
        batch: usize,
        n: usize,
        m: usize,
        dtype: DType,
        io: RawIo,
        stream: cudarc::driver::sys::CUstream,
    ) -> Result<()> {
        let pb = self.problem(cfg, w, batch, n, m, dtype)?;
        check_bindings(&pb, &io)?;
        // SAFETY: the caller guarantees the stream belongs to this context and outlives the work.
        let s = unsafe { self.ctx.wrap_borrowed_stream(stream) };
        unsafe { self.launch(&pb, w, io, &s) }
    }

    /// Enqueue the kernels of a validated problem: the attention kernel, then (with a collapse)
    /// the epilogue over the f32 accumulator.
    ///
    /// # Safety
    /// As [`CudaBackend::forward_raw`].
    pub(super) unsafe fn launch(
        &self,
        pb: &Problem,
        w: &DeviceWeights,
        io: RawIo,
        stream: &Arc<CudaStream>,
    ) -> Result<()> {
        self.ctx.bind_to_thread().map_err(drv("binding the context"))?;
        let c = &pb.cfg;
        let variants = self.variants_for(pb)?;
        let attn_v = variants[0];
        debug_assert_ne!(attn_v.kernel, Kernel::CollapseEpilogue);
        let attn = self.function(attn_v)?;
        let epi = match variants.get(1) {
            Some(&v) => Some((v, self.function(v)?)),
            None => None,
        };

        // The collapse accumulator, zeroed on the stream (stream-ordered allocation and free).
        let mut acc: Option<CudaSlice<f32>> = if pb.collapse {
            Some(
                stream
                    .alloc_zeros::<f32>(pb.batch * pb.n * c.heads * c.head_dim)
                    .map_err(drv("allocating the accumulator"))?,
            )
        } else {
            None
        };
        let (wp, _gw) = w.buf.device_ptr(stream);
        let (ap, _ga) = match acc.as_mut() {
            Some(a) => {
                let (p, g) = a.device_ptr_mut(stream);
                (p, Some(g))
            }
            None => (0, None),
        };
        let at = |slot: usize| wp + 4 * w.offsets[slot] as u64;
        let mut args = HmArgs::from_problem(pb, w.norm);
        args.q = io.q;
        args.k = io.k;
        args.v = io.v;
        args.out = io.out;
        args.lse = io.lse;
        args.has_lse = (io.lse != 0) as i32;
        args.acc = ap;
        args.aq = at(0);
        args.ak = at(1);
        args.av = at(2);
        args.r = if w.collapse { at(3) } else { 0 };
        args.gamma = if w.norm.is_some() { at(4) } else { 0 };
        args.beta = if w.norm == Some(NormKind::Group) { at(5) } else { 0 };

        let t = attn_v.tiles();
        let grid = ((pb.n * c.pseudo).div_ceil(t.br) as u32, c.heads as u32, pb.batch as u32);
        // cuLaunchKernel takes one pointer per kernel parameter; the kernels take `HmArgs` by value.
        let mut params = [&mut args as *mut HmArgs as *mut c_void];
        // SAFETY: the function is loaded in this context; `args` matches the kernels' HmArgs and
        // lives until the call returns (the driver copies parameters at launch).
        unsafe {
            cudarc::driver::result::launch_kernel(
                attn.func.cu_function(),
                grid,
                (t.threads as u32, 1, 1),
                t.smem as u32,
                stream.cu_stream(),
                &mut params,
            )
        }
        .map_err(drv(&format!("launching {}", attn_v.name())))?;
        if let Some((ev, epi)) = epi {
            let rows = pb.batch * pb.n * c.heads;
            let et = ev.tiles();
            // SAFETY: as above.
            unsafe {
                cudarc::driver::result::launch_kernel(
                    epi.func.cu_function(),
                    (rows.div_ceil(et.br) as u32, 1, 1),
                    (et.threads as u32, 1, 1),
                    0,
                    stream.cu_stream(),
                    &mut params,
                )
            }
            .map_err(drv(&format!("launching {}", ev.name())))?;
        }
        Ok(())
    }
}
