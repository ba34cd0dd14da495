//! The backend abstraction and the choice of the best backend present.

use std::fmt;

use crate::validate::{Problem, validate};
use crate::{Config, Result, Tensor, TensorMut, Weights};

/// The kinds of backend, best first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BackendKind {
    /// NVIDIA GPUs through CUDA (kernels compiled by NVRTC).
    Cuda,
    /// Any Vulkan, Metal, DX12 or WebGPU adapter through wgpu (WGSL kernels).
    Wgpu,
    /// The host CPU (the reference, f32, rayon).
    Cpu,
}

impl BackendKind {
    /// Every kind, best first (the order [`best`] tries them in).
    pub const ALL: [BackendKind; 3] = [BackendKind::Cuda, BackendKind::Wgpu, BackendKind::Cpu];

    /// Lower-case name (`cuda`, `wgpu`, `cpu`).
    pub fn name(self) -> &'static str {
        match self {
            BackendKind::Cuda => "cuda",
            BackendKind::Wgpu => "wgpu",
            BackendKind::Cpu => "cpu",
        }
    }

    /// The kind of a lower-case name, if any.
    pub fn parse(s: &str) -> Option<BackendKind> {
        BackendKind::ALL.into_iter().find(|k| k.name() == s)
    }
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The inputs and outputs of one forward call on host memory.
#[derive(Debug)]
pub struct Io<'a> {
    /// Stored queries `[B, N, Hq, d]`.
    pub q: Tensor<'a>,
    /// Stored keys `[B, M, Hk, d]`.
    pub k: Tensor<'a>,
    /// Stored values `[B, M, Hk, d]`.
    pub v: Tensor<'a>,
    /// Output `[B, N, H, d]` with a collapse `r`, else `[B, N, H, P, d]`; same dtype as `q`.
    pub out: TensorMut<'a>,
    /// `[B, H, N·P]` log-sum-exp, when asked for.
    pub lse: Option<&'a mut [f32]>,
}

/// Device time of repeated forward calls on inputs already on the device.
#[derive(Clone, Debug, PartialEq)]
pub struct Timing {
    /// Seconds per call, one entry per timed repetition (after warm-up).
    pub seconds: Vec<f64>,
    /// Extra device memory the call needed beyond inputs and outputs, in bytes.
    pub extra_bytes: u64,
    /// How the time was taken (e.g. "cuda events", "wgpu timestamps", "wall clock").
    pub clock: &'static str,
}

/// A place head-mixing attention can run. Implementations receive validated problems only.
pub trait Backend: Send + Sync {
    /// Which kind of backend this is.
    fn kind(&self) -> BackendKind;

    /// The device's name, as the driver reports it.
    fn device_name(&self) -> String;

    /// Key facts for `headmix info`: driver, limits, features.
    fn describe(&self) -> Vec<(String, String)>;

    /// Whether this backend can run a valid problem; `Err(Unsupported)` names why not.
    fn supports(&self, _problem: &Problem) -> Result<()> {
        Ok(())
    }

    /// Run a validated problem. Called only after [`validate`] and [`Backend::supports`] passed.
    fn run(&self, problem: &Problem, w: &Weights, io: Io<'_>) -> Result<()>;

    /// Time `reps` calls of a validated problem on device-resident random inputs (after warm-up).
    /// The default uses host calls and the wall clock, which is right for the CPU.
    fn time(&self, problem: &Problem, w: &Weights, reps: usize) -> Result<Timing> {
        crate::timing::time_host(self, problem, w, reps)
    }

    /// Decode new tokens against a KV cache (a problem validated by
    /// [`crate::decode::validate_decode`]; call it through [`crate::decode()`]). The default
    /// ([`crate::decode::decode_default`]) unrolls each sequence's cache and calls
    /// [`Backend::run`] per sequence, so every backend decodes; the CPU overrides it with the
    /// host split-KV algorithm, and device backends may override it with split-KV kernels.
    fn decode(&self, problem: &crate::DecodeProblem, w: &Weights, io: crate::DecodeIo<'_>) -> Result<()> {
        crate::decode::decode_default(self, problem, w, io)
    }

    /// Time `reps` decode calls of `n` new random tokens per sequence on `cache` (after one
    /// warm-up call), with the cache bytes one call reads (counted: every held token of each
    /// sequence's visible band, keys and values, once). The default is the host clock around
    /// [`crate::decode()`] (the CPU backend, host caches); the wgpu and CUDA backends time their
    /// decode kernels on a cache of their device with the device clock.
    fn time_decode(
        &self,
        cfg: &Config,
        w: &Weights,
        cache: &crate::cache::KvCache,
        n: usize,
        reps: usize,
    ) -> Result<crate::decode::DecodeTiming> {
        crate::decode::time_decode_host(self, cfg, w, cache, n, reps)
    }

    /// Compute the gradients of a validated backward problem (`docs/backward.md`). Called only
    /// after [`crate::validate_backward`] and [`Backend::supports`] passed. The default: the
    /// backend has no backward pass.
    fn run_backward(&self, _problem: &Problem, _w: &Weights, _io: crate::BackwardIo<'_>) -> Result<()> {
        Err(crate::Error::Unsupported {
            backend: self.kind().name(),
            why: "no backward pass on this backend yet".into(),
        })
    }

    /// Validate, then compute the gradients: the backward's entry point for host slices.
    fn backward(&self, cfg: &Config, w: &Weights, io: crate::BackwardIo<'_>) -> Result<()> {
        let problem = crate::validate_backward(cfg, w, &io)?;
        self.supports(&problem)?;
        self.run_backward(&problem, w, io)
    }

    /// Allocate a device-resident KV cache storage for `shape` on this backend's device (see
    /// [`crate::cache::KvCache::new_on`]); `None`: this backend keeps caches in host memory.
    fn new_cache_storage(&self, _shape: &crate::cache::CacheShape) -> Result<Option<Box<dyn crate::cache::DeviceKv>>> {
        Ok(None)
    }

    /// Validate, then run: the entry point for host slices. Nothing is written to `io.out` or
    /// `io.lse` unless validation passed.
    ///
    /// ```
    /// use headmix::{Backend, BackendKind, Config, Io, Tensor, TensorMut, Weights};
    ///
    /// let cfg = Config::gqa(4, 2, 8)?; // 4 query heads share 2 key/value heads, d = 8
    /// let w = Weights::identity(&cfg); // no collapse `r`, P = 1: the output is [B, N, H, d] ([B, N, H, 1, d] accepted)
    /// let q: Vec<f32> = (0..5 * 4 * 8).map(|i| (i as f32 * 0.1).cos()).collect(); // [1, 5, 4, 8]
    /// let kv: Vec<f32> = (0..5 * 2 * 8).map(|i| (i as f32 * 0.3).sin()).collect(); // [1, 5, 2, 8]
    /// let mut out = vec![0f32; 5 * 4 * 8];
    /// let mut lse = vec![0f32; 4 * 5]; // [B, H, N·P]
    /// let cpu = headmix::open(BackendKind::Cpu)?;
    /// cpu.forward(&cfg, &w, Io {
    ///     q: Tensor::new(&q, &[1, 5, 4, 8]),
    ///     k: Tensor::new(&kv, &[1, 5, 2, 8]),
    ///     v: Tensor::new(&kv, &[1, 5, 2, 8]),
    ///     out: TensorMut::new(&mut out, &[1, 5, 4, 1, 8]),
    ///     lse: Some(&mut lse),
    /// })?;
    /// // A wrong shape is a typed error naming the tensor, and `out` is left untouched.
    /// let mut bad = vec![7f32; 5 * 4 * 8];
    /// let e = cpu.forward(&cfg, &w, Io {
    ///     q: Tensor::new(&q, &[1, 5, 4, 8]),
    ///     k: Tensor::new(&kv, &[1, 5, 2, 8]),
    ///     v: Tensor::new(&kv, &[1, 5, 2, 8]),
    ///     out: TensorMut::new(&mut bad, &[1, 5, 2, 16]),
    ///     lse: None,
    /// });
    /// assert!(matches!(e, Err(headmix::Error::Shape { what: "out", .. })));
    /// assert!(bad.iter().all(|&x| x == 7.0));
    /// # Ok::<(), headmix::Error>(())
    /// ```
    fn forward(&self, cfg: &Config, w: &Weights, io: Io<'_>) -> Result<()> {
        let problem = validate(cfg, w, &io.q, &io.k, &io.v, &io.out, io.lse.as_deref())?;
        self.supports(&problem)?;
        self.run(&problem, w, io)
    }
}

/// The outcome of [`best`]: the backend picked and why the better ones were not.
pub struct Selection {
    /// The backend picked.
    pub backend: Box<dyn Backend>,
    /// One line per better backend that was not available, with the reason.
    pub skipped: Vec<(BackendKind, String)>,
}

/// Open one backend by kind.
pub fn open(kind: BackendKind) -> Result<Box<dyn Backend>> {
    match kind {
        #[cfg(feature = "cuda")]
        BackendKind::Cuda => crate::backends::cuda::open(),
        #[cfg(not(feature = "cuda"))]
        BackendKind::Cuda => Err(crate::Error::device("cuda", "headmix was built without the `cuda` feature")),
        BackendKind::Wgpu => crate::backends::wgpu::open(),
        BackendKind::Cpu => Ok(Box::new(crate::backends::cpu::CpuBackend::new())),
    }
}

/// A wgpu adapter that is the CPU in disguise (Mesa's lavapipe/llvmpipe), unless the user named
/// an adapter explicitly.
fn is_software_adapter(b: &dyn Backend) -> bool {
    b.kind() == BackendKind::Wgpu
        && std::env::var_os("HEADMIX_WGPU_ADAPTER").is_none()
        && b.describe().iter().any(|(k, v)| k == "device type" && v == "Cpu")
}

/// The best backend present: CUDA, then a hardware wgpu adapter, then the CPU; says why the
/// others were skipped.
///
/// ```
/// let sel = headmix::best();
/// println!("running on {} ({})", sel.backend.kind(), sel.backend.device_name());
/// for (kind, why) in &sel.skipped {
///     println!("  {kind} skipped: {why}");
/// }
/// ```
pub fn best() -> Selection {
    let mut skipped = Vec::new();
    for kind in BackendKind::ALL {
        match open(kind) {
            Ok(backend) if is_software_adapter(backend.as_ref()) => skipped.push((
                kind,
                format!(
                    "only a software adapter ({}), slower than the CPU backend; \
                     name it in HEADMIX_WGPU_ADAPTER or pick the backend to use it anyway",
                    backend.device_name()
                ),
            )),
            Ok(backend) => return Selection { backend, skipped },
            Err(e) => skipped.push((kind, e.to_string())),
        }
    }
    unreachable!("the CPU backend always opens")
}
