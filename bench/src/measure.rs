//! Time one case on one device into report rows: the fused call (forward or decode), the unfused
//! pipeline where the configuration mixes, and the device's extra baselines.

use headmix::cache::KvCache;
use headmix::timing::Owned;
use headmix::{Backend, BackendKind, DType, Problem, Rng, Timing, cache_bytes};
use rayon::prelude::*;

use crate::count;
use crate::report::{BackendInfo, DecodeInfo, FORWARD_N1, FUSED, Row, median};
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
        let mut baselines: Vec<(&'static str, Box<dyn Backend>)> = Vec::new();
        match backend.kind() {
            BackendKind::Wgpu => {
                if let Ok(b) = wgpu::WgpuBackend::new() {
                    baselines.push(("wgpu naive", Box::new(b.with_variant(wgpu::Variant::Naive))));
                }
            }
            BackendKind::Cuda => {
                if let Ok(b) = cuda::CudaBackend::new(0) {
                    baselines.push(("cuda attn_v2", Box::new(b.with_kernel(cuda::Kernel::AttnV2))));
                }
            }
            BackendKind::Cpu => {}
        }
        Device { backend, info, scale, baselines }
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
    let e = |e: headmix::Error| e.to_string();
    if case.mode != Mode::Forward {
        // Only the cases whose decode can build its cache (and a device run stays bounded).
        case.cache_fits()?;
    }
    // Decode cases are counted as their forward problem: N = 1 against the held tokens.
    let (p, w) = case.problem()?;
    match case.mode {
        Mode::Forward => {}
        Mode::Decode => {
            // Enough filled caches to rotate through, random new queries per cache, wall clock.
            let first = filled_cache(case, 1)?;
            let sets = timer::sets(first.bytes(), 1);
            let mut caches = vec![first];
            for s in 1..sets {
                caches.push(filled_cache(case, 1 + 1000 * s as u64)?);
            }
            let q_len = case.batch * NEW_TOKENS * p.cfg.q_heads * p.cfg.head_dim;
            let queries: Vec<Owned> = (0..sets).map(|s| random_owned(case.dtype, q_len, 7 + s as u64)).collect();
            let t = timer::decode(backend, &p.cfg, &w, &caches, &queries, NEW_TOKENS, reps).map_err(e)?;
            // While caches live in host memory a device decode also moves the cache to the device.
            return Ok(vec![decode_row(dev, case, FUSED, &p, &t, dev.kind() != BackendKind::Cpu)]);
        }
        Mode::DecodeForward => {
            backend.supports(&p).map_err(e)?;
            let t = timer::forward(backend, &p, &w, reps).map_err(e)?;
            return Ok(vec![decode_row(dev, case, FORWARD_N1, &p, &t, false)]);
        }
    }
    // The fused call, its unfused pipeline (mix and collapse timed on the CPU backend only, see
    // [`unfused`]), then the device's baselines.
    backend.supports(&p).map_err(e)?;
    let mut fused = row(dev, case, FUSED, &p, &timer::forward(backend, &p, &w, reps).map_err(e)?, true);
    if unfused::Stages::of(&p, &w).any() {
        let u = unfused::measure(backend, &p, &w, reps, dev.kind() == BackendKind::Cpu)?;
        fused.speedup_vs_unfused = Some(u.median_s / fused.median_s);
        fused.unfused = Some(u);
    }
    let mut rows = vec![fused];
    for (name, b) in &dev.baselines {
        match b.supports(&p).and_then(|()| b.time(&p, &w, reps)) {
            Ok(t) => rows.push(row(dev, case, name, &p, &t, true)),
            // A baseline that cannot take this case (e.g. the naive kernel on a large one) is left out.
            Err(headmix::Error::Unsupported { .. }) => {}
            Err(e) => return Err(format!("{name}: {e}")),
        }
    }
    Ok(rows)
}

/// A decode row: the cache read (the stored heads of the held tokens) and the cache sizes
/// against the unfused design. A device decode reading a host-resident cache gets no `%bw`.
fn decode_row(dev: &Device, case: &Case, implementation: &str, p: &Problem, t: &Timing, host_cache: bool) -> Row {
    let mut r = row(dev, case, implementation, p, t, !host_cache);
    if host_cache {
        r.clock = "wall clock (host-resident cache)".into();
    }
    if case.mode == Mode::Decode {
        r.extra_bytes = None; // not tracked by the wall-clock decode timer
    }
    let c = &p.cfg;
    let sizes = cache_bytes(&c, p.batch, p.m, p.dtype);
    r.decode = Some(DecodeInfo {
        tokens: case.m,
        layout: case.layout_name().into(),
        cache_read_bytes: (2 * p.batch * p.m * c.kv_heads * c.head_dim * p.dtype.size()) as f64,
        cache_bytes: sizes.headmix as u64,
        unfused_cache_bytes: sizes.unfused as u64,
        cache_ratio: sizes.ratio(),
    });
    r
}

/// A row of a timed call: FLOPs and bytes of the problem, throughput from the median, and
/// percentages against the device's measured ceilings where known (and `peak` allows).
fn row(dev: &Device, case: &Case, implementation: &str, p: &Problem, t: &Timing, peak: bool) -> Row {
    let (c, median_s, flops, bytes) = (&p.cfg, median(&t.seconds), p.flops(), count::bytes(p));
    let (tflops, gb_s) = (flops / median_s / 1e12, bytes / median_s / 1e9);
    let peak = count::known_peak(&dev.info.device).filter(|_| peak);
    Row {
        config: case.method.name().into(),
        implementation: implementation.into(),
        backend: dev.info.backend.clone(),
        device: dev.info.device.clone(),
        driver: dev.info.driver.clone(),
        dtype: p.dtype.name().into(),
        batch: p.batch,
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
    match dtype {
        DType::F32 => Owned::F32(v),
        _ => Owned::from_f32(dtype, &v),
    }
}

/// The case's empty cache filled with random stored heads: every held token of every sequence,
/// the new one included (decode reads a cache that already holds its new tokens). A ring is
/// filled with exactly its `W + 1` tokens: without RoPE one decode does the same work at any
/// position. Appended in blocks of about 16 M elements to bound the host memory beyond the cache.
pub fn filled_cache(case: &Case, seed: u64) -> Result<KvCache, String> {
    // HOOK: when device-resident caches land, create the device's cache here.
    let mut cache = case.empty_cache()?;
    let s = cache.shape();
    let row = s.kv_heads * s.head_dim;
    let (held, step) = (case.held()?, ((1 << 24) / (s.batch * row)).max(1));
    let mut at = 0;
    for block in 0u64.. {
        if at >= held {
            break;
        }
        let t = step.min(held - at);
        let shape = [s.batch, t, s.kv_heads, s.head_dim];
        let k = random_owned(s.dtype, s.batch * t * row, seed.wrapping_add(2 * block));
        let v = random_owned(s.dtype, s.batch * t * row, seed.wrapping_add(2 * block + 1));
        cache.append(&k.tensor(&shape), &v.tensor(&shape)).map_err(|e| e.to_string())?;
        at += t;
    }
    Ok(cache)
}
