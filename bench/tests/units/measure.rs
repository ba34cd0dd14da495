//! Tests of `bench/src/measure.rs`.

use headmix::decode::DecodeIo;
use headmix::timing::Owned;
use headmix::{BackendKind, DType, Method};
use headmix_bench::measure::*;
use headmix_bench::report::{FORWARD_N1, FUSED};
use headmix_bench::sweep::{Case, Mode, Scale, Sweep, issue_size_cases};

fn cpu() -> Device {
    let (mut devs, skipped) = open_all(&[BackendKind::Cpu]);
    assert!(skipped.is_empty());
    devs.remove(0)
}

fn small(method: Method, kv_heads: usize, pseudo: usize) -> Case {
    Case::decode(method, 4, kv_heads, pseudo, 16, 3, 96, DType::BF16)
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
    assert_eq!(dc.cache_read_bytes, (3 * 96 * 4 * 16 * 2 * 2) as f64);
    assert_eq!(r.bytes, (3 * 96 * 4 * 16 * 2 * 2 + 2 * 3 * 4 * 16 * 2) as f64);
    assert_eq!(dc.cache_bytes, 3 * 96 * 4 * 16 * 2 * 2);
    assert_eq!((dc.unfused_cache_bytes, dc.cache_ratio), (2 * dc.cache_bytes, 2.0));
    assert_eq!((dc.tokens, dc.layout.as_str()), (96, "linear"));
    // IHA local reads its ring only: W = 96 / 8 = 12 tokens and the new one.
    let r = &run(&cpu(), &small(Method::IhaLocal, 4, 2), 1).unwrap()[0];
    assert_eq!((r.m, r.decode.as_ref().unwrap().layout.as_str()), (13, "ring"));
    assert_eq!(r.decode.as_ref().unwrap().cache_read_bytes, (3 * 13 * 4 * 16 * 2 * 2) as f64);
}

/// The forward baseline does the same attention and reads the same bytes as the decode call;
/// run on the CPU here (devices run it in the sweep), it gives the same output.
#[test]
fn the_forward_n1_baseline_counts_and_computes_what_decode_does() {
    let dev = cpu();
    for case in [small(Method::Iha, 4, 2), small(Method::IhaLocal, 4, 2), small(Method::MeaCompressed, 1, 1)] {
        let twin = Case { mode: Mode::DecodeForward, ..case };
        let dec = &run(&dev, &case, 1).unwrap()[0];
        let fwd = &run(&dev, &twin, 1).unwrap()[0];
        assert_eq!(fwd.implementation, FORWARD_N1);
        assert_eq!((fwd.n, fwd.m, fwd.bytes, fwd.flops), (dec.n, dec.m, dec.bytes, dec.flops), "{}", case.label());
        assert_eq!(fwd.decode, dec.decode);
        assert!(fwd.extra_bytes.is_none() && fwd.pct_peak_bw.is_none());
        // Same attention: the forward of the held tokens' k/v with N = 1 equals the decode.
        let (cfg, w) = (case.config().unwrap(), case.weights().unwrap());
        let cache = filled_cache(&case, 9).unwrap();
        let (hq, held) = (cfg.q_heads, case.held().unwrap());
        let q = random_owned(case.dtype, 3 * hq * 16, 3);
        let (p, _) = twin.problem().unwrap();
        let out_len: usize = p.out_shape().iter().product();
        let mut dec_out = Owned::filled(case.dtype, out_len, f32::NAN);
        let io = DecodeIo {
            q: q.tensor(&[3, 1, hq, 16]),
            cache: &cache,
            out: dec_out.tensor_mut(&p.out_shape()),
            lse: None,
        };
        headmix::decode(dev.backend.as_ref(), &cfg, &w, io).unwrap();
        for b in 0..3 {
            let (k, v) = cache.sequence(b).unwrap();
            let qb = Owned::from_f32(case.dtype, &q.to_f32()[b * hq * 16..(b + 1) * hq * 16]);
            let mut shape = p.out_shape();
            shape[0] = 1;
            let mut out = Owned::filled(case.dtype, out_len / 3, f32::NAN);
            let kv = [1, held, case.kv_heads, 16];
            let io = headmix::Io {
                q: qb.tensor(&[1, 1, hq, 16]),
                k: k.tensor(&kv),
                v: v.tensor(&kv),
                out: out.tensor_mut(&shape),
                lse: None,
            };
            dev.backend.forward(&cfg, &w, io).unwrap();
            let want = &dec_out.to_f32()[b * out_len / 3..(b + 1) * out_len / 3];
            let err = out.to_f32().iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(err <= 0.02, "{} b={b}: max |forward - decode| = {err}", case.label());
        }
    }
}

#[test]
fn cases_beyond_the_cache_index_limit_are_refused_before_anything_is_allocated() {
    let big = Case { batch: 64, m: 131072, ..issue_size_cases()[0] };
    assert!(run(&cpu(), &Case { mode: Mode::DecodeForward, ..big }, 1).unwrap_err().contains("2^31 - 1"));
    assert!(run(&cpu(), &big, 1).unwrap_err().contains("KV cache"));
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
