//! Time one case on one backend (fused, unfused, and any extra baselines) into report rows.

use headmix::{Backend, BackendKind, Problem, Timing, Weights};

use crate::report::{BackendInfo, Row, StageResult, UnfusedResult};
use crate::stats::median;
use crate::sweep::{Case, Scale};
use crate::{count, timer, unfused};

/// What the fused rows' `implementation` says.
pub const FUSED: &str = "headmix fused";

/// An opened backend with the facts every row carries.
pub struct Device {
    pub backend: Box<dyn Backend>,
    pub info: BackendInfo,
    /// Which sizes it gets (software devices get the CPU's).
    pub scale: Scale,
    /// Other implementations timed beside the fused kernel on this device (see [`baselines`]).
    pub baselines: Vec<Box<dyn Baseline>>,
}

impl Device {
    pub fn new(backend: Box<dyn Backend>) -> Device {
        let describe = backend.describe();
        let driver = describe
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("driver"))
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| "-".into());
        let scale = Scale::of(backend.kind(), &backend.device_name(), &describe);
        let info =
            BackendInfo { backend: backend.kind().name().into(), device: backend.device_name(), driver, describe };
        let baselines = baselines(backend.kind());
        Device { backend, info, scale, baselines }
    }

    pub fn kind(&self) -> BackendKind {
        self.backend.kind()
    }
}

/// Open each kind asked for: the devices that opened, and one line per kind that did not.
pub fn open_all(kinds: &[BackendKind]) -> (Vec<Device>, Vec<(BackendKind, String)>) {
    let mut devices = Vec::new();
    let mut skipped = Vec::new();
    for &kind in kinds {
        match headmix::open(kind) {
            Ok(b) => devices.push(Device::new(b)),
            Err(e) => skipped.push((kind, e.to_string())),
        }
    }
    (devices, skipped)
}

/// Another implementation timed next to the fused kernel on the same device, reported as an extra
/// row whose `implementation` is its name (no unfused pipeline, no speed-up column).
pub trait Baseline {
    /// E.g. `wgpu naive`.
    fn name(&self) -> String;
    /// Time `reps` calls after warm-up, as [`Backend::time`] does.
    fn time(&self, problem: &Problem, w: &Weights, reps: usize) -> headmix::Result<Timing>;
}

/// A backend configured differently from its default, timed by its own clock.
struct Variant<B: Backend> {
    name: &'static str,
    backend: B,
}

impl<B: Backend> Baseline for Variant<B> {
    fn name(&self) -> String {
        self.name.into()
    }

    fn time(&self, problem: &Problem, w: &Weights, reps: usize) -> headmix::Result<Timing> {
        self.backend.supports(problem)?;
        self.backend.time(problem, w, reps)
    }
}

/// The extra baselines of a device kind, opened once: on wgpu the straightforward
/// one-thread-per-virtual-query kernel (the bar the tiled kernel must clear by 10×); on CUDA the
/// tensor-core kernel `attn_v2` beside the default `attn_v1` (until v2 is the default).
pub fn baselines(kind: BackendKind) -> Vec<Box<dyn Baseline>> {
    let mut out: Vec<Box<dyn Baseline>> = Vec::new();
    match kind {
        #[cfg(feature = "wgpu")]
        BackendKind::Wgpu => {
            use headmix::backends::wgpu;
            if let Ok(b) = wgpu::WgpuBackend::new() {
                out.push(Box::new(Variant { name: "wgpu naive", backend: b.with_variant(wgpu::Variant::Naive) }));
            }
        }
        #[cfg(feature = "cuda")]
        BackendKind::Cuda => {
            use headmix::backends::cuda;
            if let Ok(b) = cuda::CudaBackend::new(0) {
                out.push(Box::new(Variant { name: "cuda attn_v2", backend: b.with_kernel(cuda::Kernel::AttnV2) }));
            }
        }
        // The CPU, and a backend this build leaves out, have no extra baseline.
        _ => {}
    }
    out
}

/// The validated problem of a case (what `forward` would build from the tensors), after the
/// backend said it supports it.
pub fn problem(case: &Case, backend: &dyn Backend) -> Result<(Problem, Weights), String> {
    let cfg = case.config()?;
    let w = case.weights()?;
    headmix::validate::validate_config(&cfg).map_err(|e| e.to_string())?;
    headmix::validate::validate_weights(&cfg, &w).map_err(|e| e.to_string())?;
    if case.batch == 0 || case.n == 0 || case.n > case.m {
        return Err(format!("bad sizes B={} N={} M={}", case.batch, case.n, case.m));
    }
    let p = Problem {
        cfg,
        batch: case.batch,
        n: case.n,
        m: case.m,
        dtype: case.dtype,
        collapse: w.r.is_some(),
        norm: w.gamma.is_some(),
    };
    backend.supports(&p).map_err(|e| e.to_string())?;
    Ok((p, w))
}

/// Time one case: the fused call, the unfused pipeline where the configuration mixes (its mix and
/// collapse stages only on the CPU backend, see [`unfused`]), then the device's baselines.
pub fn run_case(dev: &Device, case: &Case, reps: usize) -> Result<Vec<Row>, String> {
    let backend = dev.backend.as_ref();
    let (p, w) = problem(case, backend)?;
    let t = timer::time(backend, &p, &w, reps).map_err(|e| e.to_string())?;
    let mut fused = row(dev, case, &p, FUSED, &t);
    if unfused::Stages::of(&p, &w).any() {
        let host_stages = dev.kind() == BackendKind::Cpu;
        let stages = unfused::time(backend, &p, &w, reps, host_stages)?;
        let stage_extra: u64 = stages.iter().map(|s| s.extra_bytes).sum();
        let stages: Vec<StageResult> = stages
            .into_iter()
            .map(|s| StageResult {
                name: s.name.into(),
                place: s.place,
                clock: s.clock,
                median_s: median(&s.seconds),
                seconds: s.seconds,
            })
            .collect();
        let total: f64 = stages.iter().map(|s| s.median_s).sum();
        fused.speedup_vs_unfused = Some(total / fused.median_s);
        fused.unfused = Some(UnfusedResult {
            complete: host_stages,
            median_s: total,
            extra_bytes: unfused::extra_bytes(&p, &w) + stage_extra,
            stages,
        });
    }
    let mut rows = vec![fused];
    for b in &dev.baselines {
        match b.time(&p, &w, reps) {
            Ok(t) => rows.push(row(dev, case, &p, &b.name(), &t)),
            // A baseline that cannot take this case (e.g. the naive kernel on a large one) is left out.
            Err(headmix::Error::Unsupported { .. }) => {}
            Err(e) => return Err(format!("{}: {e}", b.name())),
        }
    }
    Ok(rows)
}

/// A row for a case from its timing.
pub fn row(dev: &Device, case: &Case, p: &Problem, implementation: &str, t: &Timing) -> Row {
    let peak = count::known_peak(&dev.info.device);
    let work = Work { dtype: p.dtype, batch: p.batch, n: p.n, m: p.m, flops: count::flops(p), bytes: count::bytes(p) };
    let mut r = timed_row(dev, case.method.name(), implementation, &p.cfg, work, t.clock, t, peak);
    // The CPU backend's host allocations are not tracked: no device memory to report.
    r.extra_bytes = (dev.kind() != BackendKind::Cpu).then_some(t.extra_bytes);
    r
}

/// The sizes and work of a timed call, as a row reports them.
pub struct Work {
    pub dtype: headmix::DType,
    pub batch: usize,
    pub n: usize,
    pub m: usize,
    pub flops: f64,
    pub bytes: f64,
}

/// A row of a timed call (forward or decode): throughput from the median, percentages against
/// `peak` where one is known; no extra memory, unfused pipeline or decode facts (callers add them).
#[allow(clippy::too_many_arguments)]
pub fn timed_row(
    dev: &Device,
    config: &str,
    implementation: &str,
    c: &headmix::Config,
    work: Work,
    clock: &str,
    t: &Timing,
    peak: Option<count::Peak>,
) -> Row {
    let median_s = median(&t.seconds);
    let tflops = count::tflops(work.flops, median_s);
    let gb_s = count::gb_s(work.bytes, median_s);
    Row {
        config: config.into(),
        implementation: implementation.into(),
        backend: dev.info.backend.clone(),
        device: dev.info.device.clone(),
        driver: dev.info.driver.clone(),
        dtype: work.dtype.name().into(),
        batch: work.batch,
        n: work.n,
        m: work.m,
        heads: c.heads,
        q_heads: c.q_heads,
        kv_heads: c.kv_heads,
        pseudo: c.pseudo,
        head_dim: c.head_dim,
        causal: c.causal,
        window: c.window.map(|w| [w.left, w.right]),
        flops: work.flops,
        bytes: work.bytes,
        clock: clock.into(),
        seconds: t.seconds.clone(),
        median_s,
        tflops,
        gb_s,
        pct_peak_flops: count::pct_peak_flops(tflops, peak),
        pct_peak_bw: count::pct_peak_bw(gb_s, peak),
        extra_bytes: None,
        unfused: None,
        speedup_vs_unfused: None,
        decode: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use headmix::{DType, Method};

    #[test]
    fn a_cpu_case_gives_a_fused_row_with_its_unfused_pipeline() {
        let (devs, skipped) = open_all(&[BackendKind::Cpu]);
        assert!(skipped.is_empty());
        let case = Case {
            method: Method::Iha,
            heads: 2,
            kv_heads: 2,
            pseudo: 2,
            head_dim: 8,
            batch: 1,
            n: 16,
            m: 16,
            dtype: DType::F32,
        };
        let rows = run_case(&devs[0], &case, 2).unwrap();
        assert_eq!(rows.len(), 1);
        let r = &rows[0];
        assert_eq!((r.implementation.as_str(), r.backend.as_str(), r.config.as_str()), (FUSED, "cpu", "iha"));
        assert_eq!(r.seconds.len(), 2);
        // Causal over N·P = 32 virtual tokens: 32·33/2 pairs.
        assert_eq!(r.flops, 4.0 * 2.0 * 8.0 * (32.0 * 33.0 / 2.0));
        assert!(r.tflops > 0.0 && r.pct_peak_flops.is_none() && r.extra_bytes.is_none());
        let u = r.unfused.as_ref().unwrap();
        assert!(u.complete && u.stages.len() == 3);
        assert!(r.speedup_vs_unfused.unwrap() > 0.0);
        // MHA has no unfused pipeline to compare with.
        let mha = Case { method: Method::Mha, pseudo: 1, ..case };
        let rows = run_case(&devs[0], &mha, 1).unwrap();
        assert!(rows[0].unfused.is_none() && rows[0].speedup_vs_unfused.is_none());
    }
}
