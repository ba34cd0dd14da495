//! Tests of `bench/src/timer.rs`.

use headmix::{BackendKind, Config, DType, Problem, Weights};
use headmix_bench::timer::*;

#[test]
fn small_problems_rotate_many_sets_large_ones_few() {
    let small = Problem::new(&Config::iha(4, 2, 64), 1, 64, 64, DType::F32, true, false).unwrap();
    assert_eq!(input_sets(&small), MAX_SETS);
    let large = Problem::new(&small.cfg, 1, 1 << 16, 1 << 16, DType::F32, true, false).unwrap();
    assert_eq!(input_sets(&large), 2);
}

#[test]
fn rotated_timing_gives_one_positive_sample_per_rep() {
    let cpu = headmix::open(BackendKind::Cpu).unwrap();
    let cfg = Config::iha(2, 2, 8);
    let w = Weights::random(&cfg, 3);
    let p = Problem::new(&cfg, 1, 8, 8, DType::BF16, true, false).unwrap();
    let t = forward(cpu.as_ref(), &p, &w, 5).unwrap();
    assert_eq!((t.seconds.len(), t.clock), (5, "wall clock"));
    assert!(t.seconds.iter().all(|&s| s > 0.0 && s.is_finite()));
}
