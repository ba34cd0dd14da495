//! Criterion suite: KV-cache decode (one new token per sequence) of every configuration on every
//! backend present (`cargo bench -p headmix-bench --bench decode`; filter with `-- iha-local`).
//!
//! Cases are the `decode` sweep on GPUs (`HEADMIX_BENCH_SWEEP=quick` for `decode-quick`) and
//! `decode-quick` on the CPU backend and software wgpu adapters; `HEADMIX_BENCH_BACKENDS` as in
//! the forward suite. Caches are filled on the backend's device once per case outside the timed
//! region; each iteration batch is `Backend::time_decode` (the device clock; the wall clock on the
//! CPU). Throughput is elements = FLOPs and bytes = the counted cache read.

use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use headmix_bench::measure::filled_cache;
use headmix_bench::run::criterion_cases;
use headmix_bench::sweep::{NEW_TOKENS, Sweep};

fn decode(c: &mut Criterion) {
    for (cases, dev) in criterion_cases(Sweep::Decode, Sweep::DecodeQuick) {
        let backend = dev.backend.as_ref();
        for case in cases {
            // Fill the cache and time one call first: a case that is too large or that the backend
            // refuses is skipped with one line instead of aborting the whole suite.
            let prepared = case.problem().and_then(|(p, w)| {
                let cache = filled_cache(backend, &case, 1)?;
                let t = backend.time_decode(&p.cfg, &w, &cache, NEW_TOKENS, 1).map_err(|e| e.to_string())?;
                Ok((p, w, cache, t.cache_bytes_read))
            });
            let (p, w, cache, read) = match prepared {
                Ok(x) => x,
                Err(why) => {
                    eprintln!("{} {}: skipped ({why})", dev.info.backend, case.label());
                    continue;
                }
            };
            let mut group = c.benchmark_group(format!("decode/{}/{}", dev.info.backend, case.method.name()));
            group.sample_size(10).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(2));
            group.throughput(Throughput::ElementsAndBytes { elements: case.counts(&p).0 as u64, bytes: read });
            let id = case.label();
            group.bench_function(BenchmarkId::new("fused", &id), |b| {
                b.iter_custom(|iters| {
                    let t = backend
                        .time_decode(&p.cfg, &w, &cache, NEW_TOKENS, iters as usize)
                        .unwrap_or_else(|e| panic!("{id}: {e}"));
                    Duration::from_secs_f64(t.timing.seconds.iter().sum())
                })
            });
            group.finish();
        }
    }
}

criterion_group!(benches, decode);
criterion_main!(benches);
