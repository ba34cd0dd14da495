//! Time one case on one device into report rows: the fused call (forward or decode), the unfused
//! pipeline where the configuration mixes, and the device's extra baselines.

use headmix::cache::KvCache;
use headmix::decode::DecodeTiming;
use headmix::timing::Owned;
use headmix::{Backend, BackendKind, DType, Problem, Rng, Timing, cache_bytes};
use rayon::prelude::*;

use crate::count;
use crate::report::{BackendInfo, DecodeInfo, FUSED, Row, median};
use crate::sweep::{Case, Mode, NEW_TOKENS, Scale};
use crate::{timer, unfused};

/// An opened backend with the facts every row carries.
pub struct Device {
    pub backend: Box<dyn Backend>,
    pub info: BackendInfo,
    /// Which sizes it gets (software devices get the CPU's).
    pub scale: Scale,
    /// Other implementations timed beside the fused kernel on this device, by name: on wgpu the
    /// one-thread-per-virtual-query kernel (the bar the tiled kernel must clear by 10×), on CUDA
    /// the tensor-core kernel `attn_v2` beside the default. Each is an extra row.
    pub baselines: Vec<(&'static str, Box<dyn Backend>)>,
}

impl Device {
    pub fn new(backend: Box<dyn Backend>) -> Device {
        use headmix::backends::{cuda, wgpu};
        let describe = backend.describe();
        let driver =
            describe.iter().find(|(k, _)| k.eq_ignore_ascii_case("driver")).map_or("-".into(), |(_, v)| v.clone());
        let scale = Scale::of(backend.kind(), &backend.device_name(), &describe);
        let info =
            BackendInfo { backend: backend.kind().name().into(), device: backend.device_name(), driver, describe };
        let baseline: Option<(&'static str, Box<dyn Backend>)> = match backend.kind() {
            BackendKind::Wgpu => wgpu::WgpuBackend::new()
                .ok()
                .map(|b| ("wgpu naive", Box::new(b.with_variant(wgpu::Variant::Naive)) as _)),
            BackendKind::Cuda => cuda::CudaBackend::new(0)
                .ok()
                .map(|b| ("cuda attn_v2", Box::new(b.with_kernel(cuda::Kernel::AttnV2)) as _)),
            BackendKind::Cpu => None,
        };
        Device { backend, info, scale, baselines: baseline.into_iter().collect() }
    }

    pub fn kind(&self) -> BackendKind {
        self.backend.kind()
    }
}

/// Open each kind asked for: the devices that opened, and one line per kind that did not.
pub fn open_all(kinds: &[BackendKind]) -> (Vec<Device>, Vec<(BackendKind, String)>) {
    let (mut devices, mut skipped) = (Vec::new(), Vec::new());
    for &kind in kinds {
        match headmix::open(kind) {
            Ok(b) => devices.push(Device::new(b)),
            Err(e) => skipped.push((kind, e.to_string())),
        }
    }
    (devices, skipped)
}

/// Time one case on a device, `reps` calls after a warm-up.
pub fn run(dev: &Device, case: &Case, reps: usize) -> Result<Vec<Row>, String> {
    let backend = dev.backend.as_ref();
    let (e, (p, w)) = (|e: headmix::Error| e.to_string(), case.problem()?);
    if case.mode == Mode::Decode {
        // A filled cache on the backend's device, timed by the device's clock.
        let cache = filled_cache(backend, case, 1)?;
        let t = backend.time_decode(&p.cfg, &w, &cache, NEW_TOKENS, reps).map_err(e)?;
        return Ok(vec![decode_row(dev, case, &p, &t)]);
    }
    // The fused call, its unfused pipeline (mix and collapse timed on the CPU backend only, see
    // [`unfused`]), then the device's baselines.
    backend.supports(&p).map_err(e)?;
    let mut fused = row(dev, case, FUSED, &p, &timer::forward(backend, &p, &w, reps).map_err(e)?);
    if unfused::Stages::of(&p, &w).any() {
        let u = unfused::measure(backend, &p, &w, reps, dev.kind() == BackendKind::Cpu)?;
        fused.speedup_vs_unfused = Some(u.median_s / fused.median_s);
        fused.unfused = Some(u);
    }
    let mut rows = vec![fused];
    for (name, b) in &dev.baselines {
        match b.supports(&p).and_then(|()| b.time(&p, &w, reps)) {
            Ok(t) => rows.push(row(dev, case, name, &p, &t)),
            // A baseline that cannot take this case (e.g. the naive kernel on a large one) is left out.
            Err(headmix::Error::Unsupported { .. }) => {}
            Err(e) => return Err(format!("{name}: {e}")),
        }
    }
    Ok(rows)
}

/// A decode row: the cache bytes one call reads (counted by the backend), their bandwidth
/// against the H200's 4.3 TB/s copy and the counted roofline, and the cache sizes against the
/// unfused design.
fn decode_row(dev: &Device, case: &Case, p: &Problem, t: &DecodeTiming) -> Row {
    let mut r = row(dev, case, FUSED, p, &t.timing);
    let (sizes, read) = (cache_bytes(&p.cfg, case.batch, p.m, p.dtype), t.cache_bytes_read as f64);
    let copy = count::H200.tb_s * 1e12;
    r.decode = Some(DecodeInfo {
        tokens: case.m,
        layout: case.layout_name().into(),
        cache_read_bytes: read,
        cache_gb_s: Some(read / r.median_s / 1e9),
        pct_copy_bw: Some(100.0 * read / r.median_s / copy),
        roofline_s: Some(read / copy),
        cache_bytes: sizes.headmix as u64,
        unfused_cache_bytes: sizes.unfused as u64,
        cache_ratio: sizes.ratio(),
    });
    r
}

/// A row of a timed call: FLOPs and bytes of the problem, throughput from the median, and
/// percentages against the device's measured ceilings where known.
fn row(dev: &Device, case: &Case, implementation: &str, p: &Problem, t: &Timing) -> Row {
    let (c, median_s, (flops, bytes)) = (&p.cfg, median(&t.seconds), case.counts(p));
    let (tflops, gb_s) = (flops / median_s / 1e12, bytes / median_s / 1e9);
    let peak = count::known_peak(&dev.info.device);
    Row {
        config: case.method.name().into(),
        implementation: implementation.into(),
        backend: dev.info.backend.clone(),
        device: dev.info.device.clone(),
        driver: dev.info.driver.clone(),
        dtype: p.dtype.name().into(),
        batch: case.batch,
        n: p.n,
        m: p.m,
        heads: c.heads,
        q_heads: c.q_heads,
        kv_heads: c.kv_heads,
        pseudo: c.pseudo,
        head_dim: c.head_dim,
        causal: c.causal,
        window: c.window.map(|w| [w.left, w.right]),
        flops,
        bytes,
        clock: t.clock.into(),
        seconds: t.seconds.clone(),
        median_s,
        tflops,
        gb_s,
        pct_peak_flops: peak.map(|pk| 100.0 * tflops / pk.tflops),
        pct_peak_bw: peak.map(|pk| 100.0 * gb_s / (pk.tb_s * 1000.0)),
        // The CPU backend's host allocations are not tracked: no device memory to report.
        extra_bytes: (dev.kind() != BackendKind::Cpu).then_some(t.extra_bytes),
        unfused: None,
        speedup_vs_unfused: None,
        decode: None,
    }
}

/// `len` random values in a dtype, uniform in `[-√3, √3)` (unit variance, never a zero buffer),
/// generated in parallel blocks of a seeded generator so large caches fill in seconds.
pub fn random_owned(dtype: DType, len: usize, seed: u64) -> Owned {
    let mut v = vec![0f32; len];
    v.par_chunks_mut(1 << 16).enumerate().for_each(|(i, block)| {
        let mut rng = Rng::new(seed ^ (i as u64).wrapping_mul(0xD1B5_4A32_D192_ED03));
        block.iter_mut().for_each(|x| *x = ((rng.uniform() - 0.5) * 2.0 * 3f64.sqrt()) as f32);
    });
    if dtype == DType::F32 { Owned::F32(v) } else { Owned::from_f32(dtype, &v) }
}

/// The case's empty cache on `backend`'s device filled with random stored heads: every held
/// token of every sequence, the new one included (decode reads a cache that already holds its
/// new tokens). A ring is filled with exactly its `W + 1` tokens: without RoPE one decode does
/// the same work at any position. Appended in blocks of about 16 M elements (uploaded once) to
/// bound the host memory beyond the cache.
pub fn filled_cache(backend: &dyn Backend, case: &Case, seed: u64) -> Result<KvCache, String> {
    let mut cache = case.empty_cache(backend)?;
    let s = cache.shape();
    let row = s.kv_heads * s.head_dim;
    let (held, step) = (case.held()?, ((1 << 24) / (s.batch * row)).max(1));
    for (block, at) in (0..held).step_by(step).enumerate() {
        let (t, seed) = (step.min(held - at), seed.wrapping_add(2 * block as u64));
        let shape = [s.batch, t, s.kv_heads, s.head_dim];
        let [k, v] = [seed, seed + 1].map(|seed| random_owned(s.dtype, s.batch * t * row, seed));
        cache.append(&k.tensor(&shape), &v.tensor(&shape)).map_err(|e| e.to_string())?;
    }
    Ok(cache)
}
