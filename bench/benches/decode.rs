//! Criterion suite: KV-cache decode (one new token per sequence) of every configuration on every
//! backend present (`cargo bench -p headmix-bench --bench decode`; filter with `-- iha-local`,
//! shorten with `-- --quick`).
//!
//! Cases are the `decode` sweep of `headmix bench` on GPUs (`B = 1, 8, 64`, caches of 4k..128k
//! tokens, `H = 16`, `d = 128`, bf16) and the `decode-quick` CPU sweep on the CPU backend and on
//! software wgpu adapters. Environment:
//! * `HEADMIX_BENCH_SWEEP=quick|full`: the sweep of the GPU backends (`decode-quick` or `decode`;
//!   default `full`);
//! * `HEADMIX_BENCH_BACKENDS=cuda,wgpu,cpu`: the backends to try (default: all; one line per skip).
//!
//! The caches are filled once per case, outside the timed region, with random values; each
//! iteration batch is `headmix_bench::timer::time_decode` (wall clock around `headmix::decode`,
//! rotating through filled caches). Throughput is elements = FLOPs and bytes = the cache read
//! (`B·M·Hk·d·2·` dtype size) + q read + out written, so criterion's `GB/s` is the achieved
//! cache-read bandwidth of the table.

use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use headmix::BackendKind;
use headmix_bench::decode::DecodeSweep;
use headmix_bench::decode_measure::{NEW_TOKENS, filled_cache, problem, random_owned};
use headmix_bench::measure::{Device, open_all};
use headmix_bench::sweep::Scale;
use headmix_bench::{cli, count, timer};

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

fn decode(c: &mut Criterion) {
    let gpu_sweep = match std::env::var("HEADMIX_BENCH_SWEEP").as_deref() {
        Ok("quick") => DecodeSweep::Quick,
        Ok("full") | Err(_) => DecodeSweep::Full,
        Ok(s) => panic!("HEADMIX_BENCH_SWEEP: unknown sweep {s:?} (quick, full)"),
    };
    for dev in devices() {
        let backend = dev.backend.as_ref();
        let sweep = if dev.scale == Scale::Host { DecodeSweep::Quick } else { gpu_sweep };
        for case in sweep.cases(dev.scale) {
            // Fill the cache and time one call first: a case that is too large or that the
            // backend refuses is skipped with one line instead of aborting the whole suite.
            let prepared = case.config().and_then(|cfg| {
                let w = case.weights()?;
                let cache = filled_cache(&case, 1)?;
                let q = random_owned(case.dtype, case.batch * NEW_TOKENS * cfg.q_heads * cfg.head_dim, 7);
                let p = problem(&case, &cache, &q)?;
                let (caches, queries) = (vec![cache], vec![q]);
                timer::time_decode(backend, &cfg, &w, &caches, &queries, NEW_TOKENS, 1).map_err(|e| e.to_string())?;
                Ok((cfg, w, caches, queries, p))
            });
            let (cfg, w, caches, queries, p) = match prepared {
                Ok(x) => x,
                Err(why) => {
                    eprintln!("{} {}: skipped ({why})", dev.info.backend, case.label());
                    continue;
                }
            };
            let mut group = c.benchmark_group(format!("decode/{}/{}", dev.info.backend, case.method.name()));
            group.sample_size(10).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(2));
            group.throughput(Throughput::ElementsAndBytes {
                elements: count::decode_flops(&p) as u64,
                bytes: count::decode_bytes(&p) as u64,
            });
            let id = case.label();
            group.bench_function(BenchmarkId::new("fused", &id), |b| {
                b.iter_custom(|iters| {
                    let t = timer::time_decode(backend, &cfg, &w, &caches, &queries, NEW_TOKENS, iters as usize)
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
