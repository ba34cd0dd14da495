//! Device-side entry points: weights uploaded once, tensors already on the device, launches
//! enqueued asynchronously on the caller's stream.

use std::ffi::c_void;
use std::sync::Arc;

use cudarc::driver::sys::{CUcontext, CUfunction_attribute};
use cudarc::driver::{CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, DeviceRepr};

use super::args::{HmArgs, HmRows, HmV3Attn, HmV3Mix};
use super::plan::{self, Source, V3Plan};
use super::variants::{Kernel, Variant};
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

/// Device memory of context `theirs` is usable by kernels of context `ours` when both are one
/// `CUcontext`: `CudaContext::new` of one device retains its primary context, so two such
/// handles share memory; a non-primary context (`CudaContext::new_non_primary`) or another
/// device's is [`Error::ForeignBuffer`] naming `what`. (Both contexts are alive while their
/// `Arc`s are, so equal handles are one context, never a reused address.)
fn same_context(what: &'static str, ours: CUcontext, theirs: CUcontext) -> Result<()> {
    if ours == theirs { Ok(()) } else { Err(Error::ForeignBuffer { what }) }
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
    /// v3: which tensors are read stored (selection) and which pre-mixed.
    plan: V3Plan,
    /// Element offsets in `buf` of the i32 tables (bit-cast into the f32 buffer): the selections
    /// of q, k, v (`usize::MAX` for dense mixing) and the identity `0..H*P` of pre-mixed rows.
    tables: [usize; 4],
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
        // v3's tables: selections (detected here, once per upload) and the identity.
        let plan = V3Plan::new(cfg, &w.aq, &w.ak, &w.av);
        let mut tables = [usize::MAX; 4];
        let hp = cfg.heads * cfg.pseudo;
        let iota: Vec<i32> = (0..hp as i32).collect();
        for (slot, src) in [Some(&plan.q), Some(&plan.k), Some(&plan.v), None].into_iter().enumerate() {
            let table = match src {
                Some(Source::Stored(sel)) | Some(Source::Premixed(Some(sel))) => sel,
                Some(Source::Premixed(None)) => continue,
                None => &iota,
            };
            tables[slot] = packed.len();
            packed.extend(table.iter().map(|&m| f32::from_bits(m as u32)));
        }
        packed.push(0.0); // never empty
        let buf = stream.clone_htod(&packed).map_err(drv("uploading the weights"))?;
        let norm = w.norm.as_ref().map(|n| n.kind());
        Ok(DeviceWeights { buf, offsets, collapse: w.r.is_some(), norm, dims: dims_of(cfg), plan, tables })
    }

    /// [`Error::ForeignBuffer`] naming `what` unless memory of context `theirs` is this backend's.
    pub(super) fn check_owner(&self, what: &'static str, theirs: &Arc<CudaContext>) -> Result<()> {
        if Arc::ptr_eq(theirs, &self.ctx) {
            return Ok(());
        }
        same_context(what, self.ctx.cu_ctx(), theirs.cu_ctx())
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
    /// size is checked before anything is enqueued, and every tensor's (and the weights')
    /// context, read off its cudarc stream: memory of another context (another device, or a
    /// non-primary context of this one) is [`Error::ForeignBuffer`] naming it. Raw pointers,
    /// which carry no context, go through the `unsafe` [`CudaBackend::forward_raw`].
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
        // Every tensor must live in this backend's context (a slice of another context would
        // reach the kernels as an address they cannot read): by each slice's own stream.
        self.check_owner("device weights", w.buf.context())?;
        self.check_owner("q (device)", q.stream().context())?;
        self.check_owner("k (device)", k.stream().context())?;
        self.check_owner("v (device)", v.stream().context())?;
        self.check_owner("out (device)", out.stream().context())?;
        if let Some(l) = &lse {
            self.check_owner("lse (device)", l.context())?;
        }
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
        let mut variants = self.variants_for(pb)?;
        if variants[0].kernel == Kernel::AttnV3 && [io.q, io.k, io.v, io.out].iter().any(|p| p % 16 != 0) {
            // v3 loads 16-byte rows: a tensor that is not 16-byte aligned runs on v1.
            variants[0] = Variant::attention(Kernel::AttnV1, pb.dtype, c.head_dim, super::variants::MaskKind::of(c))
                .ok_or_else(|| Error::Unsupported { backend: "cuda", why: format!("head dim {}", c.head_dim) })?;
        }
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

        if attn_v.kernel == Kernel::AttnV3 {
            // SAFETY: as this function's contract; the weights buffer holds the v3 tables.
            unsafe { self.launch_v3(pb, w, &args, attn_v, &attn, stream)? };
        } else {
            self.launch_attention(pb, &args, attn_v, &attn, stream)?;
        }
        if let Some((ev, epi)) = epi {
            let mut params = [&mut args as *mut HmArgs as *mut c_void];
            let rows = pb.batch * pb.n * c.heads;
            let et = ev.tiles();
            // SAFETY: the function is loaded in this context; `args` matches the kernel's HmArgs.
            unsafe {
                launch_raw(
                    &epi.func,
                    (rows.div_ceil(et.br) as u32, 1, 1),
                    et.threads as u32,
                    0,
                    stream,
                    &mut params,
                    &format!("launching {}", ev.name()),
                )
            }?;
        }
        Ok(())
    }

    /// v1/v2: one attention launch over (query tiles, heads, batch).
    fn launch_attention(
        &self,
        pb: &Problem,
        args: &HmArgs,
        attn_v: Variant,
        attn: &super::Loaded,
        stream: &Arc<CudaStream>,
    ) -> Result<()> {
        let c = &pb.cfg;
        let mut args = *args;
        let t = attn_v.tiles();
        let grid = ((pb.n * c.pseudo).div_ceil(t.br) as u32, c.heads as u32, pb.batch as u32);
        // cuLaunchKernel takes one pointer per kernel parameter; the kernels take `HmArgs` by value.
        let mut params = [&mut args as *mut HmArgs as *mut c_void];
        // SAFETY: the function is loaded in this context; `args` matches the kernels' HmArgs and
        // lives until the call returns (the driver copies parameters at launch).
        unsafe {
            launch_raw(
                &attn.func,
                grid,
                t.threads as u32,
                t.smem as u32,
                stream,
                &mut params,
                &format!("launching {}", attn_v.name()),
            )
        }?;
        Ok(())
    }

    /// v3: the pre-mixes the plan asks for (scratch rows `[B, L, H*P, d]`, RoPE tables built
    /// here in f64), the attention over row tables, and with a collapse the no-atomics collapse
    /// into the accumulator (the epilogue follows in [`CudaBackend::launch`]).
    ///
    /// # Safety
    /// As [`CudaBackend::forward_raw`]; `args` carries the call's device pointers.
    unsafe fn launch_v3(
        &self,
        pb: &Problem,
        w: &DeviceWeights,
        args: &HmArgs,
        attn_v: Variant,
        attn: &super::Loaded,
        stream: &Arc<CudaStream>,
    ) -> Result<()> {
        let c = &pb.cfg;
        let (b, n, m) = (pb.batch, pb.n, pb.m);
        let (hp, d) = (c.heads * c.pseudo, c.head_dim);
        let mut args = *args;
        let (wp, _gw) = w.buf.device_ptr(stream);
        let table = |slot: usize| if w.tables[slot] == usize::MAX { 0 } else { wp + 4 * w.tables[slot] as u64 };
        let iota = table(3);
        // RoPE: positions pos0 .. pos0 + M*P - 1 (queries sit at the last N*P of them).
        let rope = match c.rope {
            Some(r) => {
                let first = c.pos_offset as u64;
                let t = plan::rope_tables(r.base, d, first, first + (m * c.pseudo) as u64 - 1);
                let hi = stream.clone_htod(&t.hi).map_err(drv("uploading the RoPE table"))?;
                let lo = stream.clone_htod(&t.lo).map_err(drv("uploading the RoPE table"))?;
                Some((hi, lo, t.hi0))
            }
            None => None,
        };
        let mut scratch: Vec<CudaSlice<u16>> = Vec::new();
        let mix_fn = &attn.extra[0];
        let mut rows =
            |src: &Source, x: u64, l: usize, s: usize, wslot: usize, tslot: usize, query: bool| -> Result<HmRows> {
                match src {
                    Source::Stored(_) => Ok(HmRows { base: x, sel: table(tslot), tok: (s * d) as i32, pad: 0 }),
                    Source::Premixed(sel) => {
                        // SAFETY: every element is written by the pre-mix before the attention reads it.
                        let mut y =
                            unsafe { stream.alloc::<u16>(b * l * hp * d) }.map_err(drv("allocating pre-mix rows"))?;
                        let (yp, _gy) = y.device_ptr_mut(stream);
                        let (rh, rl, hi0) = match (&rope, tslot != 2) {
                            (Some((hi, lo, hi0)), true) => (hi.device_ptr(stream).0, lo.device_ptr(stream).0, *hi0),
                            _ => (0, 0, 0),
                        };
                        let mut mix = HmV3Mix {
                            x,
                            y: yp,
                            w: wp + 4 * w.offsets[wslot] as u64,
                            sel: if sel.is_some() { table(tslot) } else { 0 },
                            rope_hi: rh,
                            rope_lo: rl,
                            l: l as i32,
                            s: s as i32,
                            query: query as i32,
                            rope_hi0: hi0 as i32,
                        };
                        let smem = plan::mix_smem(attn_v.hd, s);
                        if smem > 48 * 1024 {
                            mix_fn
                                .set_attribute(
                                    CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                                    smem as i32,
                                )
                                .map_err(drv("cuFuncSetAttribute (pre-mix shared memory)"))?;
                        }
                        let mut a = args;
                        let mut params =
                            [&mut a as *mut HmArgs as *mut c_void, &mut mix as *mut HmV3Mix as *mut c_void];
                        // SAFETY: loaded in this context; the parameters match hm_v3_mix(HmArgs, HmV3Mix).
                        unsafe {
                            launch_raw(
                                &mix_fn,
                                (l.div_ceil(16) as u32, hp.div_ceil(64) as u32, b as u32),
                                128,
                                smem as u32,
                                stream,
                                &mut params,
                                "launching hm_v3_mix",
                            )
                        }?;
                        drop(_gy);
                        scratch.push(y);
                        Ok(HmRows { base: yp, sel: iota, tok: (hp * d) as i32, pad: 0 })
                    }
                }
            };
        let q = rows(&w.plan.q, args.q, n, c.q_heads, 0, 0, true)?;
        let k = rows(&w.plan.k, args.k, m, c.kv_heads, 1, 1, false)?;
        let v = rows(&w.plan.v, args.v, m, c.kv_heads, 2, 2, false)?;
        // With a collapse the pseudo outputs go to a scratch [B, N, H, P, d] once (no atomics).
        let mut op_buf: Option<CudaSlice<u16>> = if pb.collapse {
            // SAFETY: the attention kernel writes every element before the collapse reads it.
            Some(unsafe { stream.alloc::<u16>(b * n * hp * d) }.map_err(drv("allocating pseudo outputs"))?)
        } else {
            None
        };
        let op = match op_buf.as_mut() {
            Some(o) => o.device_ptr_mut(stream).0,
            None => args.out,
        };
        let (p_mul, p_shr) = plan::fast_div(c.pseudo as u32);
        let mut x = HmV3Attn { q, k, v, op, p_mul, p_shr };
        let t = attn_v.tiles();
        let grid = ((n * c.pseudo).div_ceil(t.br) as u32, c.heads as u32, b as u32);
        let mut params = [&mut args as *mut HmArgs as *mut c_void, &mut x as *mut HmV3Attn as *mut c_void];
        // SAFETY: loaded in this context; the parameters match hm_attn_v3(HmArgs, HmV3Attn).
        unsafe {
            launch_raw(
                &attn.func,
                grid,
                t.threads as u32,
                t.smem as u32,
                stream,
                &mut params,
                &format!("launching {}", attn_v.name()),
            )
        }?;
        if pb.collapse {
            let mut opp = op;
            let mut params = [&mut args as *mut HmArgs as *mut c_void, &mut opp as *mut u64 as *mut c_void];
            // SAFETY: loaded in this context; the parameters match hm_v3_collapse(HmArgs, const void*).
            unsafe {
                launch_raw(
                    &attn.extra[1],
                    ((b * n) as u32, 1, 1),
                    128,
                    0,
                    stream,
                    &mut params,
                    "launching hm_v3_collapse",
                )
            }?;
        }
        drop(scratch); // stream-ordered frees, after the kernels that read them
        drop(op_buf);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::same_context;
    use crate::Error;
    use cudarc::driver::sys::CUcontext;

    /// The ownership rule on context handles (no GPU: the handles are opaque pointers): one
    /// context is accepted, another is `ForeignBuffer` naming the binding.
    #[test]
    fn memory_of_another_context_is_foreign() {
        let (a, b) = (
            std::ptr::without_provenance_mut::<u8>(0x1000) as CUcontext,
            std::ptr::without_provenance_mut::<u8>(0x2000) as CUcontext,
        );
        assert_eq!(same_context("q (device)", a, a), Ok(()));
        assert_eq!(same_context("q (device)", a, b), Err(Error::ForeignBuffer { what: "q (device)" }));
        assert_eq!(same_context("lse (device)", b, a), Err(Error::ForeignBuffer { what: "lse (device)" }));
    }
}

/// Enqueue `func` on `stream`: a `grid` of blocks of `threads` threads with `smem` bytes of
/// dynamic shared memory, `params` one pointer per kernel parameter (the driver copies the
/// values at launch); a driver error names `what`.
///
/// # Safety
/// `func` is loaded in the current context and `params` point to live values matching its
/// parameters, with every device pointer in them valid for what the kernel reads and writes.
pub(super) unsafe fn launch_raw(
    func: &CudaFunction,
    grid: (u32, u32, u32),
    threads: u32,
    smem: u32,
    stream: &CudaStream,
    params: &mut [*mut c_void],
    what: &str,
) -> Result<()> {
    // SAFETY: the caller's contract.
    unsafe {
        cudarc::driver::result::launch_kernel(
            func.cu_function(),
            grid,
            (threads, 1, 1),
            smem,
            stream.cu_stream(),
            params,
        )
    }
    .map_err(drv(what))
}
