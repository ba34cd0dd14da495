//! Every invalid input gets a typed error naming the offending value, on every backend present,
//! and nothing is written to the outputs (they keep a sentinel) when a call is refused.

use headmix::timing::Owned;
use headmix::validate::MAX_INDEX;
use headmix::{Backend, BackendKind, Config, DType, Error, HeadNorm, Io, Weights};
use headmix_tests::cases::{Limits, specs};
use headmix_tests::check_property;

const SENTINEL: f32 = 7.25;

/// A forward call on host buffers, each piece adjustable before it is made.
#[derive(Clone)]
struct Call {
    cfg: Config,
    w: Weights,
    q_shape: Vec<usize>,
    kv_shape: Vec<usize>,
    v_shape: Vec<usize>,
    out_shape: Vec<usize>,
    q_len: usize,
    k_len: usize,
    v_len: usize,
    out_len: usize,
    lse_len: Option<usize>,
    dtypes: [DType; 4],
}

impl Call {
    /// A valid call: IHA with collapse, B=2, N=3, M=5.
    fn valid() -> Call {
        let cfg = Config::iha(4, 2, 8);
        Call::of(cfg, Weights::random(&cfg, 1), 2, 3, 5, DType::F32)
    }

    fn of(cfg: Config, w: Weights, b: usize, n: usize, m: usize, dt: DType) -> Call {
        let q_shape = vec![b, n, cfg.q_heads, cfg.head_dim];
        let kv_shape = vec![b, m, cfg.kv_heads, cfg.head_dim];
        let out_shape = if w.r.is_some() {
            vec![b, n, cfg.heads, cfg.head_dim]
        } else {
            vec![b, n, cfg.heads, cfg.pseudo, cfg.head_dim]
        };
        let prod = |s: &[usize]| s.iter().product::<usize>();
        Call {
            q_len: prod(&q_shape),
            k_len: prod(&kv_shape),
            v_len: prod(&kv_shape),
            out_len: prod(&out_shape),
            lse_len: Some(b * cfg.heads * n * cfg.pseudo),
            v_shape: kv_shape.clone(),
            q_shape,
            kv_shape,
            out_shape,
            cfg,
            w,
            dtypes: [dt; 4],
        }
    }

    /// Make the call; on error, check that neither output was touched, else that both were written.
    fn run(&self, backend: &dyn Backend) -> headmix::Result<()> {
        let fill = |dt: DType, len: usize, salt: f32| {
            Owned::from_f32(dt, &(0..len).map(|i| 0.5 + salt + (i % 7) as f32 * 0.125).collect::<Vec<_>>())
        };
        let q = fill(self.dtypes[0], self.q_len, 0.0);
        let k = fill(self.dtypes[1], self.k_len, 0.25);
        let v = fill(self.dtypes[2], self.v_len, -0.75);
        let mut out = Owned::filled(self.dtypes[3], self.out_len, SENTINEL);
        let mut lse = self.lse_len.map(|l| vec![SENTINEL; l]);
        let res = backend.forward(
            &self.cfg,
            &self.w,
            Io {
                q: q.tensor(&self.q_shape),
                k: k.tensor(&self.kv_shape),
                v: v.tensor(&self.v_shape),
                out: out.tensor_mut(&self.out_shape),
                lse: lse.as_deref_mut(),
            },
        );
        if res.is_err() {
            assert!(out.to_f32().iter().all(|&x| x == SENTINEL), "refused call wrote to out: {res:?}");
            assert!(lse.iter().flatten().all(|&x| x == SENTINEL), "refused call wrote to lse: {res:?}");
        } else {
            assert!(out.to_f32().iter().all(|&x| x != SENTINEL && x.is_finite()), "accepted call left out unwritten");
            assert!(lse.iter().flatten().all(|&x| x != SENTINEL), "accepted call left lse unwritten");
        }
        res
    }
}

/// The CPU backend and every device backend present (validation is shared, but each backend's
/// entry point must still refuse before writing).
/// Opened once for the whole binary.
fn backends() -> &'static [Box<dyn Backend>] {
    static ALL: std::sync::OnceLock<Vec<Box<dyn Backend>>> = std::sync::OnceLock::new();
    ALL.get_or_init(|| BackendKind::ALL.into_iter().filter_map(|k| headmix::open(k).ok()).collect())
}

fn expect_err(call: &Call, want: impl Fn(&Error) -> bool, what: &str) {
    for b in backends() {
        match call.run(b.as_ref()) {
            Ok(()) => panic!("{what}: {} accepted an invalid call", b.kind()),
            Err(e) => {
                assert!(want(&e), "{what}: {} gave the wrong error: {e:?}", b.kind());
                assert!(!e.to_string().is_empty());
            }
        }
    }
}

#[test]
fn the_valid_call_is_accepted_and_writes_everything() {
    for b in backends() {
        let call = Call::valid();
        call.run(b.as_ref()).unwrap_or_else(|e| panic!("{}: {e}", b.kind()));
    }
}

#[test]
fn shapes_that_disagree_with_the_config() {
    let mut c = Call::valid();
    c.q_shape[2] = 3;
    expect_err(&c, |e| matches!(e, Error::Shape { what: "q", got, .. } if got[2] == 3), "q heads");
    let mut c = Call::valid();
    c.kv_shape[3] = 6;
    c.v_shape[3] = 6;
    expect_err(&c, |e| matches!(e, Error::Shape { what: "k", .. }), "k head dim");
    let mut c = Call::valid();
    c.v_shape[1] = 4;
    expect_err(&c, |e| matches!(e, Error::Shape { what: "v", .. }), "v length differs from k");
    let mut c = Call::valid();
    c.q_shape = vec![2, 3, 32];
    expect_err(&c, |e| matches!(e, Error::Shape { got, .. } if got.len() == 3), "q of rank 3");
    let mut c = Call::valid();
    c.out_shape = vec![2, 3, 4, 2, 8]; // uncollapsed shape, but the weights carry r
    expect_err(&c, |e| matches!(e, Error::Shape { what: "out", .. }), "out shape");
}

#[test]
fn buffers_of_the_wrong_size() {
    let mut c = Call::valid();
    c.q_len -= 1;
    expect_err(&c, |e| matches!(e, Error::Length { what: "q", expected: 192, got: 191 }), "q buffer");
    let mut c = Call::valid();
    c.v_len += 8;
    expect_err(&c, |e| matches!(e, Error::Length { what: "v", .. }), "v buffer");
    let mut c = Call::valid();
    c.out_len += 1;
    expect_err(&c, |e| matches!(e, Error::Length { what: "out", .. }), "out buffer");
    let mut c = Call::valid();
    c.lse_len = Some(47);
    expect_err(&c, |e| matches!(e, Error::Length { what: "lse", expected: 48, got: 47 }), "lse buffer");
    let mut c = Call::valid();
    c.w.ak.pop();
    expect_err(&c, |e| matches!(e, Error::Length { what: "ak", .. }), "ak length");
    let mut c = Call::valid();
    c.w.r.as_mut().unwrap().push(0.5);
    expect_err(&c, |e| matches!(e, Error::Length { what: "r", .. }), "r length");
    let mut c = Call::valid();
    c.w.norm = Some(HeadNorm::Rms { gamma: vec![1.0; 31] });
    expect_err(&c, |e| matches!(e, Error::Length { what: "gamma", .. }), "gamma length");
    let mut c = Call::valid();
    c.w.norm = Some(HeadNorm::Group { gamma: vec![1.0; 32], beta: vec![0.5; 33] });
    expect_err(&c, |e| matches!(e, Error::Length { what: "beta", expected: 32, got: 33 }), "beta length");
}

#[test]
fn mixed_dtypes() {
    let mut c = Call::valid();
    c.dtypes[1] = DType::F16;
    expect_err(&c, |e| matches!(e, Error::DType { what: "k", expected: DType::F32, got: DType::F16 }), "k dtype");
    let mut c = Call::valid();
    c.dtypes[3] = DType::BF16;
    expect_err(&c, |e| matches!(e, Error::DType { what: "out", .. }), "out dtype");
}

#[test]
fn head_dims() {
    for d in [0usize, 7, 258] {
        let cfg = Config::mha(2, d);
        let c = Call::of(cfg, Weights::identity(&cfg), 1, 2, 2, DType::F32);
        expect_err(&c, |e| matches!(e, Error::HeadDim { d: got, .. } if *got == d), &format!("d = {d}"));
    }
}

#[test]
fn head_counts() {
    let mut cfg = Config::iha(4, 2, 8);
    cfg.pseudo = 0;
    let c = Call::of(cfg, Weights::identity(&Config::iha(4, 1, 8)), 1, 2, 2, DType::F32);
    expect_err(&c, |e| matches!(e, Error::ZeroPseudoHeads), "P = 0");
    assert!(matches!(Config::iha_local(4, 0, 8, 64), Err(Error::ZeroPseudoHeads)));
    let mut cfg = Config::mha(2, 8);
    cfg.heads = 0;
    let c = Call::of(cfg, Weights::identity(&Config::mha(2, 8)), 1, 2, 2, DType::F32);
    expect_err(&c, |e| matches!(e, Error::ZeroHeads { what: "heads" }), "H = 0");
    assert_eq!(Config::gqa(8, 3, 64), Err(Error::GqaHeads { heads: 8, kv_heads: 3 }));
    assert_eq!(Config::gqa(8, 0, 64), Err(Error::GqaHeads { heads: 8, kv_heads: 0 }));
    assert!(matches!(Config::mea_compressed(4, 5, 64), Err(Error::Heads { what: "kv_heads", value: 5, .. })));
    assert!(matches!(Config::mea_compressed(4, 0, 64), Err(Error::Heads { value: 0, .. })));
}

#[test]
fn lengths_and_empty_inputs() {
    let cfg = Config::mha(2, 8);
    let c = Call::of(cfg, Weights::identity(&cfg), 1, 6, 4, DType::F32);
    expect_err(&c, |e| matches!(e, Error::QueryLongerThanKeys { n: 6, m: 4 }), "N > M");
    let c = Call::of(cfg, Weights::identity(&cfg), 0, 2, 2, DType::F32);
    expect_err(&c, |e| matches!(e, Error::Empty { what: "batch" }), "B = 0");
    let c = Call::of(cfg, Weights::identity(&cfg), 1, 0, 2, DType::F32);
    expect_err(&c, |e| matches!(e, Error::Empty { .. }), "N = 0");
}

#[test]
fn sizes_beyond_32_bit_indexing() {
    // Shapes alone decide: the buffers are tiny, and TooLarge must come before any length check.
    let cfg = Config::iha(8, 8, 128);
    let mut c = Call::of(cfg, Weights::random(&cfg, 1), 1, 2, 2, DType::F32);
    c.kv_shape[1] = 1 << 20;
    c.v_shape[1] = 1 << 20;
    expect_err(&c, |e| matches!(e, Error::TooLarge { .. }), "B·M·H·P·d above i32::MAX");
}

#[test]
fn windows_beyond_indexing() {
    let cfg = Config::mha(2, 8).with_window(MAX_INDEX + 1, 0);
    let c = Call::of(cfg, Weights::identity(&cfg), 1, 2, 2, DType::F32);
    expect_err(&c, |e| matches!(e, Error::Window { left, .. } if *left == MAX_INDEX + 1), "left window");
    let cfg = Config::mha(2, 8).with_window(0, usize::MAX);
    let c = Call::of(cfg, Weights::identity(&cfg), 1, 2, 2, DType::F32);
    expect_err(&c, |e| matches!(e, Error::Window { right: usize::MAX, .. }), "right window");
    // The largest representable window is accepted.
    let cfg = Config::mha(2, 8).with_window(MAX_INDEX, MAX_INDEX);
    Call::of(cfg, Weights::identity(&cfg), 1, 2, 2, DType::F32).run(&headmix::backends::cpu::CpuBackend).unwrap();
}

#[test]
fn non_finite_weights() {
    let mut c = Call::valid();
    c.w.aq[5] = f32::NAN;
    expect_err(&c, |e| matches!(e, Error::NonFinite { what: "aq", index: 5, .. }), "NaN in aq");
    let mut c = Call::valid();
    c.w.av[0] = f32::INFINITY;
    expect_err(&c, |e| matches!(e, Error::NonFinite { what: "av", index: 0, .. }), "inf in av");
    let mut c = Call::valid();
    c.w.r.as_mut().unwrap()[3] = f32::NEG_INFINITY;
    expect_err(&c, |e| matches!(e, Error::NonFinite { what: "r", index: 3, .. }), "-inf in r");
    let mut c = Call::valid();
    let mut g = vec![1.0; 32];
    g[31] = f32::NAN;
    c.w.norm = Some(HeadNorm::Group { gamma: g, beta: vec![0.5; 32] });
    expect_err(&c, |e| matches!(e, Error::NonFinite { what: "gamma", index: 31, .. }), "NaN in gamma");
    let mut c = Call::valid();
    let mut b = vec![0.5; 32];
    b[7] = f32::INFINITY;
    c.w.norm = Some(HeadNorm::Group { gamma: vec![1.0; 32], beta: b });
    expect_err(&c, |e| matches!(e, Error::NonFinite { what: "beta", index: 7, .. }), "inf in beta");
}

#[test]
fn non_finite_or_out_of_range_config_numbers() {
    let base = Call::valid();
    let cases: Vec<(Config, &str)> = vec![
        (base.cfg.with_scale(f32::NAN), "scale"),
        (base.cfg.with_scale(0.0), "scale"),
        (base.cfg.with_scale(-1.0), "scale"),
        (base.cfg.with_scale(f32::INFINITY), "scale"),
        (base.cfg.with_norm_eps(0.0), "norm_eps"),
        (base.cfg.with_norm_eps(f32::NAN), "norm_eps"),
        (base.cfg.with_rope(headmix::Rope { base: f32::NAN, ..Default::default() }), "rope base"),
        (base.cfg.with_rope(headmix::Rope { base: 1.0, ..Default::default() }), "rope base"),
        (base.cfg.with_pos_offset(MAX_INDEX + 1), "pos_offset"),
    ];
    for (cfg, name) in cases {
        let c = Call { cfg, ..base.clone() };
        expect_err(&c, |e| matches!(e, Error::Config { what, .. } if *what == name), name);
    }
}

/// Random valid problems, each broken in one random way: always refused, outputs untouched.
#[test]
fn random_problems_with_one_defect_are_refused() {
    let strategy =
        (specs(Limits { dtypes: vec![DType::F32, DType::BF16], ..Limits::default() }), 0..8usize, 0..64usize);
    check_property("one defect", 64, strategy, |(spec, defect, at)| {
        let cfg = spec.config();
        let mut c = Call::of(cfg, spec.weights(), spec.batch, spec.n, spec.m, spec.dtype);
        let cpu = headmix::backends::cpu::CpuBackend;
        c.run(&cpu).unwrap_or_else(|e| panic!("valid {spec:?} refused: {e}"));
        match defect {
            0 => c.q_len += 1 + at % 3,
            1 => c.kv_shape[2] += 1,
            2 => {
                let i = at % c.w.ak.len();
                c.w.ak[i] = f32::NAN
            }
            3 => c.dtypes[2] = if spec.dtype == DType::F32 { DType::F16 } else { DType::F32 },
            4 => c.out_shape[1] += 1,
            5 => c.lse_len = Some(c.lse_len.unwrap() + 1),
            6 => c.q_shape[1] = spec.m + 1 + at % 3,
            _ => c.cfg.head_dim += 1,
        }
        assert!(c.run(&cpu).is_err(), "defect {defect} accepted: {spec:?}");
    });
}

/// Output shapes: `[B, N, H, d]` whenever `P = 1` (with or without a collapse; `[B, N, H, 1, d]`
/// is accepted too, with the same values), `[B, N, H, P, d]` for `P > 1` without a collapse, where
/// the 4-D shape is refused with a typed error before anything is written. Every backend present.
#[test]
fn output_shape_is_4d_whenever_p_is_1() {
    let identity = |h: usize| (0..h * h).map(|i| if i / h == i % h { 1.0 } else { 0.0 }).collect::<Vec<f32>>();
    let p1 = [Config::mha(2, 8), Config::gqa(4, 2, 8).unwrap(), Config::mea(2, 8), Config::iha(2, 1, 8)];
    for cfg in p1 {
        for collapse in [false, true] {
            let mut w = Weights::random(&cfg, 1);
            w.r = collapse.then(|| identity(cfg.heads));
            let mut c = Call::of(cfg, w, 2, 3, 5, DType::F32);
            c.out_shape = vec![2, 3, cfg.heads, cfg.head_dim];
            for b in backends() {
                c.run(b.as_ref()).unwrap_or_else(|e| panic!("{}: 4-D out for {cfg:?} refused: {e}", b.kind()));
            }
            if !collapse {
                c.out_shape = vec![2, 3, cfg.heads, 1, cfg.head_dim];
                for b in backends() {
                    c.run(b.as_ref()).unwrap_or_else(|e| panic!("{}: 5-D out for {cfg:?} refused: {e}", b.kind()));
                }
            }
        }
    }
    // P = 2 without a collapse: 5-D accepted, 4-D refused (its element count differs anyway, so
    // give the 4-D shape a buffer of the 5-D length: the shape alone must be refused).
    let cfg = Config::iha(2, 2, 8);
    let mut w = Weights::random(&cfg, 2);
    w.r = None;
    let mut c = Call::of(cfg, w, 2, 3, 5, DType::F32);
    assert_eq!(c.out_shape, vec![2, 3, 2, 2, 8]);
    for b in backends() {
        c.run(b.as_ref()).unwrap_or_else(|e| panic!("{}: 5-D out refused: {e}", b.kind()));
    }
    c.out_shape = vec![2, 3, 2, 8];
    expect_err(
        &c,
        |e| matches!(e, Error::Shape { what: "out", expected, .. } if expected.len() == 5),
        "4-D out, P = 2",
    );
    c.out_shape = vec![2, 3, 4, 8]; // H·P folded into one axis: still refused
    expect_err(&c, |e| matches!(e, Error::Shape { what: "out", .. }), "[B, N, H·P, d] out, P = 2");
}

/// Every named constructor defaults to causal (one documented convention), and IHA-local's window
/// arithmetic never overflows: a huge `P` or `N` gives `W = 1`; a window wider than the kernels'
/// index range saturates and is refused by validation with a typed error.
#[test]
fn named_configs_default_to_causal_and_window_arithmetic_is_checked() {
    let named = [
        Config::mha(2, 8),
        Config::gqa(4, 2, 8).unwrap(),
        Config::mea(2, 8),
        Config::mea_compressed(4, 2, 8).unwrap(),
        Config::iha(2, 2, 8),
        Config::iha_local(2, 2, 8, 64).unwrap(),
        Config::iha_window(2, 2, 8, 3),
    ];
    for cfg in named {
        assert!(cfg.causal, "{:?} is not causal by default", cfg.method);
    }
    assert_eq!(Config::iha_local_tokens(usize::MAX, usize::MAX).unwrap(), 1);
    assert_eq!(Config::iha_local_tokens(1 << 33, 1 << 40).unwrap(), 1);
    assert_eq!(Config::iha_local_tokens(4, 1000).unwrap(), 31);
    assert!(matches!(Config::iha_local_tokens(0, 10), Err(Error::ZeroPseudoHeads)));
    let huge = Config::iha_local(2, usize::MAX, 8, usize::MAX).unwrap();
    assert_eq!(huge.window.unwrap().left, usize::MAX - 1);
    let wide = Config::iha_window(4, 2, 8, usize::MAX);
    assert_eq!(wide.window.unwrap().left, usize::MAX - 1);
    let mut c = Call::valid();
    c.cfg = wide;
    expect_err(&c, |e| matches!(e, Error::Window { .. }), "window beyond the index range");
}

/// Device errors keep their cause behind `std::error::Error::source` (typed, downcastable), and
/// the message still names it; errors without a cause have none.
#[test]
fn device_errors_keep_their_cause() {
    let e = Error::device_caused("cuda", "launching attn_v1", std::io::Error::other("driver said no"));
    assert_eq!(e.to_string(), "cuda backend: launching attn_v1: driver said no");
    let cause = std::error::Error::source(&e).expect("the cause is the source");
    assert!(cause.is::<std::io::Error>(), "{cause:?}");
    assert_eq!(e.clone(), e);
    // Negative controls: no cause, no source.
    assert!(std::error::Error::source(&Error::device("cuda", "launching attn_v1")).is_none());
    assert!(std::error::Error::source(&Error::ZeroPseudoHeads).is_none());
    assert_ne!(Error::device("cuda", "launching attn_v1: driver said no"), e);
}
