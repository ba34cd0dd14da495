//! Time one decode case on one backend into a report row: fill the caches (outside the timed
//! region), time [`headmix::decode()`] of one new token per sequence, count the cache read and the
//! cache size against the unfused design.

use headmix::cache::{KvCache, KvStorage};
use headmix::decode::{DecodeIo, DecodeProblem, validate_decode};
use headmix::timing::Owned;
use headmix::{BackendKind, DType, Problem, Rng, Timing};
use rayon::prelude::*;

use crate::decode::DecodeCase;
use crate::measure::{Device, FUSED, Work, timed_row};
use crate::report::{DecodeInfo, Row};
use crate::{count, timer};

/// New tokens per sequence in every decode case.
pub const NEW_TOKENS: usize = 1;

/// The `implementation` of the device baseline row: the same attention as a forward pass with
/// `N = 1` on device-resident keys and values, timed by the device's clock ([`run_forward_case`]).
pub const FORWARD_N1: &str = "headmix forward N=1";

/// Elements of one appended block of keys (and one of values) while filling: bounds the host
/// memory the fill needs beyond the cache itself.
const FILL_BLOCK_ELEMENTS: usize = 1 << 24;

/// `len` random values in a dtype, uniform in `[-√3, √3)` (unit variance, never a zero buffer),
/// generated in parallel blocks of a seeded SplitMix64 so large caches fill in seconds.
pub fn random_owned(dtype: DType, len: usize, seed: u64) -> Owned {
    fn fill<T: Copy + Default + Send>(len: usize, seed: u64, cast: impl Fn(f32) -> T + Sync) -> Vec<T> {
        const BLOCK: usize = 1 << 16;
        let mut v = vec![T::default(); len];
        v.par_chunks_mut(BLOCK).enumerate().for_each(|(i, block)| {
            let mut rng = Rng::new(seed ^ (i as u64).wrapping_mul(0xD1B5_4A32_D192_ED03));
            for x in block {
                *x = cast(((rng.uniform() - 0.5) * 2.0 * 3f64.sqrt()) as f32);
            }
        });
        v
    }
    match dtype {
        DType::F32 => Owned::F32(fill(len, seed, |x| x)),
        DType::F16 => Owned::F16(fill(len, seed, half::f16::from_f32)),
        DType::BF16 => Owned::BF16(fill(len, seed, half::bf16::from_f32)),
    }
}

/// An empty cache of the case filled with random stored heads: every held token of every
/// sequence, the new one included (decode reads a cache that already holds its new tokens).
/// A ring keeps only its last `W + 1` tokens whatever the sequence length and (without RoPE)
/// one decode does the same work at any absolute position, so it is filled with exactly those.
pub fn filled_cache(case: &DecodeCase, seed: u64) -> Result<KvCache, String> {
    // HOOK: when device-resident caches land (a `KvStorage` variant per device backend), create
    // the device's cache here so that a device decode reads device memory.
    let mut cache = case.empty_cache()?;
    let s = cache.shape();
    let row = s.kv_heads * s.head_dim;
    let held = case.held()?;
    let step = (FILL_BLOCK_ELEMENTS / (s.batch * row)).max(1);
    let mut block = 0u64;
    let mut at = 0;
    while at < held {
        let t = step.min(held - at);
        let shape = [s.batch, t, s.kv_heads, s.head_dim];
        let k = random_owned(s.dtype, s.batch * t * row, seed.wrapping_add(2 * block));
        let v = random_owned(s.dtype, s.batch * t * row, seed.wrapping_add(2 * block + 1));
        cache.append(&k.tensor(&shape), &v.tensor(&shape)).map_err(|e| e.to_string())?;
        at += t;
        block += 1;
    }
    Ok(cache)
}

/// Whether a cache lives in host memory (a device backend then reads it over the host link).
fn host_resident(cache: &KvCache) -> bool {
    matches!(cache.storage(), KvStorage::Host { .. })
}

/// The validated decode problem of a case on its filled cache (what `headmix::decode` checks).
pub fn problem(case: &DecodeCase, cache: &KvCache, q: &Owned) -> Result<DecodeProblem, String> {
    let cfg = case.config()?;
    let w = case.weights()?;
    let out_shape = if w.r.is_some() {
        vec![case.batch, NEW_TOKENS, cfg.heads, cfg.head_dim]
    } else {
        vec![case.batch, NEW_TOKENS, cfg.heads, cfg.pseudo, cfg.head_dim]
    };
    let mut out = Owned::filled(case.dtype, out_shape.iter().product(), f32::NAN);
    let io = DecodeIo {
        q: q.tensor(&[case.batch, NEW_TOKENS, cfg.q_heads, cfg.head_dim]),
        cache,
        out: out.tensor_mut(&out_shape),
        lse: None,
    };
    validate_decode(&cfg, &w, &io).map_err(|e| e.to_string())
}

/// Time one decode case: fill enough caches to rotate through ([`timer::cache_sets`]), random
/// new queries per cache, then `reps` timed calls of [`headmix::decode()`] after a warm-up.
pub fn run_case(dev: &Device, case: &DecodeCase, reps: usize) -> Result<Vec<Row>, String> {
    let backend = dev.backend.as_ref();
    let cfg = case.config()?;
    let w = case.weights()?;
    let first = filled_cache(case, 1)?;
    let sets = timer::cache_sets(first.bytes());
    let mut caches = vec![first];
    for s in 1..sets {
        caches.push(filled_cache(case, 1 + 1000 * s as u64)?);
    }
    let q_len = case.batch * NEW_TOKENS * cfg.q_heads * cfg.head_dim;
    let queries: Vec<Owned> = (0..sets).map(|s| random_owned(case.dtype, q_len, 7 + s as u64)).collect();
    let p = problem(case, &caches[0], &queries[0])?;
    let t = timer::time_decode(backend, &cfg, &w, &caches, &queries, NEW_TOKENS, reps).map_err(|e| e.to_string())?;
    let host_cache = host_resident(&caches[0]) && dev.kind() != BackendKind::Cpu;
    Ok(vec![row(dev, case, &p, &t, host_cache, FUSED)?])
}

/// The forward problem that does the same attention as a decode case: `B` sequences, `N = 1`
/// query token against the `M = held` tokens (bottom-right aligned, so the new token sees every
/// held key its window allows, exactly as in decode).
pub fn forward_problem(case: &DecodeCase) -> Result<Problem, String> {
    let cfg = case.config()?;
    let w = case.weights()?;
    Ok(Problem {
        cfg,
        batch: case.batch,
        n: NEW_TOKENS,
        m: case.held()?,
        dtype: case.dtype,
        collapse: w.r.is_some(),
        norm: w.gamma.is_some(),
    })
}

/// The device baseline of a decode case: its attention as a forward pass with `N = 1` on keys
/// and values already on the device, timed by the backend's own clock ([`timer::time`]). While
/// caches live in host memory this is the row whose `%bw` measures the device's cache read; it
/// reads the same bytes as the decode call.
pub fn run_forward_case(dev: &Device, case: &DecodeCase, reps: usize) -> Result<Vec<Row>, String> {
    let backend = dev.backend.as_ref();
    // Only the cases whose decode can build its cache (and a device run stays bounded).
    case.cache_elements()?;
    let fp = forward_problem(case)?;
    let w = case.weights()?;
    headmix::validate::validate_config(&fp.cfg).map_err(|e| e.to_string())?;
    backend.supports(&fp).map_err(|e| e.to_string())?;
    let t = timer::time(backend, &fp, &w, reps).map_err(|e| e.to_string())?;
    let p = DecodeProblem {
        cfg: fp.cfg,
        batch: fp.batch,
        n: fp.n,
        dtype: fp.dtype,
        collapse: fp.collapse,
        norm: fp.norm,
        stored: vec![fp.m; fp.batch],
        pos0: vec![0; fp.batch],
    };
    let mut r = row(dev, case, &p, &t, false, FORWARD_N1)?;
    r.extra_bytes = (dev.kind() != BackendKind::Cpu).then_some(t.extra_bytes);
    Ok(vec![r])
}

/// A decode row from its timing. On a device backend reading a host-resident cache the time
/// includes moving the cache to the device, so no percentage of the device's bandwidth is given.
pub fn row(
    dev: &Device,
    case: &DecodeCase,
    p: &DecodeProblem,
    t: &Timing,
    host_cache: bool,
    implementation: &str,
) -> Result<Row, String> {
    let peak = count::known_peak(&dev.info.device).filter(|_| !host_cache);
    let sizes = case.cache_bytes()?;
    let held = p.stored.iter().copied().max().unwrap_or(0);
    let work = Work {
        dtype: p.dtype,
        batch: p.batch,
        n: p.n,
        m: held,
        flops: count::decode_flops(p),
        bytes: count::decode_bytes(p),
    };
    let clock = if host_cache { "wall clock (host-resident cache)" } else { t.clock };
    let config = case.method.name();
    Ok(Row {
        decode: Some(DecodeInfo {
            tokens: case.tokens,
            layout: case.layout_name().into(),
            cache_read_bytes: count::decode_cache_bytes(p),
            cache_bytes: sizes.headmix as u64,
            unfused_cache_bytes: sizes.unfused as u64,
            cache_ratio: sizes.ratio(),
        }),
        ..timed_row(dev, config, implementation, &p.cfg, work, clock, t, peak)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::{DecodeSweep, issue_size_cases};
    use crate::measure::open_all;
    use crate::sweep::Scale;
    use headmix::Method;

    fn small(method: Method, kv_heads: usize, pseudo: usize) -> DecodeCase {
        DecodeCase { method, heads: 4, kv_heads, pseudo, head_dim: 16, batch: 3, tokens: 96, dtype: DType::BF16 }
    }

    #[test]
    fn filled_caches_hold_random_values_in_every_held_slot() {
        for case in [small(Method::Iha, 4, 2), small(Method::IhaLocal, 4, 2), small(Method::Gqa, 2, 1)] {
            let cache = filled_cache(&case, 5).unwrap();
            let held = case.held().unwrap();
            assert_eq!(cache.lens(), vec![held; 3].as_slice(), "{}", case.label());
            for b in 0..3 {
                let (k, v) = cache.sequence(b).unwrap();
                for x in [k.to_f32(), v.to_f32()] {
                    assert_eq!(x.len(), held * case.kv_heads * 16);
                    assert!(x.iter().all(|e| e.is_finite() && e.abs() <= 1.75), "{}", case.label());
                    assert!(x.iter().filter(|&&e| e == 0.0).count() < 2, "{}", case.label());
                }
            }
        }
        // Different seeds, different caches; large blocks are split into several appends.
        let a = random_owned(DType::F32, 1000, 1).to_f32();
        assert_ne!(a, random_owned(DType::F32, 1000, 2).to_f32());
        assert_eq!(a, random_owned(DType::F32, 1000, 1).to_f32());
    }

    #[test]
    fn a_cpu_decode_case_gives_a_row_with_its_cache_read_and_sizes() {
        let (devs, _) = open_all(&[BackendKind::Cpu]);
        let case = small(Method::Iha, 4, 2);
        let rows = run_case(&devs[0], &case, 2).unwrap();
        assert_eq!(rows.len(), 1);
        let r = &rows[0];
        assert_eq!((r.config.as_str(), r.backend.as_str(), r.n, r.m, r.batch), ("iha", "cpu", 1, 96, 3));
        assert_eq!(r.seconds.len(), 2);
        assert!(r.median_s > 0.0 && r.gb_s > 0.0 && r.pct_peak_bw.is_none() && r.clock == "wall clock");
        let dc = r.decode.as_ref().unwrap();
        // By hand: B·M·Hk·d·2·2 = 3·96·4·16·2·2 bytes read; q and the collapsed out 3·4·16·2 each.
        assert_eq!(dc.cache_read_bytes, (3 * 96 * 4 * 16 * 2 * 2) as f64);
        assert_eq!(r.bytes, (3 * 96 * 4 * 16 * 2 * 2 + 2 * 3 * 4 * 16 * 2) as f64);
        assert_eq!(dc.cache_bytes, 3 * 96 * 4 * 16 * 2 * 2);
        assert_eq!((dc.unfused_cache_bytes, dc.cache_ratio), (2 * dc.cache_bytes, 2.0));
        assert_eq!((dc.tokens, dc.layout.as_str()), (96, "linear"));
        // IHA local reads its ring only: W = 96 / 8 = 12 tokens and the new one.
        let r = &run_case(&devs[0], &small(Method::IhaLocal, 4, 2), 1).unwrap()[0];
        assert_eq!((r.m, r.decode.as_ref().unwrap().layout.as_str()), (13, "ring"));
        assert_eq!(r.decode.as_ref().unwrap().cache_read_bytes, (3 * 13 * 4 * 16 * 2 * 2) as f64);
    }

    /// The forward baseline does the same attention and reads the same bytes as the decode call;
    /// run on the CPU here (devices run it in the sweep), it gives the same output.
    #[test]
    fn the_forward_n1_baseline_counts_what_decode_counts() {
        let (devs, _) = open_all(&[BackendKind::Cpu]);
        for case in [small(Method::Iha, 4, 2), small(Method::IhaLocal, 4, 2), small(Method::MeaCompressed, 1, 1)] {
            let dec = &run_case(&devs[0], &case, 1).unwrap()[0];
            let fwd = &run_forward_case(&devs[0], &case, 1).unwrap()[0];
            assert_eq!(fwd.implementation, FORWARD_N1);
            assert_eq!((fwd.n, fwd.m, fwd.bytes, fwd.flops), (dec.n, dec.m, dec.bytes, dec.flops), "{}", case.label());
            assert_eq!(fwd.decode, dec.decode);
            assert!(fwd.extra_bytes.is_none() && fwd.pct_peak_bw.is_none());
            // Same attention: the forward of the held tokens' k/v with N = 1 equals the decode.
            let cfg = case.config().unwrap();
            let w = case.weights().unwrap();
            let cache = filled_cache(&case, 9).unwrap();
            let q = random_owned(case.dtype, case.batch * cfg.q_heads * cfg.head_dim, 3);
            let p = problem(&case, &cache, &q).unwrap();
            let out_len: usize = p.out_shape().iter().product();
            let mut dec_out = Owned::filled(case.dtype, out_len, f32::NAN);
            let io = DecodeIo {
                q: q.tensor(&[3, 1, cfg.q_heads, 16]),
                cache: &cache,
                out: dec_out.tensor_mut(&p.out_shape()),
                lse: None,
            };
            headmix::decode(devs[0].backend.as_ref(), &cfg, &w, io).unwrap();
            let held = case.held().unwrap();
            for b in 0..3 {
                let (k, v) = cache.sequence(b).unwrap();
                let qb = Owned::from_f32(case.dtype, &q.to_f32()[b * cfg.q_heads * 16..(b + 1) * cfg.q_heads * 16]);
                let mut shape = p.out_shape();
                shape[0] = 1;
                let mut out = Owned::filled(case.dtype, out_len / 3, f32::NAN);
                let kv = [1, held, case.kv_heads, 16];
                let io = headmix::Io {
                    q: qb.tensor(&[1, 1, cfg.q_heads, 16]),
                    k: k.tensor(&kv),
                    v: v.tensor(&kv),
                    out: out.tensor_mut(&shape),
                    lse: None,
                };
                devs[0].backend.forward(&cfg, &w, io).unwrap();
                let want = &dec_out.to_f32()[b * out_len / 3..(b + 1) * out_len / 3];
                let got = out.to_f32();
                let err = got.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
                assert!(err <= 0.02, "{} b={b}: max |forward - decode| = {err}", case.label());
            }
        }
    }

    #[test]
    fn cases_beyond_the_cache_index_limit_are_refused_before_anything_is_allocated() {
        let (devs, _) = open_all(&[BackendKind::Cpu]);
        let big = DecodeCase { batch: 64, tokens: 131072, ..issue_size_cases()[0] };
        assert!(run_forward_case(&devs[0], &big, 1).unwrap_err().contains("2^31 - 1"));
        assert!(run_case(&devs[0], &big, 1).unwrap_err().contains("KV cache"));
    }

    #[test]
    fn every_host_decode_quick_case_runs_on_the_cpu() {
        let (devs, _) = open_all(&[BackendKind::Cpu]);
        // The quick CPU sweep's configurations at its smallest size, one call each.
        let cases: Vec<DecodeCase> =
            DecodeSweep::Quick.cases(Scale::Host).into_iter().filter(|c| c.batch == 1 && c.tokens == 256).collect();
        assert_eq!(cases.len(), 8);
        for case in cases {
            let r = &run_case(&devs[0], &case, 1).unwrap()[0];
            let want = match case.method {
                Method::Iha | Method::IhaLocal => case.pseudo as f64,
                Method::Mea | Method::MeaCompressed => (case.heads / case.kv_heads) as f64,
                _ => 1.0,
            };
            assert_eq!(r.decode.as_ref().unwrap().cache_ratio, want, "{}", case.label());
            assert!(r.median_s.is_finite() && r.tflops > 0.0, "{}", case.label());
        }
        assert!(!issue_size_cases().is_empty());
    }
}
