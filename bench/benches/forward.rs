//! Criterion suite: the forward pass of every configuration on every backend present, fused and
//! unfused (`cargo bench -p headmix-bench`; filter with `-- iha-local`, shorten with `-- --quick`).
//!
//! Cases are the `full` sweep of `headmix bench` on GPUs (N = 1k..16k tokens, P = 1, 2, 4, 8,
//! d = 64 and 128, bf16 and f16) and the `quick` CPU sweep on the CPU backend (the reference, which
//! would take hours on GPU sizes) and on software wgpu adapters (llvmpipe). Environment:
//! * `HEADMIX_BENCH_SWEEP=quick|full`: the sweep of the GPU backends (default `full`);
//! * `HEADMIX_BENCH_BACKENDS=cuda,wgpu,cpu`: the backends to try (default: all; one line per skip).
//!
//! Each iteration batch is timed by the backend's own clock (`iter_custom` over
//! `headmix_bench::timer::time`: CUDA events / wgpu timestamps on devices; on the CPU the wall clock
//! with rotated input sets). Throughput is reported as elements = FLOPs (`4·B·H·d·` visible pairs),
//! so criterion's `Gelem/s` reads GFLOP/s, and bytes = q, k, v read + out written.

use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use headmix::BackendKind;
use headmix_bench::measure::{Device, open_all, problem};
use headmix_bench::sweep::{Scale, Sweep};
use headmix_bench::{cli, count, timer, unfused};

/// Seconds as a criterion duration.
fn total(seconds: &[f64]) -> Duration {
    Duration::from_secs_f64(seconds.iter().sum())
}

fn devices() -> Vec<Device> {
    let kinds = match std::env::var("HEADMIX_BENCH_BACKENDS") {
        Ok(s) => cli::parse_backends(&s).unwrap_or_else(|e| panic!("HEADMIX_BENCH_BACKENDS: {e}")),
        Err(_) => BackendKind::ALL.to_vec(),
    };
    let (devices, skipped) = open_all(&kinds);
    for (kind, why) in skipped {
        eprintln!("{kind}: skipped ({why})");
    }
    devices
}

fn forward(c: &mut Criterion) {
    let gpu_sweep = match std::env::var("HEADMIX_BENCH_SWEEP") {
        Ok(s) => Sweep::parse(&s).unwrap_or_else(|| panic!("HEADMIX_BENCH_SWEEP: unknown sweep {s:?}")),
        Err(_) => Sweep::Full,
    };
    for dev in devices() {
        let backend = dev.backend.as_ref();
        let sweep = if dev.scale == Scale::Host { Sweep::Quick } else { gpu_sweep };
        for case in sweep.cases(dev.scale) {
            // One timed call first: a case the backend refuses or fails is skipped with one line
            // instead of aborting the whole suite from inside criterion.
            let checked = problem(&case, backend)
                .and_then(|(p, w)| timer::time(backend, &p, &w, 1).map(|_| (p, w)).map_err(|e| e.to_string()));
            let (p, w) = match checked {
                Ok(pw) => pw,
                Err(why) => {
                    eprintln!("{} {}: skipped ({why})", dev.info.backend, case.label());
                    continue;
                }
            };
            let mut group = c.benchmark_group(format!("forward/{}/{}", dev.info.backend, case.method.name()));
            // Few samples of long calls: the large cases take tens of milliseconds each.
            group.sample_size(10).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(2));
            group.throughput(Throughput::ElementsAndBytes {
                elements: count::flops(&p) as u64,
                bytes: count::bytes(&p) as u64,
            });
            let id = case.label();
            group.bench_function(BenchmarkId::new("fused", &id), |b| {
                b.iter_custom(|iters| {
                    let t = timer::time(backend, &p, &w, iters as usize).unwrap_or_else(|e| panic!("{id}: {e}"));
                    total(&t.seconds)
                })
            });
            if unfused::Stages::of(&p, &w).any() {
                // The mix and collapse stages run on the host: counted on the CPU backend only
                // (on devices this is the attention stage alone, a lower bound of the pipeline).
                let host_stages = dev.kind() == BackendKind::Cpu;
                let name = if host_stages { "unfused" } else { "unfused-attention-stage" };
                group.bench_function(BenchmarkId::new(name, &id), |b| {
                    b.iter_custom(|iters| {
                        let stages = unfused::time(backend, &p, &w, iters as usize, host_stages)
                            .unwrap_or_else(|e| panic!("{id}: {e}"));
                        stages.iter().map(|s| total(&s.seconds)).sum()
                    })
                });
            }
            group.finish();
        }
    }
}

criterion_group!(benches, forward);
criterion_main!(benches);
