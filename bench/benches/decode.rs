//! Criterion suite: KV-cache decode (one new token per sequence) of every configuration on every
//! backend present (`cargo bench -p headmix-bench --bench decode`; filter with `-- iha-local`).
//!
//! Cases are the `decode` sweep on GPUs (`HEADMIX_BENCH_SWEEP=quick` for `decode-quick`) and
//! `decode-quick` on the CPU backend and software wgpu adapters; `HEADMIX_BENCH_BACKENDS` as in
//! the forward suite. Caches are filled once per case outside the timed region; each iteration
//! batch is `timer::decode` (wall clock around `headmix::decode`). Throughput is elements = FLOPs
//! and bytes = the cache read + q read + out written, so `GB/s` is the table's cache bandwidth.

use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use headmix_bench::measure::{filled_cache, random_owned};
use headmix_bench::run::criterion_cases;
use headmix_bench::sweep::{Mode, NEW_TOKENS, Sweep};
use headmix_bench::{count, timer};

fn decode(c: &mut Criterion) {
    for (dev, cases) in criterion_cases(Sweep::Decode, Sweep::DecodeQuick) {
        let backend = dev.backend.as_ref();
        for case in cases.into_iter().filter(|c| c.mode == Mode::Decode) {
            // Fill the cache and time one call first: a case that is too large or that the backend
            // refuses is skipped with one line instead of aborting the whole suite.
            let prepared = case.config().and_then(|cfg| {
                let (w, cache) = (case.weights()?, filled_cache(&case, 1)?);
                let q = random_owned(case.dtype, case.batch * NEW_TOKENS * cfg.q_heads * cfg.head_dim, 7);
                let (caches, queries) = (vec![cache], vec![q]);
                timer::decode(backend, &cfg, &w, &caches, &queries, NEW_TOKENS, 1).map_err(|e| e.to_string())?;
                Ok((cfg, w, caches, queries))
            });
            let (cfg, w, caches, queries) = match prepared {
                Ok(x) => x,
                Err(why) => {
                    eprintln!("{} {}: skipped ({why})", dev.info.backend, case.label());
                    continue;
                }
            };
            let (p, _) =
                headmix_bench::sweep::Case { mode: Mode::DecodeForward, ..case }.problem().expect("checked above");
            let mut group = c.benchmark_group(format!("decode/{}/{}", dev.info.backend, case.method.name()));
            group.sample_size(10).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(2));
            group.throughput(Throughput::ElementsAndBytes {
                elements: p.flops() as u64,
                bytes: count::bytes(&p) as u64,
            });
            let id = case.label();
            group.bench_function(BenchmarkId::new("fused", &id), |b| {
                b.iter_custom(|iters| {
                    let t = timer::decode(backend, &cfg, &w, &caches, &queries, NEW_TOKENS, iters as usize)
                        .unwrap_or_else(|e| panic!("{id}: {e}"));
                    Duration::from_secs_f64(t.seconds.iter().sum())
                })
            });
            group.finish();
        }
    }
}

criterion_group!(benches, decode);
criterion_main!(benches);
