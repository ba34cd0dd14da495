//! CUDA backend: kernels compiled at run time by NVRTC for the device's own architecture.
//!
//! # Kernels
//!
//! The kernel sources live in `kernels-cuda/`, embedded by the `headmix-kernels-cuda` crate; what
//! each version (v1, v2, v3, the collapse epilogue, decode) does, the variant scheme (one kernel
//! table, [`kernel_table::KERNELS`], from which variants, preludes, launch shapes, the emulator's
//! grid and the count model derive) and how to add a version: `kernels-cuda/README.md`. v1 serves
//! every problem; v2 and v3 are opt-in ([`CudaBackend::with_kernel`] or `HEADMIX_CUDA_KERNEL=v2|v3`)
//! until a GPU validates them, and fall back to v1 for what they cannot run. Modules are cached
//! per (device, variant) for the life of the process, and PTX per (variant, arch) in memory and,
//! under `HEADMIX_CACHE_DIR`, on disk.
//!
//! - **bwd_v1 / bwd_v2** (`bwd_v1.cu`, `bwd_v2.cu`): the backward pass ([`backward`]): a launch
//!   plan of eight passes (mix, recompute, norm/collapse transpose, dq, dk/dv, mix-back, weight
//!   gradients, reduce), FMA in bwd_v1, the dq and dk/dv passes on the tensor cores in bwd_v2
//!   (f16/bf16, d <= 128, sm_80+, chosen where it runs); no atomics.
//!
//! Without a GPU, every variant is compiled by the `nvrtc_compile` test and run on a CPU emulator
//! of the kernels (`kernels-cuda/emu`) against an f64 implementation of the spec.
//!
//! # Entry points
//!
//! - [`Backend::run`] on host slices (copies in and out, synchronous);
//! - [`CudaBackend::upload_weights`] once, then [`CudaBackend::forward_device`]: cudarc slices or
//!   views already on the device, asynchronous on the caller's stream;
//! - [`CudaBackend::forward_raw`] (`unsafe`): raw device pointers and a `CUstream` handle;
//! - [`Backend::time`]: CUDA events around [`CudaBackend::forward_device`];
//!   [`CudaBackend::kernel_info`]: registers and shared memory of the kernels a problem launches.
//!
//! cudarc loads the driver and NVRTC dynamically and would panic if they were absent; `loader`
//! finds them first (NVRTC also in pip wheels) and [`open`] returns `Error::Device` instead.

pub mod args;
pub mod backward;
pub mod compile;
pub mod cost;
pub mod decode;
mod device;
pub mod kernel_table;
mod loader;
pub mod plan;
pub mod variants;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::sys::{CUdevice_attribute, CUevent_flags, CUfunction_attribute};
use cudarc::driver::{CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, DevicePtrMut};

use crate::validate::Problem;
use crate::{Backend, BackendKind, DType, Error, Io, Result, Timing, Weights};
pub use args::HmArgs;
/// The cudarc this backend is built on (its device types appear in the zero-copy API).
pub use cudarc;
pub use device::{DeviceElem, DeviceWeights, RawIo};
pub use variants::{Kernel, MaskKind, Variant};

fn dev_err(why: impl Into<String>) -> Error {
    Error::device("cuda", why)
}

/// A driver error as `Error::Device`, the `DriverError` kept as its source.
fn drv(what: &str) -> impl Fn(cudarc::driver::DriverError) -> Error + '_ {
    move |e| Error::device_caused("cuda", what, e)
}

/// Open the CUDA backend on device 0.
pub fn open() -> Result<Box<dyn Backend>> {
    Ok(Box::new(CudaBackend::new(0)?))
}

/// Whether NVRTC can be loaded (no GPU needed); the error names what was searched.
pub fn nvrtc_available() -> Result<&'static str> {
    loader::nvrtc().map_err(dev_err)
}

/// Compile the given variants to PTX for `arch` (e.g. `"sm_80"`) without a GPU, on `threads`
/// threads; returns (variant name, PTX bytes) in the order given. A compile error, a non-empty
/// NVRTC log (warnings) or a PTX without the kernel's entry point is an `Error::Device`.
pub fn compile_variants(arch: &str, list: &[Variant], threads: usize) -> Result<Vec<(String, usize)>> {
    let next = std::sync::atomic::AtomicUsize::new(0);
    let results: Mutex<Vec<Option<Result<(String, usize)>>>> = Mutex::new(vec![None; list.len()]);
    std::thread::scope(|scope| {
        for _ in 0..threads.max(1) {
            scope.spawn(|| {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some(v) = list.get(i) else { break };
                    let r = compile::compile_uncached(v, arch).and_then(|c| {
                        compile::check_clean(&v.name(), arch, &c, v.kernel.entry())?;
                        Ok((v.name(), c.ptx.len()))
                    });
                    results.lock().unwrap_or_else(|e| e.into_inner())[i] = Some(r);
                }
            });
        }
    });
    results.into_inner().unwrap_or_else(|e| e.into_inner()).into_iter().map(|r| r.expect("every index ran")).collect()
}

/// A loaded kernel and its resource use.
struct Loaded {
    func: CudaFunction,
    /// The module's further entry points ([`Kernel::extra_entries`]), in that order.
    extra: Vec<CudaFunction>,
    info: KernelInfo,
}

/// Resource use of one loaded kernel variant (from `cuFuncGetAttribute`), for benchmarks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelInfo {
    /// Variant name, e.g. `v1_bf16_d128_causal`.
    pub name: String,
    /// Registers per thread.
    pub registers: i32,
    /// Static shared memory per block, bytes.
    pub static_smem: i32,
    /// Dynamic shared memory per block the launch asks for, bytes.
    pub dynamic_smem: usize,
    /// Local memory per thread (register spills), bytes.
    pub local_bytes: i32,
    /// Threads per block the launch uses.
    pub threads: usize,
    /// Largest block the compiled kernel allows.
    pub max_threads: i32,
}

/// The CUDA backend on one device.
pub struct CudaBackend {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    ordinal: usize,
    arch: String,
    cc: (i32, i32),
    name: String,
    max_smem: usize,
    /// The attention kernel asked for (falls back to v1 where it cannot run a problem).
    kernel: Kernel,
}

fn modules() -> &'static Mutex<HashMap<(usize, Variant), Arc<Loaded>>> {
    static M: OnceLock<Mutex<HashMap<(usize, Variant), Arc<Loaded>>>> = OnceLock::new();
    M.get_or_init(Default::default)
}

impl CudaBackend {
    /// Open device `ordinal`: finds the driver and NVRTC first, so a machine without them gets an
    /// `Error::Device` naming what was searched, never a panic.
    pub fn new(ordinal: usize) -> Result<CudaBackend> {
        loader::driver().map_err(dev_err)?;
        loader::nvrtc().map_err(dev_err)?;
        let count = loader::guarded("CUDA driver", CudaContext::device_count)
            .map_err(dev_err)?
            .map_err(drv("cuDeviceGetCount"))?;
        if ordinal as i64 >= count as i64 {
            return Err(dev_err(format!("no CUDA device {ordinal} ({count} present)")));
        }
        // cudarc resolves driver symbols lazily and panics on one an old driver lacks: guarded.
        let ctx = loader::guarded("CUDA driver", || CudaContext::new(ordinal))
            .map_err(dev_err)?
            .map_err(drv("creating the context"))?;
        let cc = ctx.compute_capability().map_err(drv("compute capability"))?;
        if cc < (7, 5) {
            return Err(dev_err(format!(
                "compute capability {}.{} is below 7.5, the oldest NVRTC 13 targets",
                cc.0, cc.1
            )));
        }
        let name = ctx.name().map_err(drv("device name"))?;
        let max_smem = ctx
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
            .map_err(drv("shared memory limit"))? as usize;
        let stream = ctx.new_stream().map_err(drv("creating a stream"))?;
        let kernel = match std::env::var("HEADMIX_CUDA_KERNEL") {
            Err(_) => Kernel::AttnV1,
            Ok(name) => Kernel::parse(&name).filter(|k| k.spec().number > 0).ok_or_else(|| {
                let names: Vec<_> = Kernel::attention().map(|k| k.name()).collect();
                dev_err(format!("HEADMIX_CUDA_KERNEL={name}: expected one of {}", names.join(", ")))
            })?,
        };
        Ok(CudaBackend { ctx, stream, ordinal, arch: format!("sm_{}{}", cc.0, cc.1), cc, name, max_smem, kernel })
    }

    /// Ask for an attention kernel version (default v1, or `HEADMIX_CUDA_KERNEL=v1|v2|v3`, the
    /// names of the kernel table). Problems the kernel cannot run (dtype, head dim, compute
    /// capability: its table entry; v3 also needs d a multiple of 8, 16-byte aligned tensors and
    /// a pre-mix that fits shared memory) fall back to v1. v1 stays the default until a GPU has
    /// validated the others.
    pub fn with_kernel(mut self, kernel: Kernel) -> CudaBackend {
        if kernel.spec().number > 0 {
            self.kernel = kernel;
        }
        self
    }

    /// The attention kernel asked for.
    pub fn kernel(&self) -> Kernel {
        self.kernel
    }

    /// The backend's CUDA context (the device's primary context).
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// The backend's own stream (used by [`Backend::run`] and [`Backend::time`]).
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The architecture kernels are compiled for, e.g. `sm_90`.
    pub fn arch(&self) -> &str {
        &self.arch
    }

    /// The loaded kernel of a variant: compiled (or read from the PTX caches) and loaded once per
    /// (device, variant) for the life of the process.
    fn function(&self, v: Variant) -> Result<Arc<Loaded>> {
        let key = (self.ordinal, v);
        if let Some(l) = modules().lock().unwrap_or_else(|e| e.into_inner()).get(&key) {
            return Ok(l.clone());
        }
        let tiles = v.tiles();
        if tiles.smem > self.max_smem {
            return Err(Error::Unsupported {
                backend: "cuda",
                why: format!(
                    "{} needs {} bytes of shared memory, the device allows {}",
                    v.name(),
                    tiles.smem,
                    self.max_smem
                ),
            });
        }
        let ptx = compile::ptx(&v, &self.arch)?;
        let module = self.ctx.load_module(cudarc::nvrtc::Ptx::from_src(ptx.as_str())).map_err(|e| {
            dev_err(format!(
                "loading {} (PTX from NVRTC {}): {e}; a driver older than NVRTC cannot JIT its PTX",
                v.name(),
                compile::nvrtc_version().map(|(a, b)| format!("{a}.{b}")).unwrap_or_else(|| "?".into())
            ))
        })?;
        let func = module.load_function(v.kernel.entry()).map_err(drv("cuModuleGetFunction"))?;
        let extra = v
            .kernel
            .extra_entries()
            .iter()
            .map(|e| module.load_function(e).map_err(drv("cuModuleGetFunction")))
            .collect::<Result<Vec<_>>>()?;
        if tiles.smem > 48 * 1024 {
            func.set_attribute(
                CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                tiles.smem as i32,
            )
            .map_err(drv("cuFuncSetAttribute (dynamic shared memory)"))?;
        }
        let info = KernelInfo {
            name: v.name(),
            registers: func.num_regs().map_err(drv("cuFuncGetAttribute"))?,
            static_smem: func.shared_size_bytes().map_err(drv("cuFuncGetAttribute"))?,
            dynamic_smem: tiles.smem,
            local_bytes: func.local_size_bytes().map_err(drv("cuFuncGetAttribute"))?,
            threads: tiles.threads,
            max_threads: func.max_threads_per_block().map_err(drv("cuFuncGetAttribute"))?,
        };
        if info.max_threads < tiles.threads as i32 {
            return Err(dev_err(format!(
                "{}: launches {} threads, the kernel allows {}",
                v.name(),
                tiles.threads,
                info.max_threads
            )));
        }
        let loaded = Arc::new(Loaded { func, extra, info });
        modules().lock().unwrap_or_else(|e| e.into_inner()).insert(key, loaded.clone());
        Ok(loaded)
    }

    /// The variants a validated problem launches, in launch order: the attention kernel asked
    /// for when it can run the problem on this device (else v1), then the collapse epilogue.
    pub fn variants_for(&self, pb: &Problem) -> Result<Vec<Variant>> {
        let (d, mask) = (pb.cfg.head_dim, MaskKind::of(&pb.cfg));
        let preferred = match self.kernel.spec() {
            spec if self.cc < spec.min_cc => None,
            spec if spec.kernel == Kernel::AttnV3 => {
                let most_heads = pb.cfg.q_heads.max(pb.cfg.kv_heads);
                Some(d)
                    .filter(|d| d % 8 == 0)
                    .and_then(|d| Variant::attention(Kernel::AttnV3, pb.dtype, d, mask))
                    .filter(|v| plan::mix_smem(v.hd, most_heads) <= self.max_smem)
            }
            _ => Variant::attention(self.kernel, pb.dtype, d, mask),
        };
        let attn = preferred.or_else(|| Variant::attention(Kernel::AttnV1, pb.dtype, d, mask));
        let mut v = vec![attn.ok_or_else(|| Error::Unsupported { backend: "cuda", why: format!("head dim {d}") })?];
        if pb.collapse {
            v.push(Variant::epilogue(pb.dtype));
        }
        Ok(v)
    }

    /// Registers, shared memory and spills of the kernels a problem launches (compiles and loads
    /// them if needed): what benchmarks report next to their timings.
    pub fn kernel_info(&self, pb: &Problem) -> Result<Vec<KernelInfo>> {
        self.variants_for(pb)?.into_iter().map(|v| Ok(self.function(v)?.info.clone())).collect()
    }

    /// Registers, shared memory and local memory of one variant (compiled and loaded if needed).
    pub fn variant_info(&self, v: Variant) -> Result<KernelInfo> {
        Ok(self.function(v)?.info.clone())
    }

    /// Compile and load every variant now (instead of on first use); returns their resource use.
    pub fn warm_up(&self) -> Result<Vec<KernelInfo>> {
        variants::all_variants().into_iter().map(|v| Ok(self.function(v)?.info.clone())).collect()
    }

    /// Peak device memory a call needs beyond q, k, v, out, lse and the uploaded weights: the
    /// collapse accumulator (`B·N·H·d` f32, independent of `P`).
    pub fn extra_bytes(pb: &Problem) -> u64 {
        if pb.collapse { (pb.batch * pb.n * pb.cfg.heads * pb.cfg.head_dim * 4) as u64 } else { 0 }
    }
}

fn upload<T: DeviceElem>(s: &Arc<CudaStream>, x: &[f32]) -> Result<CudaSlice<T>> {
    let v: Vec<T> = x.iter().map(|&e| T::from_f32(e)).collect();
    s.clone_htod(&v).map_err(drv("upload"))
}

impl Backend for CudaBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Cuda
    }

    fn device_name(&self) -> String {
        self.name.clone()
    }

    fn describe(&self) -> Vec<(String, String)> {
        let mut d = vec![
            ("device".to_string(), format!("{} (ordinal {})", self.name, self.ordinal)),
            ("compute capability".into(), format!("{}.{} (kernels compiled for {})", self.cc.0, self.cc.1, self.arch)),
        ];
        if let Ok(sms) = self.ctx.attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT) {
            d.push(("SMs".into(), sms.to_string()));
        }
        if let Ok(mem) = self.ctx.total_mem() {
            d.push(("memory".into(), format!("{:.1} GiB", mem as f64 / (1u64 << 30) as f64)));
        }
        let mut ver = 0i32;
        // SAFETY: the driver is loaded (the backend opened); the call writes one int.
        if unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut ver) } == cudarc::driver::sys::CUresult::CUDA_SUCCESS {
            d.push(("driver (CUDA version)".into(), format!("{}.{}", ver / 1000, (ver % 1000) / 10)));
        }
        if let Some((major, minor)) = compile::nvrtc_version() {
            d.push(("NVRTC".into(), format!("{major}.{minor} ({})", loader::nvrtc().unwrap_or("?"))));
        }
        d.push(("shared memory per block (opt-in)".into(), format!("{} KiB", self.max_smem / 1024)));
        let spec = self.kernel.spec();
        d.push(("attention kernel".into(), format!("{} ({})", spec.name, spec.summary)));
        let loaded = modules().lock().unwrap_or_else(|e| e.into_inner());
        let mut names: Vec<_> = loaded.iter().filter(|((o, _), _)| *o == self.ordinal).collect();
        names.sort_by_key(|((_, v), _)| *v);
        for (_, l) in names {
            let i = &l.info;
            d.push((
                format!("kernel {}", i.name),
                format!(
                    "{} registers, {} B static + {} B dynamic shared memory, {} B local",
                    i.registers, i.static_smem, i.dynamic_smem, i.local_bytes
                ),
            ));
        }
        d
    }

    /// On a cache of this device: the decode kernels timed by CUDA events
    /// ([`CudaBackend::time_decode_device`]); on a host cache, the host clock.
    fn time_decode(
        &self,
        cfg: &crate::Config,
        w: &Weights,
        cache: &crate::cache::KvCache,
        n: usize,
        reps: usize,
    ) -> Result<crate::decode::DecodeTiming> {
        if cache.is_host() {
            return crate::decode::time_decode_host(self, cfg, w, cache, n, reps);
        }
        self.time_decode_device(cfg, w, cache, n, reps)
    }

    /// A cache in this device's memory ([`decode::CudaKv`]).
    fn new_cache_storage(&self, shape: &crate::cache::CacheShape) -> Result<Option<Box<dyn crate::cache::DeviceKv>>> {
        Ok(Some(Box::new(decode::CudaKv::new(self, shape)?)))
    }

    /// Decode: a cache on this device is read in place by `decode_v1.cu`; a host cache goes
    /// through the generic per-sequence path.
    fn decode(&self, problem: &crate::DecodeProblem, w: &Weights, io: crate::DecodeIo<'_>) -> Result<()> {
        match io.cache.device_storage() {
            None => crate::decode::decode_default(self, problem, w, io),
            Some(d) => match d.as_any().downcast_ref::<decode::CudaKv>() {
                Some(kv) => self.decode_on_device(problem, w, io, kv),
                None => Err(Error::Cache {
                    why: format!("the cache lives on the {} device; this is the CUDA backend", d.backend()),
                }),
            },
        }
    }

    fn supports(&self, pb: &Problem) -> Result<()> {
        let unsupported = |why: String| Err(Error::Unsupported { backend: "cuda", why });
        if pb.batch > 65535 {
            return unsupported(format!("batch {} above 65535 (grid z)", pb.batch));
        }
        if pb.cfg.heads > 65535 {
            return unsupported(format!("{} heads above 65535 (grid y)", pb.cfg.heads));
        }
        for v in self.variants_for(pb)? {
            if v.tiles().smem > self.max_smem {
                return unsupported(format!(
                    "{} needs {} B of shared memory, above {}",
                    v.name(),
                    v.tiles().smem,
                    self.max_smem
                ));
            }
        }
        Ok(())
    }

    /// The CUDA backward (`bwd_v1.cu`, [`backward`]): extra device memory
    /// [`backward::BwdPlan::extra_bytes`], deterministic (no atomics).
    fn run_backward(&self, pb: &Problem, w: &Weights, io: crate::BackwardIo<'_>) -> Result<()> {
        self.backward_on_device(pb, w, io)
    }

    fn run(&self, pb: &Problem, w: &Weights, io: Io<'_>) -> Result<()> {
        pb.check_io(w, &io)?;
        self.supports(pb)?;
        let s = &self.stream;
        let dw = self.upload_weights(&pb.cfg, w, s)?;
        let q = s.clone_htod(io.q.data.bytes()).map_err(drv("copying q"))?;
        let k = s.clone_htod(io.k.data.bytes()).map_err(drv("copying k"))?;
        let v = s.clone_htod(io.v.data.bytes()).map_err(drv("copying v"))?;
        let mut out_t = io.out;
        let out_bytes = out_t.data.bytes_mut();
        // SAFETY: every byte of out (and of lse, when asked for) is written by the kernels.
        let mut out = unsafe { s.alloc::<u8>(out_bytes.len()) }.map_err(drv("allocating out"))?;
        let mut lse = match io.lse.as_ref() {
            Some(l) => Some(unsafe { s.alloc::<f32>(l.len()) }.map_err(drv("allocating lse"))?),
            None => None,
        };
        {
            let (qp, _a) = q.device_ptr(s);
            let (kp, _b) = k.device_ptr(s);
            let (vp, _c) = v.device_ptr(s);
            let (op, _d) = out.device_ptr_mut(s);
            let (lp, _e) = match lse.as_mut() {
                Some(l) => {
                    let (p, g) = l.device_ptr_mut(s);
                    (p, Some(g))
                }
                None => (0, None),
            };
            // SAFETY: all buffers were allocated on this stream with the validated sizes.
            unsafe { self.launch(pb, &dw, RawIo { q: qp, k: kp, v: vp, out: op, lse: lp }, s)? };
        }
        s.memcpy_dtoh(&out, out_bytes).map_err(drv("copying out back"))?;
        if let (Some(dst), Some(src)) = (io.lse, lse.as_ref()) {
            s.memcpy_dtoh(src, dst).map_err(drv("copying lse back"))?;
        }
        s.synchronize().map_err(drv("running the kernels"))?;
        Ok(())
    }

    /// CUDA events around [`CudaBackend::forward_device`] on device-resident random inputs, with
    /// the weights uploaded once (as a model would hold them).
    fn time(&self, pb: &Problem, w: &Weights, reps: usize) -> Result<Timing> {
        pb.check(w)?;
        self.supports(pb)?;
        let s = &self.stream;
        let (q, k, v) = crate::timing::try_random_inputs(pb, 1)?;
        let out_len: usize = pb.out_shape().iter().product();
        let dw = self.upload_weights(&pb.cfg, w, s)?;
        let mut seconds = Vec::with_capacity(reps);
        macro_rules! timed {
            ($t:ty) => {{
                let (q, k, v) = (upload::<$t>(s, &q)?, upload::<$t>(s, &k)?, upload::<$t>(s, &v)?);
                let mut out = s.alloc_zeros::<$t>(out_len).map_err(drv("allocating out"))?;
                let mut lse = s.alloc_zeros::<f32>(pb.lse_len()).map_err(drv("allocating lse"))?;
                for rep in 0..=reps {
                    let start = s.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).map_err(drv("event"))?;
                    self.forward_device(&pb.cfg, &dw, pb.batch, &q, &k, &v, &mut out, Some(&mut lse), s)?;
                    let end = s.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).map_err(drv("event"))?;
                    end.synchronize().map_err(drv("running the kernels"))?;
                    if rep > 0 {
                        seconds.push(start.elapsed_ms(&end).map_err(drv("event time"))? as f64 * 1e-3);
                    }
                }
            }};
        }
        match pb.dtype {
            DType::F32 => timed!(f32),
            DType::F16 => timed!(half::f16),
            DType::BF16 => timed!(half::bf16),
        }
        Ok(Timing { seconds, extra_bytes: CudaBackend::extra_bytes(pb), clock: "cuda events" })
    }
}
