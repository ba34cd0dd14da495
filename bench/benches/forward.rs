//! Criterion suite: the forward pass of every configuration on every backend present, fused and
//! unfused (`cargo bench -p headmix-bench`; filter with `-- iha-local`, shorten with `-- --quick`).
//!
//! Cases are the `full` sweep of `headmix bench` on GPUs and the `quick` CPU sweep on the CPU
//! backend and software wgpu adapters. `HEADMIX_BENCH_SWEEP=quick|full` picks the GPU sweep
//! (default `full`), `HEADMIX_BENCH_BACKENDS=cuda,wgpu,cpu` the backends (default: all). Each
//! iteration batch is timed by the bench's clock for the backend (`timer::forward`); throughput is
//! elements = FLOPs (criterion's `Gelem/s` reads GFLOP/s) and bytes = q, k, v read + out written.

use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use headmix::BackendKind;
use headmix_bench::run::criterion_cases;
use headmix_bench::sweep::Sweep;
use headmix_bench::{count, timer, unfused};

fn forward(c: &mut Criterion) {
    for (cases, dev) in criterion_cases(Sweep::Full, Sweep::Quick) {
        let backend = dev.backend.as_ref();
        for case in cases {
            // One timed call first: a case the backend refuses or fails is skipped with one line.
            let checked = case.problem().and_then(|(p, w)| {
                backend.supports(&p).and_then(|()| timer::forward(backend, &p, &w, 1)).map_err(|e| e.to_string())?;
                Ok((p, w))
            });
            let (p, w) = match checked {
                Ok(pw) => pw,
                Err(why) => {
                    eprintln!("{} {}: skipped ({why})", dev.info.backend, case.label());
                    continue;
                }
            };
            let mut group = c.benchmark_group(format!("forward/{}/{}", dev.info.backend, case.method.name()));
            group.sample_size(10).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(2));
            group.throughput(Throughput::ElementsAndBytes {
                elements: p.flops() as u64,
                bytes: count::bytes(&p) as u64,
            });
            let id = case.label();
            group.bench_function(BenchmarkId::new("fused", &id), |b| {
                b.iter_custom(|iters| {
                    let t = timer::forward(backend, &p, &w, iters as usize).unwrap_or_else(|e| panic!("{id}: {e}"));
                    Duration::from_secs_f64(t.seconds.iter().sum())
                })
            });
            if unfused::Stages::of(&p, &w).any() {
                // Mix and collapse run on the host: counted on the CPU backend only (on devices
                // this is the attention stage alone, a lower bound of the pipeline).
                let host_stages = dev.kind() == BackendKind::Cpu;
                let name = if host_stages { "unfused" } else { "unfused-attention-stage" };
                group.bench_function(BenchmarkId::new(name, &id), |b| {
                    b.iter_custom(|iters| {
                        let u = unfused::measure(backend, &p, &w, iters as usize, host_stages)
                            .unwrap_or_else(|e| panic!("{id}: {e}"));
                        Duration::from_secs_f64(u.stages.iter().map(|s| s.seconds.iter().sum::<f64>()).sum())
                    })
                });
            }
            group.finish();
        }
    }
}

criterion_group!(benches, forward);
criterion_main!(benches);
