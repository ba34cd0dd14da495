//! How one call is timed: by the backend's own clock, with input sets rotated where the bench owns
//! the inputs.
//!
//! Device backends time themselves ([`Backend::time`]: inputs already on the device, device clocks
//! such as CUDA events or wgpu timestamps). The GPU sweeps run `B·N = 16k` tokens at `H·d = 2048`,
//! 64 MiB per input tensor in bf16, more than an H100's 50 MB L2, so their caches cannot flatter them.
//! The CPU backend computes on host memory, so the bench times its `run` on the wall clock itself,
//! rotating through several input sets (about [`ROTATE_BYTES`] in all, twice this machine's L3) so
//! that the tiny CPU problems do not find their inputs in cache.

use std::time::Instant;

use headmix::cache::KvCache;
use headmix::decode::DecodeIo;
use headmix::timing::Owned;
use headmix::{Backend, BackendKind, Config, Problem, Result, Timing, Weights};

/// Bytes of input the rotated sets cover together.
pub const ROTATE_BYTES: usize = 64 << 20;
/// At most this many input sets.
pub const MAX_SETS: usize = 16;

/// How many input sets a problem is rotated through: enough to cover [`ROTATE_BYTES`], 2 to [`MAX_SETS`].
pub fn input_sets(problem: &Problem) -> usize {
    let c = &problem.cfg;
    let elements = problem.batch * (problem.n * c.q_heads + 2 * problem.m * c.kv_heads) * c.head_dim;
    ROTATE_BYTES.div_ceil(elements * problem.dtype.size()).clamp(2, MAX_SETS)
}

/// Time `reps` calls after warm-up: the CPU backend by [`time_rotated`], any other by its own
/// [`Backend::time`].
pub fn time(backend: &dyn Backend, problem: &Problem, w: &Weights, reps: usize) -> Result<Timing> {
    if backend.kind() == BackendKind::Cpu {
        time_rotated(backend, problem, w, reps, input_sets(problem))
    } else {
        backend.time(problem, w, reps)
    }
}

/// Wall-clock time of `reps` host calls of `backend.run`, call `i` on input set `i % sets` (random,
/// never zeros), after one untimed warm-up call.
pub fn time_rotated(backend: &dyn Backend, problem: &Problem, w: &Weights, reps: usize, sets: usize) -> Result<Timing> {
    headmix::timing::time_host_rotated(backend, problem, w, reps, 1000..1000 + sets.max(1) as u64)
}

/// How many filled caches a decode case rotates through: enough to cover [`ROTATE_BYTES`]
/// together, 1 to [`MAX_SETS`] (large caches are read once per call anyway).
pub fn cache_sets(cache_bytes: usize) -> usize {
    ROTATE_BYTES.div_ceil(cache_bytes.max(1)).clamp(1, MAX_SETS)
}

/// Wall-clock time of `reps` calls of [`headmix::decode()`] after one untimed warm-up call, call `i`
/// on cache `i % caches.len()` with queries `queries[i % queries.len()]` (`[B, N, Hq, d]`, `n`
/// new tokens per sequence). The caches are filled beforehand and never modified: decode only
/// reads them, so every call does the same work.
pub fn time_decode(
    backend: &dyn Backend,
    cfg: &Config,
    w: &Weights,
    caches: &[KvCache],
    queries: &[Owned],
    n: usize,
    reps: usize,
) -> Result<Timing> {
    let first = caches.first().ok_or(headmix::Error::Empty { what: "decode caches" })?;
    let batch = first.shape().batch;
    let qs = [batch, n, cfg.q_heads, cfg.head_dim];
    let out_shape = match w.r {
        Some(_) => vec![batch, n, cfg.heads, cfg.head_dim],
        None => vec![batch, n, cfg.heads, cfg.pseudo, cfg.head_dim],
    };
    let mut out = Owned::filled(first.dtype(), out_shape.iter().product(), f32::NAN);
    let mut lse = vec![f32::NAN; batch * cfg.heads * n * cfg.pseudo];
    let mut seconds = Vec::with_capacity(reps);
    for call in 0..=reps {
        let io = DecodeIo {
            q: queries[call % queries.len()].tensor(&qs),
            cache: &caches[call % caches.len()],
            out: out.tensor_mut(&out_shape),
            lse: Some(&mut lse),
        };
        let t = Instant::now();
        headmix::decode(backend, cfg, w, io)?;
        if call > 0 {
            seconds.push(t.elapsed().as_secs_f64());
        }
    }
    Ok(Timing { seconds, extra_bytes: 0, clock: "wall clock" })
}

#[cfg(test)]
mod tests {
    use super::*;
    use headmix::{Config, DType};

    #[test]
    fn small_problems_rotate_many_sets_large_ones_few() {
        let cfg = Config::iha(4, 2, 64);
        let small = Problem { cfg, batch: 1, n: 64, m: 64, dtype: DType::F32, collapse: true, norm: false };
        assert_eq!(input_sets(&small), MAX_SETS);
        let large = Problem { n: 1 << 16, m: 1 << 16, ..small };
        assert_eq!(input_sets(&large), 2);
    }

    #[test]
    fn rotated_timing_gives_one_positive_sample_per_rep() {
        let cpu = headmix::open(BackendKind::Cpu).unwrap();
        let cfg = Config::iha(2, 2, 8);
        let w = Weights::random(&cfg, 3);
        let p = Problem { cfg, batch: 1, n: 8, m: 8, dtype: DType::BF16, collapse: true, norm: false };
        let t = time(cpu.as_ref(), &p, &w, 5).unwrap();
        assert_eq!(t.seconds.len(), 5);
        assert!(t.seconds.iter().all(|&s| s > 0.0 && s.is_finite()));
        assert_eq!(t.clock, "wall clock");
    }
}
