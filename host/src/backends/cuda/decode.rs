//! Decode on the CUDA device: the device-resident KV cache ([`CudaKv`]) and the decode call
//! (one block per (split, sequence) owning all heads, then the split combine; with a collapse `r`
//! a merge-and-collapse kernel instead, one block per token summing in a fixed order: no atomics,
//! so a decode call is deterministic bit for bit). Two numbered kernels ([`DecodeKernel`]):
//! `kernels-cuda/decode_v1.cu` (FMA, every dtype, the default) and `decode_v2.cu` (tensor
//! cores, the absorbed form, cp.async double-buffered cache tiles; f16/bf16, `d % 16 == 0`,
//! sm_80+), picked by `HEADMIX_CUDA_DECODE=v1|v2`; a problem v2 cannot run falls back to v1.
//!
//! A decode module is compiled by NVRTC from its own source (the shared headers, `decode.cuh`,
//! for v2 `tiles.cuh`, the kernel file, `decode_combine.cu`), one per (kernel, dtype), outside the attention
//! variant table (`HM_MASK` 3, any `HM_HD`: `d` is a run-time argument up to 256). Host-side
//! planning shared with the wgpu decode lives in [`crate::decode::plan`].

use std::any::Any;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::sys::CUfunction_attribute;
use cudarc::driver::{CudaFunction, CudaSlice, CudaStream, DevicePtr, DevicePtrMut};

use cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};

use super::args::HmArgs;
use super::variants::src;
use super::{CudaBackend, compile, dev_err, drv};
use crate::cache::{CacheShape, DeviceKv, HostTraffic, TrafficCounter, owned_from_le_bytes};
use crate::decode::plan::{bands, max_position, rope_levels, rope_table, selection_bits, split};
use crate::decode::{DecodeIo, DecodeProblem};
use crate::timing::Owned;
use crate::{BackendKind, DType, Data, Error, PosMode, Result, Weights};

/// Threads per decode block (`HM_NT`).
pub const DECODE_THREADS: usize = 128;
/// Rows (warps) per combine block (`HM_DEC_ROWS`).
const COMBINE_ROWS: usize = 4;
/// Warps per merge-and-collapse block (`HM_DEC_CWARPS`).
const COLLAPSE_WARPS: usize = 8;

/// `HmDecodeArgs` of `decode.cuh`: 3 pointers, 8 `i32` (56 bytes, no padding).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct DecodeArgs {
    /// Device pointer to `[B]` u32: the absolute length of each sequence.
    pub lens: u64,
    /// Device pointer to the f32 partials `[splits, B, H, N·P, d + 2]` (unnormalised output, max,
    /// sum); with a collapse, `hm_decode_collapse_v1` then keeps each merged pseudo output in its
    /// row of split 0 (scratch, read by the same block).
    pub part: u64,
    /// Device pointer to the RoPE table `[levels, 256, d/2, 2]` (cos, sin), or 0 without RoPE.
    pub rope_tab: u64,
    /// Cache slots per sequence.
    pub capacity: i32,
    /// Key splits per sequence (grid x).
    pub splits: i32,
    /// Stored tokens each split covers.
    pub tokens_per_split: i32,
    /// Stored tokens per shared-memory tile.
    pub tile_tokens: i32,
    /// Bytes of the position the RoPE table composes (0 without RoPE).
    pub rope_levels: i32,
    /// Bits 0, 1, 2: `aq`, `ak`, `av` is a selection (zero weights skip their head).
    pub selection: i32,
    /// 1 when a token row of the cache is a multiple of 16 bytes (16-byte loads).
    pub vec16: i32,
    /// Unused; keeps the struct at 56 bytes.
    pub pad: i32,
}

const _: () = assert!(std::mem::size_of::<DecodeArgs>() == 56);

// SAFETY: plain `#[repr(C)]` structs of integers and device addresses, laid out as the kernels'
// `HmArgs` / `HmDecodeArgs` (size checks above and in args.rs): passed by value to the kernels.
unsafe impl DeviceRepr for DecodeArgs {}
unsafe impl DeviceRepr for HmArgs {}

/// The numbered decode kernels (llm.c style); both stay available and tested.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DecodeKernel {
    /// `decode_v1.cu`: FMA mixing on chip, every dtype, `d <= 256`.
    V1,
    /// `decode_v2.cu`: tensor cores (mma.sync m16n8k16) in the absorbed form, cp.async
    /// double-buffered cache tiles; f16/bf16, `d % 16 == 0`, `d <= 256`, sm_80+.
    V2,
}

impl DecodeKernel {
    /// Every decode kernel, by version.
    pub const ALL: [DecodeKernel; 2] = [DecodeKernel::V1, DecodeKernel::V2];

    /// Short name (`HEADMIX_CUDA_DECODE`, variant names).
    pub fn name(self) -> &'static str {
        match self {
            DecodeKernel::V1 => "v1",
            DecodeKernel::V2 => "v2",
        }
    }

    /// The kernel of a short name.
    pub fn parse(name: &str) -> Option<DecodeKernel> {
        DecodeKernel::ALL.into_iter().find(|k| k.name() == name)
    }

    /// The decode entry point (the combine is `hm_decode_combine_v1`, with a collapse
    /// `hm_decode_collapse_v1`, for both).
    pub fn entry(self) -> &'static str {
        match self {
            DecodeKernel::V1 => "hm_decode_v1",
            DecodeKernel::V2 => "hm_decode_v2",
        }
    }

    /// Storage dtypes it runs.
    pub fn dtypes(self) -> &'static [DType] {
        match self {
            DecodeKernel::V1 => &[DType::F32, DType::F16, DType::BF16],
            DecodeKernel::V2 => &[DType::F16, DType::BF16],
        }
    }

    /// The kernel `HEADMIX_CUDA_DECODE` asks for (v1 when unset: v2 has not run on hardware yet).
    pub fn from_env() -> Result<DecodeKernel> {
        match std::env::var("HEADMIX_CUDA_DECODE") {
            Err(_) => Ok(DecodeKernel::V1),
            Ok(name) => DecodeKernel::parse(&name)
                .ok_or_else(|| dev_err(format!("HEADMIX_CUDA_DECODE={name}: expected one of v1, v2"))),
        }
    }
}

/// The NVRTC source of the v1 decode module of a dtype.
pub fn decode_source(dtype: DType) -> String {
    decode_source_of(DecodeKernel::V1, dtype)
}

/// The NVRTC source of a decode module: a `#define` prelude, the shared headers and
/// `decode.cuh` (v2 also `tiles.cuh`), the kernel file, then `decode_combine.cu`.
pub fn decode_source_of(kernel: DecodeKernel, dtype: DType) -> String {
    let code = match dtype {
        DType::F32 => 0,
        DType::F16 => 1,
        DType::BF16 => 2,
    };
    let (tiles, file) = match kernel {
        DecodeKernel::V1 => ("", src::DECODE_V1),
        DecodeKernel::V2 => (src::TILES, src::DECODE_V2),
    };
    format!(
        "// headmix decode_{} {}\n#define HM_DTYPE {code}\n#define HM_HD 128\n#define HM_MASK 3\n#define HM_NT {DECODE_THREADS}\n{}\n{}\n{}\n{tiles}\n{file}\n{}\n",
        kernel.name(),
        dtype.name(),
        src::COMMON,
        src::NORM,
        src::DECODE,
        src::DECODE_COMBINE
    )
}

/// Compile the v1 decode module of `dtype` for `arch` without a GPU, failing on any warning or a
/// missing entry point; returns the PTX size.
pub fn compile_decode(dtype: DType, arch: &str) -> Result<usize> {
    compile_decode_kernel(DecodeKernel::V1, dtype, arch)
}

/// Compile a decode module for `arch` without a GPU, failing on any warning or a missing entry
/// point; returns the PTX size.
pub fn compile_decode_kernel(kernel: DecodeKernel, dtype: DType, arch: &str) -> Result<usize> {
    let name = format!("decode_{}_{}", kernel.name(), dtype.name());
    let c = compile::compile_source(&name, &decode_source_of(kernel, dtype), arch)?;
    compile::check_clean(&name, arch, &c, kernel.entry())?;
    compile::check_clean(&name, arch, &c, "hm_decode_combine_v1")?;
    compile::check_clean(&name, arch, &c, "hm_decode_collapse_v1")?;
    Ok(c.ptx.len())
}

/// A KV cache in CUDA memory: keys and values `[B, capacity, Hk, d]` in the cache dtype and the
/// absolute length of each sequence as `u32 [B]`; copies run on the backend's stream.
pub struct CudaKv {
    ordinal: usize,
    stream: Arc<CudaStream>,
    shape: CacheShape,
    k: CudaSlice<u8>,
    v: CudaSlice<u8>,
    lens: CudaSlice<u32>,
    traffic: TrafficCounter,
}

impl CudaKv {
    pub(super) fn new(backend: &CudaBackend, shape: &CacheShape) -> Result<CudaKv> {
        shape.check()?;
        let bytes = usize::try_from(shape.elements() * shape.dtype.size() as u128).map_err(|_| Error::TooLarge {
            what: "KV cache bytes",
            elements: shape.bytes(),
            max: usize::MAX as u128,
        })?;
        let s = backend.stream();
        let k = s.alloc_zeros::<u8>(bytes).map_err(drv("allocating the KV cache keys"))?;
        let v = s.alloc_zeros::<u8>(bytes).map_err(drv("allocating the KV cache values"))?;
        let lens = s.alloc_zeros::<u32>(shape.batch).map_err(drv("allocating the KV cache lengths"))?;
        Ok(CudaKv {
            ordinal: backend.ordinal,
            stream: s.clone(),
            shape: *shape,
            k,
            v,
            lens,
            traffic: TrafficCounter::default(),
        })
    }

    /// The key buffer `[B, capacity, Hk, d]` (bytes).
    pub fn keys(&self) -> &CudaSlice<u8> {
        &self.k
    }

    /// The value buffer `[B, capacity, Hk, d]` (bytes).
    pub fn values(&self) -> &CudaSlice<u8> {
        &self.v
    }
}

impl DeviceKv for CudaKv {
    fn backend(&self) -> BackendKind {
        BackendKind::Cuda
    }

    fn write_rows(&mut self, b: usize, slot: usize, k: &Data, v: &Data, src_at: usize, rows: usize) -> Result<()> {
        let range = self.shape.rows_bytes(src_at, rows);
        let (at, len) = (self.shape.slot_offset(b, slot), range.len());
        let s = self.stream.clone();
        s.memcpy_htod(&k.bytes()[range.clone()], &mut self.k.slice_mut(at..at + len)).map_err(drv("appending keys"))?;
        s.memcpy_htod(&v.bytes()[range], &mut self.v.slice_mut(at..at + len)).map_err(drv("appending values"))?;
        self.traffic.upload(2 * len as u64);
        Ok(())
    }

    fn set_lens(&mut self, lens: &[usize]) -> Result<()> {
        let words: Vec<u32> = lens.iter().map(|&l| l as u32).collect();
        self.stream.clone().memcpy_htod(&words, &mut self.lens).map_err(drv("publishing the cache lengths"))
    }

    fn read_back(&self) -> Result<(Owned, Owned)> {
        let k = self.stream.clone_dtoh(&self.k).map_err(drv("reading the cache keys back"))?;
        let v = self.stream.clone_dtoh(&self.v).map_err(drv("reading the cache values back"))?;
        self.stream.synchronize().map_err(drv("reading the cache back"))?;
        self.traffic.download((k.len() + v.len()) as u64);
        Ok((owned_from_le_bytes(self.shape.dtype, &k), owned_from_le_bytes(self.shape.dtype, &v)))
    }

    fn traffic(&self) -> HostTraffic {
        self.traffic.get()
    }

    fn as_any(&self) -> &dyn Any {
        self
    }

    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

/// The decode, combine and merge-and-collapse kernels of one (device, dtype).
struct DecodeFns {
    decode: CudaFunction,
    combine: CudaFunction,
    collapse: CudaFunction,
}

type DecodeKey = (usize, DecodeKernel, DType);

fn decode_modules() -> &'static Mutex<HashMap<DecodeKey, Arc<DecodeFns>>> {
    static M: OnceLock<Mutex<HashMap<DecodeKey, Arc<DecodeFns>>>> = OnceLock::new();
    M.get_or_init(Default::default)
}

/// The launch plan of one decode call (sizes only; for benchmarks and the B = 8 × 128k check).
#[derive(Clone, Debug, PartialEq)]
pub struct DecodeLaunch {
    /// The decode kernel the plan is for.
    pub kernel: DecodeKernel,
    /// The decode-only kernel arguments.
    pub args: DecodeArgs,
    /// Grid of the decode kernel: (splits, B).
    pub grid: (u32, u32),
    /// Dynamic shared memory of the decode kernel, bytes.
    pub smem: usize,
    /// Cache bytes the decode kernel reads (every held token of each visible band, keys and
    /// values, once): counted, not measured.
    pub cache_bytes_read: u64,
}

impl PartialEq for DecodeArgs {
    fn eq(&self, o: &Self) -> bool {
        (self.capacity, self.splits, self.tokens_per_split, self.tile_tokens, self.rope_levels, self.selection)
            == (o.capacity, o.splits, o.tokens_per_split, o.tile_tokens, o.rope_levels, o.selection)
    }
}

/// Plan a validated decode problem on a cache of `shape` holding `lens` for `decode_v1`, on a
/// device with `max_smem` bytes of shared memory per block and `sms` multiprocessors.
pub fn plan_decode(
    problem: &DecodeProblem,
    w: &Weights,
    shape: &CacheShape,
    lens: &[usize],
    max_smem: usize,
    sms: usize,
) -> Result<DecodeLaunch> {
    plan_decode_kernel(DecodeKernel::V1, problem, w, shape, lens, max_smem, sms)
}

/// Shared memory of `decode_v1` with tiles of `tc` cached tokens.
fn smem_v1(problem: &DecodeProblem, tc: usize) -> usize {
    let c = &problem.cfg;
    let (d, p, hk, np) = (c.head_dim, c.pseudo, c.kv_heads, problem.n * c.pseudo);
    let rows = c.heads * np;
    4 * (2 * rows * d + 2 * tc * hk * d + 2 * tc * p * d + np * tc * p + 2 * rows + np)
}

/// Shared memory of `decode_v2` with tiles of `tc` cached tokens: `d2_layout` of decode_v2.cu.
pub fn smem_v2(problem: &DecodeProblem, tc: usize) -> usize {
    let c = &problem.cfg;
    let (d, p, hk) = (c.head_dim, c.pseudo, c.kv_heads);
    let rows = c.heads * problem.n * p;
    let rope = c.rope.is_some();
    let pq = if matches!(c.rope.map(|r| r.mode), Some(PosMode::Virtual)) { p } else { 1 };
    let (pitch, kc) = (d + 8, tc * hk);
    let (rqp, rp, wp) = ((rows * pq).next_multiple_of(16), rows.next_multiple_of(16), kc + 8);
    let q = rqp * pitch * 2 * if rope { 2 } else { 1 };
    let kv = 4 * kc * pitch * 2 + if rope { kc * pitch * 2 } else { 0 };
    let s = rqp * kc * 4 + 2 * rp * wp * 2 + rp * d * 4;
    q + kv + s + (rows * tc * p * 4).next_multiple_of(16) + (3 * rows * 4 + 4).next_multiple_of(16)
}

/// Plan a validated decode problem for `kernel` (see [`plan_decode`]); v2 refuses (a typed
/// `Unsupported` error) what it cannot run: f32, `d % 16 != 0`, positions from 2^31, or no tile
/// that fits shared memory.
pub fn plan_decode_kernel(
    kernel: DecodeKernel,
    problem: &DecodeProblem,
    w: &Weights,
    shape: &CacheShape,
    lens: &[usize],
    max_smem: usize,
    sms: usize,
) -> Result<DecodeLaunch> {
    let c = &problem.cfg;
    let (b, d, p, hk) = (problem.batch, c.head_dim, c.pseudo, c.kv_heads);
    let unsupported = |why: String| Error::Unsupported { backend: "cuda", why };
    if d > 256 {
        return Err(unsupported(format!("head dim {d} above 256 (decode)")));
    }
    let rows = c.heads * problem.n * p;
    let cap = shape.capacity;
    let max = crate::validate::MAX_INDEX as u128;
    for (what, x) in [
        ("capacity·P", cap as u128 * p as u128),
        ("B·H·N·P rows", (b * rows) as u128),
        ("capacity·Hk·d", shape.seq_elements()),
    ] {
        if x > max {
            return Err(unsupported(format!("{what} = {x} above 2^31 - 1")));
        }
    }
    if b > 65535 {
        return Err(unsupported(format!("batch {b} above 65535 (grid y)")));
    }
    let smem_of = |tc: usize| match kernel {
        DecodeKernel::V1 => smem_v1(problem, tc),
        DecodeKernel::V2 => smem_v2(problem, tc),
    };
    if kernel == DecodeKernel::V2 {
        if !kernel.dtypes().contains(&problem.dtype) {
            return Err(unsupported(format!("decode v2 runs f16/bf16, not {}", problem.dtype.name())));
        }
        if d % 16 != 0 {
            return Err(unsupported(format!("decode v2 needs a head dim that is a multiple of 16, not {d}")));
        }
        if max_position(c, lens, cap) >= i32::MAX as u64 {
            return Err(unsupported("decode v2: RoPE positions from 2^31".into()));
        }
    }
    // v2's tile of TC tokens is TC·Hk columns of the mma: a multiple of 16.
    let fits = |tc: usize| smem_of(tc) <= max_smem && (kernel == DecodeKernel::V1 || (tc * hk) % 16 == 0);
    let tc = [16usize, 8, 4, 2, 1].into_iter().find(|&tc| fits(tc)).ok_or_else(|| {
        unsupported(format!(
            "decode {} needs {} bytes of shared memory, the device allows {max_smem}",
            kernel.name(),
            smem_of(16usize.div_ceil(hk.min(16)).max(1))
        ))
    })?;
    let (_, widest) = bands(problem);
    // Enough blocks for two waves over the SMs, each split at least two tiles.
    let want = (2 * sms.max(1)).div_ceil(b).min(widest.div_ceil(2 * tc)).max(1);
    let (splits, tps) = split(widest, want);
    let row_bytes = hk * d * problem.dtype.size();
    let args = DecodeArgs {
        capacity: cap as i32,
        splits: splits as i32,
        tokens_per_split: tps as i32,
        tile_tokens: tc as i32,
        rope_levels: rope_levels(c, lens, cap) as i32,
        selection: selection_bits(c, w) as i32,
        vec16: (row_bytes % 16 == 0) as i32,
        ..DecodeArgs::default()
    };
    let cache_bytes_read = crate::decode::cache_bytes_read(problem);
    Ok(DecodeLaunch { kernel, args, grid: (splits as u32, b as u32), smem: smem_of(tc), cache_bytes_read })
}

impl CudaBackend {
    fn decode_fns(&self, kernel: DecodeKernel, dtype: DType) -> Result<Arc<DecodeFns>> {
        let key = (self.ordinal, kernel, dtype);
        if let Some(f) = decode_modules().lock().unwrap_or_else(|e| e.into_inner()).get(&key) {
            return Ok(f.clone());
        }
        let name = format!("decode_{}_{}", kernel.name(), dtype.name());
        let c = compile::compile_source(&name, &decode_source_of(kernel, dtype), &self.arch)?;
        let module = self
            .ctx
            .load_module(cudarc::nvrtc::Ptx::from_src(c.ptx.as_str()))
            .map_err(|e| dev_err(format!("loading {name}: {e}")))?;
        let decode = module.load_function(kernel.entry()).map_err(drv("cuModuleGetFunction"))?;
        let combine = module.load_function("hm_decode_combine_v1").map_err(drv("cuModuleGetFunction"))?;
        let collapse = module.load_function("hm_decode_collapse_v1").map_err(drv("cuModuleGetFunction"))?;
        decode
            .set_attribute(CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, self.max_smem as i32)
            .map_err(drv("cuFuncSetAttribute (dynamic shared memory)"))?;
        let fns = Arc::new(DecodeFns { decode, combine, collapse });
        decode_modules().lock().unwrap_or_else(|e| e.into_inner()).insert(key, fns.clone());
        Ok(fns)
    }

    /// Decode on a cache in this device's memory: the new queries and small tables uploaded, the
    /// kernels enqueued on the backend's stream, the output and lse read back. The cache is read
    /// in place.
    pub(super) fn decode_on_device(
        &self,
        problem: &DecodeProblem,
        w: &Weights,
        io: DecodeIo<'_>,
        kv: &CudaKv,
    ) -> Result<()> {
        self.decode_calls(problem, w, io, kv, 0).map(|_| ())
    }

    /// Device time (CUDA events) of `reps` decode calls of `n` new tokens on a cache of this
    /// device, after one warm-up call, with the plan's counted cache bytes read per call: what
    /// the decode benchmark reports.
    pub fn time_decode_device(
        &self,
        cfg: &crate::Config,
        w: &Weights,
        cache: &crate::cache::KvCache,
        n: usize,
        reps: usize,
    ) -> Result<crate::decode::DecodeTiming> {
        let kv = cache.device_storage().and_then(|d| d.as_any().downcast_ref::<CudaKv>()).ok_or_else(|| {
            Error::Cache { why: format!("the cache lives on the {} device, not CUDA", cache.location()) }
        })?;
        let (q, qs, mut out, os) = crate::decode::timing_io(cfg, w, cache, n);
        let io = DecodeIo { q: q.tensor(&qs), cache, out: out.tensor_mut(&os), lse: None };
        let problem = crate::decode::validate_decode(cfg, w, &io)?;
        let (seconds, bytes) = self.decode_calls(&problem, w, io, kv, reps.max(1))?;
        Ok(crate::decode::DecodeTiming {
            timing: crate::Timing { seconds, extra_bytes: 0, clock: "cuda events" },
            cache_bytes_read: bytes,
        })
    }

    /// One decode call (`reps = 0`), or a warm-up and `reps` timed calls; returns the event
    /// times and the counted cache bytes read per call.
    fn decode_calls(
        &self,
        problem: &DecodeProblem,
        w: &Weights,
        io: DecodeIo<'_>,
        kv: &CudaKv,
        reps: usize,
    ) -> Result<(Vec<f64>, u64)> {
        if kv.ordinal != self.ordinal {
            return Err(Error::Cache { why: format!("the cache lives on CUDA device {}", kv.ordinal) });
        }
        let sms = self
            .ctx
            .attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .unwrap_or(1) as usize;
        let shape = io.cache.shape();
        // v2 where asked for and it can run the problem (sm_80+, see plan_decode_kernel), else v1.
        let (lens, smem) = (io.cache.lens(), self.max_smem);
        let mut plan = match DecodeKernel::from_env()? {
            DecodeKernel::V2 if self.cc >= (8, 0) => {
                match plan_decode_kernel(DecodeKernel::V2, problem, w, &shape, lens, smem, sms) {
                    Ok(plan) => plan,
                    Err(Error::Unsupported { .. }) => plan_decode(problem, w, &shape, lens, smem, sms)?,
                    Err(e) => return Err(e),
                }
            }
            _ => plan_decode(problem, w, &shape, lens, smem, sms)?,
        };
        let mut seconds = Vec::with_capacity(reps);
        let fns = self.decode_fns(plan.kernel, problem.dtype)?;
        let s = self.stream();
        self.ctx.bind_to_thread().map_err(drv("binding the context"))?;
        let c = &problem.cfg;
        let dw = self.upload_weights(c, w, s)?;
        let q = s.clone_htod(io.q.data.bytes()).map_err(drv("copying q"))?;
        let mut out_t = io.out;
        let out_bytes = out_t.data.bytes_mut();
        // SAFETY: the combine (or the merge-and-collapse) writes every element of out and lse.
        let mut out = unsafe { s.alloc::<u8>(out_bytes.len()) }.map_err(drv("allocating out"))?;
        let mut lse = unsafe { s.alloc::<f32>(problem.lse_len()) }.map_err(drv("allocating lse"))?;
        let rows = problem.batch * c.heads * problem.n * c.pseudo;
        let part_len = plan.args.splits as usize * rows * (c.head_dim + 2);
        // SAFETY: every block writes all of its split's partials before the combine reads them.
        let mut part = unsafe { s.alloc::<f32>(part_len) }.map_err(drv("allocating the partials"))?;
        let tab = match c.rope {
            Some(r) => rope_table(plan.args.rope_levels as u32, c.head_dim, r.base as f64),
            None => vec![0.0],
        };
        let tab = s.clone_htod(&tab).map_err(drv("copying the RoPE table"))?;
        {
            let fwd = crate::validate::Problem {
                cfg: *c,
                batch: problem.batch,
                n: problem.n,
                m: shape.capacity,
                dtype: problem.dtype,
                collapse: problem.collapse,
                norm: problem.norm,
                checked: crate::validate::Checked(()), // sizes of a validated decode problem
            };
            let mut args = HmArgs::from_problem(&fwd, dw.norm_kind());
            let cap_p = (shape.capacity * c.pseudo).min(i32::MAX as usize) as i32;
            args.window_left = args.window_left.min(cap_p);
            args.window_right = args.window_right.min(cap_p);
            let (qp, _g1) = q.device_ptr(s);
            let (kp, _g2) = kv.k.device_ptr(s);
            let (vp, _g3) = kv.v.device_ptr(s);
            let (op, _g4) = out.device_ptr_mut(s);
            let (lp, _g5) = lse.device_ptr_mut(s);
            let (pp, _g6) = part.device_ptr_mut(s);
            let (tp, _g7) = tab.device_ptr(s);
            let (np, _g8) = kv.lens.device_ptr(s);
            let (wp, _g9) = dw.buf.device_ptr(s);
            let at = |slot: usize| wp + 4 * dw.offsets[slot] as u64;
            args.q = qp;
            args.k = kp;
            args.v = vp;
            args.out = op;
            args.lse = lp;
            args.has_lse = 1;
            args.aq = at(0);
            args.ak = at(1);
            args.av = at(2);
            args.r = if problem.collapse { at(3) } else { 0 };
            args.gamma = if problem.norm { at(4) } else { 0 };
            args.beta = if dw.norm_kind() == Some(headmix_reference::NormKind::Group) { at(5) } else { 0 };
            args.norm = super::args::norm_code(dw.norm_kind());
            plan.args.lens = np;
            plan.args.part = pp;
            plan.args.rope_tab = if c.rope.is_some() { tp } else { 0 };
            let dargs = plan.args;
            let event =
                || s.record_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT)).map_err(drv("event"));
            let decode_cfg = LaunchConfig {
                grid_dim: (plan.grid.0, plan.grid.1, 1),
                block_dim: (DECODE_THREADS as u32, 1, 1),
                shared_mem_bytes: plan.smem as u32,
            };
            // Without a collapse one warp per row; with one, one block per token.
            let (combine, combine_cfg, combine_name) = if problem.collapse {
                let cfg = LaunchConfig {
                    grid_dim: ((problem.batch * problem.n) as u32, 1, 1),
                    block_dim: (32 * COLLAPSE_WARPS as u32, 1, 1),
                    shared_mem_bytes: 0,
                };
                (&fns.collapse, cfg, "launching hm_decode_collapse_v1")
            } else {
                let cfg = LaunchConfig {
                    grid_dim: (rows.div_ceil(COMBINE_ROWS) as u32, 1, 1),
                    block_dim: (32 * COMBINE_ROWS as u32, 1, 1),
                    shared_mem_bytes: 0,
                };
                (&fns.combine, cfg, "launching hm_decode_combine_v1")
            };
            for rep in 0..=reps {
                let start = if reps > 0 { Some(event()?) } else { None };
                // SAFETY: the functions are loaded in this context; the structs match the kernels'
                // parameters (typed launches copy them at launch); every pointer in them is a live
                // allocation of the validated size, guarded until enqueued.
                unsafe {
                    s.launch_builder(&fns.decode).arg(&args).arg(&dargs).launch(decode_cfg).map_err(drv(
                        if plan.kernel == DecodeKernel::V2 {
                            "launching hm_decode_v2"
                        } else {
                            "launching hm_decode_v1"
                        },
                    ))?;
                    s.launch_builder(combine).arg(&args).arg(&dargs).launch(combine_cfg).map_err(drv(combine_name))?;
                }
                if let Some(start) = start {
                    let end = event()?;
                    end.synchronize().map_err(drv("running the decode kernels"))?;
                    if rep > 0 {
                        seconds.push(start.elapsed_ms(&end).map_err(drv("event time"))? as f64 * 1e-3);
                    }
                }
            }
        }
        s.memcpy_dtoh(&out, out_bytes).map_err(drv("copying out back"))?;
        let mut lse_host = vec![0f32; problem.lse_len()];
        s.memcpy_dtoh(&lse, &mut lse_host).map_err(drv("copying lse back"))?;
        s.synchronize().map_err(drv("running the decode kernels"))?;
        if let Some(l) = io.lse {
            l.copy_from_slice(&lse_host);
        }
        Ok((seconds, plan.cache_bytes_read))
    }

    /// Append `n` tokens to every sequence of a cache on this device from device tensors `k`, `v`
    /// `[B, n, Hk, d]` of the cache dtype's bytes (e.g. the prefill forward's inputs of
    /// [`CudaBackend::forward_device`]): copied device to device on the backend's stream. Sources
    /// in another context than the backend's are [`Error::ForeignBuffer`].
    pub fn append_device<S: DevicePtr<u8>>(
        &self,
        cache: &mut crate::cache::KvCache,
        k: &S,
        v: &S,
        n: usize,
    ) -> Result<()> {
        let shape = cache.shape();
        let row = shape.kv_heads * shape.head_dim * shape.dtype.size();
        for (what, len) in [("appended k (device)", k.len()), ("appended v (device)", v.len())] {
            if len != shape.batch * n * row {
                return Err(Error::Length { what, expected: shape.batch * n * row, got: len });
            }
        }
        // Sources of another context (another device, a non-primary context): ForeignBuffer.
        self.check_owner("appended k (device)", k.stream().context())?;
        self.check_owner("appended v (device)", v.stream().context())?;
        let ordinal =
            cache.device_storage().and_then(|d| d.as_any().downcast_ref::<CudaKv>()).map(|kv| kv.ordinal).ok_or_else(
                || Error::Cache { why: format!("the cache lives on the {} device, not CUDA", cache.location()) },
            )?;
        if ordinal != self.ordinal {
            return Err(Error::Cache { why: format!("the cache lives on CUDA device {ordinal}") });
        }
        let s = self.stream().clone();
        let seqs: Vec<usize> = (0..shape.batch).collect();
        let (kp, _gk) = k.device_ptr(&s);
        let (vp, _gv) = v.device_ptr(&s);
        cache.append_with(n, &seqs, |d, b, t, slot, rows| {
            let kv = d.as_any_mut().downcast_mut::<CudaKv>().expect("checked above");
            let (src, bytes, at) = (((b * n + t) * row) as u64, rows * row, kv.shape.slot_offset(b, slot));
            for (from, dst) in [(kp + src, &mut kv.k), (vp + src, &mut kv.v)] {
                let mut view = dst.slice_mut(at..at + bytes);
                let (dp, _g) = view.device_ptr_mut(&s);
                // SAFETY: both ranges are live device memory of this context, checked lengths,
                // and do not overlap (the cache owns its buffers).
                unsafe { cudarc::driver::result::memcpy_dtod_async(dp, from, bytes, s.cu_stream()) }
                    .map_err(drv("appending device to device"))?;
            }
            Ok(())
        })
    }
}
