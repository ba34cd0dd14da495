//! Tests of `bench/src/measure.rs`.

use headmix::{BackendKind, DType, Method};
use headmix_bench::measure::*;
use headmix_bench::report::FUSED;
use headmix_bench::sweep::{Case, Mode, Scale, Sweep};

fn cpu() -> Device {
    let (mut devs, skipped) = open_all(&[BackendKind::Cpu]);
    assert!(skipped.is_empty());
    devs.remove(0)
}

fn small(method: Method, kv_heads: usize, pseudo: usize) -> Case {
    Case { method, kv_heads, pseudo, ..Case::mha(Mode::Decode, 4, 16, 3, 96, DType::BF16) }
}

#[test]
fn a_cpu_case_gives_a_fused_row_with_its_unfused_pipeline() {
    let case = Case {
        mode: Mode::Forward,
        n: 16,
        m: 16,
        head_dim: 8,
        batch: 1,
        heads: 2,
        kv_heads: 2,
        dtype: DType::F32,
        ..small(Method::Iha, 2, 2)
    };
    let rows = run(&cpu(), &case, 2).unwrap();
    assert_eq!(rows.len(), 1);
    let r = &rows[0];
    assert_eq!((r.implementation.as_str(), r.backend.as_str(), r.config.as_str()), (FUSED, "cpu", "iha"));
    assert_eq!(r.seconds.len(), 2);
    // Causal over N·P = 32 virtual tokens: 32·33/2 pairs.
    assert_eq!(r.flops, 4.0 * 2.0 * 8.0 * (32.0 * 33.0 / 2.0));
    assert!(r.tflops > 0.0 && r.pct_peak_flops.is_none() && r.extra_bytes.is_none());
    let u = r.unfused.as_ref().unwrap();
    assert!(u.complete && u.stages.len() == 3 && r.speedup_vs_unfused.unwrap() > 0.0);
    // MHA has no unfused pipeline to compare with.
    let rows = run(&cpu(), &Case { method: Method::Mha, pseudo: 1, ..case }, 1).unwrap();
    assert!(rows[0].unfused.is_none() && rows[0].speedup_vs_unfused.is_none());
}

#[test]
fn filled_caches_hold_random_values_in_every_held_slot() {
    for case in [small(Method::Iha, 4, 2), small(Method::IhaLocal, 4, 2), small(Method::Gqa, 2, 1)] {
        let cache = filled_cache(cpu().backend.as_ref(), &case, 5).unwrap();
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
    let a = random_owned(DType::F32, 1000, 1).to_f32();
    assert_ne!(a, random_owned(DType::F32, 1000, 2).to_f32());
    assert_eq!(a, random_owned(DType::F32, 1000, 1).to_f32());
}

#[test]
fn a_cpu_decode_case_gives_a_row_with_its_cache_read_and_sizes() {
    let r = &run(&cpu(), &small(Method::Iha, 4, 2), 2).unwrap()[0];
    assert_eq!((r.config.as_str(), r.backend.as_str(), r.n, r.m, r.batch), ("iha", "cpu", 1, 96, 3));
    assert_eq!(r.seconds.len(), 2);
    assert!(r.median_s > 0.0 && r.gb_s > 0.0 && r.pct_peak_bw.is_none() && r.clock == "wall clock");
    let dc = r.decode.as_ref().unwrap();
    // By hand: B·M·Hk·d·2·2 = 3·96·4·16·2·2 bytes read; q and the collapsed out 3·4·16·2 each.
    let read = (3 * 96 * 4 * 16 * 2 * 2) as f64;
    assert_eq!(dc.cache_read_bytes, read);
    assert_eq!((dc.cache_gb_s, dc.roofline_s), (Some(read / r.median_s / 1e9), Some(read / 4.3e12)));
    assert_eq!(dc.pct_copy_bw, Some(100.0 * read / r.median_s / 4.3e12));
    assert_eq!(r.bytes, (3 * 96 * 4 * 16 * 2 * 2 + 2 * 3 * 4 * 16 * 2) as f64);
    assert_eq!(dc.cache_bytes, 3 * 96 * 4 * 16 * 2 * 2);
    assert_eq!((dc.unfused_cache_bytes, dc.cache_ratio), (2 * dc.cache_bytes, 2.0));
    assert_eq!((dc.tokens, dc.layout.as_str()), (96, "linear"));
    // IHA local reads its ring only: W = 96 / 8 = 12 tokens and the new one.
    let r = &run(&cpu(), &small(Method::IhaLocal, 4, 2), 1).unwrap()[0];
    assert_eq!((r.m, r.decode.as_ref().unwrap().layout.as_str()), (13, "ring"));
    assert_eq!(r.decode.as_ref().unwrap().cache_read_bytes, (3 * 13 * 4 * 16 * 2 * 2) as f64);
}

#[test]
fn every_host_decode_quick_case_runs_on_the_cpu() {
    let cases: Vec<Case> =
        Sweep::DecodeQuick.cases(Scale::Host).into_iter().filter(|c| c.batch == 1 && c.m == 256).collect();
    assert_eq!(cases.len(), 8);
    for case in cases {
        let r = &run(&cpu(), &case, 1).unwrap()[0];
        let want = match case.method {
            Method::Iha | Method::IhaLocal => case.pseudo as f64,
            Method::Mea | Method::MeaCompressed => (case.heads / case.kv_heads) as f64,
            _ => 1.0,
        };
        assert_eq!(r.decode.as_ref().unwrap().cache_ratio, want, "{}", case.label());
        assert!(r.median_s.is_finite() && r.tflops > 0.0, "{}", case.label());
    }
}

#[test]
fn a_sequence_beyond_the_kernel_index_limit_is_refused_before_anything_is_allocated() {
    // One sequence of 2^21 tokens · 16 heads · 128 = 2^32 elements: a typed error, not 16 GiB.
    let big = Case::mha(Mode::Decode, 16, 128, 1, 1 << 21, DType::BF16);
    let e = run(&cpu(), &big, 1).unwrap_err();
    assert!(e.contains("2147483647"), "{e}");
    let cpu = headmix::open(BackendKind::Cpu).unwrap();
    let e = big.empty_cache(cpu.as_ref()).unwrap_err();
    assert!(e.contains("KV cache capacity·Hk·d"), "{e}");
    // B = 64 at 128k tokens (2^34 elements per tensor in all) counts: 64-bit sequence bases.
    let b64 = Case::mha(Mode::Decode, 16, 128, 64, 1 << 17, DType::BF16);
    let (p, _) = b64.problem().unwrap();
    assert_eq!(b64.counts(&p).1, 64.0 * headmix_bench::count::bytes(&p));
}

/// On wgpu the cache is built on the device and the decode timed by the device's clock, with
/// the same counted cache bytes as on the CPU. Skips with one line without an adapter (a
/// failure under `HEADMIX_REQUIRE_WGPU=1`).
#[test]
fn a_wgpu_decode_case_reads_a_device_cache_by_the_device_clock() {
    let (devs, skipped) = open_all(&[BackendKind::Wgpu]);
    let Some(dev) = devs.first() else {
        assert!(std::env::var_os("HEADMIX_REQUIRE_WGPU").is_none(), "wgpu required: {skipped:?}");
        return eprintln!("skipped: no wgpu adapter ({skipped:?})");
    };
    for case in [small(Method::Iha, 4, 2), small(Method::IhaLocal, 4, 2), small(Method::Gqa, 2, 1)] {
        let cache = filled_cache(dev.backend.as_ref(), &case, 5).unwrap();
        assert_eq!(cache.location(), BackendKind::Wgpu, "{}", case.label());
        let r = &run(dev, &case, 2).unwrap()[0];
        assert!(r.clock == "wgpu timestamps" || r.clock == "wall clock (submit + wait)", "{}", r.clock);
        let on_cpu = &run(&cpu(), &case, 1).unwrap()[0];
        assert_eq!(r.decode.as_ref().unwrap().cache_read_bytes, on_cpu.decode.as_ref().unwrap().cache_read_bytes);
        assert!(r.decode.as_ref().unwrap().cache_gb_s.unwrap() > 0.0, "{}", case.label());
    }
}
