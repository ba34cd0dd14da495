//! MEA KV-cache compression end to end: projections written to a safetensors file, compressed by
//! `headmix::compress` (what `headmix compress` runs), read back; full rank is exact, the error is
//! the dropped singular values' energy, exactly low-rank projections compress without loss, and
//! decoding with the compressed cache and mixing equals the f64 reference forward of the model
//! with the rebuilt full projections.

use std::path::PathBuf;

use headmix::backends::cpu::CpuBackend;
use headmix::cache::KvCache;
use headmix::compress::safetensors::{self, Dtype, SafeTensors, tensor::TensorView};
use headmix::compress::{CompressError, compress_file, compress_safetensors, fold_mixing, run_cli};
use headmix::decode::DecodeIo;
use headmix::reference::{self, HeadNorm, MixWeights, rel_err};
use headmix::{Config, DType, Io, Problem, Rng, Tensor, TensorMut, Weights, replication};
use headmix_tests::normals;

/// A fresh path in the temp dir, unique per test and process.
fn temp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("headmix-compress-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

/// Serialise f32 tensors `(name, shape, values)` to safetensors bytes.
fn file_bytes(tensors: &[(String, Vec<usize>, Vec<f32>)]) -> Vec<u8> {
    let bytes: Vec<Vec<u8>> =
        tensors.iter().map(|(_, _, v)| v.iter().flat_map(|x| x.to_le_bytes()).collect()).collect();
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .zip(&bytes)
        .map(|((n, s, _), b)| (n.clone(), TensorView::new(Dtype::F32, s.clone(), b).unwrap()))
        .collect();
    safetensors::serialize(views, None).unwrap()
}

/// Read one f32 tensor of a safetensors file: (shape, values).
fn read(st: &SafeTensors, name: &str) -> (Vec<usize>, Vec<f64>) {
    let t = st.tensor(name).unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_eq!(t.dtype(), Dtype::F32, "{name}");
    let v = t.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64).collect();
    (t.shape().to_vec(), v)
}

/// A linear layer's weight `[H·d, D]` as per-head matrices `[H, D, d]`: `W[h][i, t] = w[h·d + t, i]`.
fn per_head(lin: &[f64], h: usize, d: usize, dm: usize) -> Vec<f64> {
    let mut w = vec![0.0; h * dm * d];
    for hh in 0..h {
        for i in 0..dm {
            for t in 0..d {
                w[(hh * dm + i) * d + t] = lin[(hh * d + t) * dm + i];
            }
        }
    }
    w
}

/// `W[h] = Σ_c a[c, h] · C[c]` from components `[Hk, D·d]` and mixing `[Hk, H]`.
fn rebuild(components: &[f64], a: &[f64], h: usize) -> Vec<f64> {
    let hk = a.len() / h;
    let dd = components.len() / hk;
    let mut w = vec![0.0; h * dd];
    for hh in 0..h {
        for c in 0..hk {
            for j in 0..dd {
                w[hh * dd + j] += a[c * h + hh] * components[c * dd + j];
            }
        }
    }
    w
}

fn frob(x: &[f64]) -> f64 {
    x.iter().map(|v| v * v).sum::<f64>().sqrt()
}

/// A random linear weight `[H·d, D]`, or one of exact rank `rank` across heads (`H` heads mixed
/// from `rank` base heads).
fn projection(rng: &mut Rng, h: usize, d: usize, dm: usize, rank: Option<usize>) -> Vec<f64> {
    match rank {
        None => normals(rng, h * d * dm, 1.0),
        Some(r) => {
            let base = normals(rng, r * d * dm, 1.0); // r heads, [r·d, D]
            let mix = normals(rng, h * r, 1.0);
            let mut w = vec![0.0; h * d * dm];
            for hh in 0..h {
                for c in 0..r {
                    for j in 0..d * dm {
                        w[hh * d * dm + j] += mix[hh * r + c] * base[c * d * dm + j];
                    }
                }
            }
            w
        }
    }
}

struct Layer {
    k: Vec<f64>,
    v: Vec<f64>,
}

/// Write `layers.{i}.{k,v}_proj.weight` `[H·d, D]` and compress them to `hk` heads; returns the
/// output file's tensors.
fn compress_layers(
    name: &str,
    layers: &[Layer],
    h: usize,
    d: usize,
    dm: usize,
    hk: usize,
) -> (Vec<u8>, Vec<headmix::compress::LayerReport>) {
    let mut tensors = Vec::new();
    for (i, l) in layers.iter().enumerate() {
        for (which, w) in [("k", &l.k), ("v", &l.v)] {
            tensors.push((
                format!("model.layers.{i}.self_attn.{which}_proj.weight"),
                vec![h * d, dm],
                w.iter().map(|&x| x as f32).collect(),
            ));
        }
    }
    let (input, output) = (temp(&format!("{name}-in.safetensors")), temp(&format!("{name}-out.safetensors")));
    std::fs::write(&input, file_bytes(&tensors)).unwrap();
    let reports = compress_file(&input, &output, hk, Some(h)).unwrap();
    let bytes = std::fs::read(&output).unwrap();
    let _ = (std::fs::remove_file(&input), std::fs::remove_file(&output));
    (bytes, reports)
}

/// The projections as the compression saw them (rounded to f32, in f64).
fn f32_round(x: &[f64]) -> Vec<f64> {
    x.iter().map(|&v| v as f32 as f64).collect()
}

#[test]
fn full_rank_is_exact_and_truncation_error_is_the_dropped_energy() {
    let (h, d, dm) = (6, 4, 5);
    let mut rng = Rng::new(1);
    let layers: Vec<Layer> = (0..3)
        .map(|_| Layer { k: projection(&mut rng, h, d, dm, None), v: projection(&mut rng, h, d, dm, None) })
        .collect();
    for hk in [h, 4, 2, 1] {
        let (bytes, reports) = compress_layers(&format!("random-{hk}"), &layers, h, d, dm, hk);
        let st = SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(reports.len(), 3);
        for (i, (layer, rep)) in layers.iter().zip(&reports).enumerate() {
            assert_eq!(rep.prefix, format!("model.layers.{i}.self_attn"));
            assert_eq!((rep.heads, rep.rank), (h, hk));
            for (which, orig, rel, dropped) in
                [("k", &layer.k, rep.k_rel_error, &rep.k_dropped), ("v", &layer.v, rep.v_rel_error, &rep.v_dropped)]
            {
                let prefix = format!("model.layers.{i}.self_attn");
                let (cshape, comp) = read(&st, &format!("{prefix}.{which}_components"));
                let (ashape, a) = read(&st, &format!("{prefix}.a{which}"));
                assert_eq!(cshape, vec![hk * d, dm], "components keep the linear layout");
                assert_eq!(ashape, vec![hk, h, 1]);
                let orig = per_head(&f32_round(orig), h, d, dm);
                let rebuilt = rebuild(&per_head(&comp, hk, d, dm), &a, h);
                let err: Vec<f64> = orig.iter().zip(&rebuilt).map(|(x, y)| x - y).collect();
                let measured = frob(&err) / frob(&orig);
                // The report's error is the dropped singular values' share of the energy ...
                let dropped_energy = dropped.iter().map(|s| s * s).sum::<f64>().sqrt() / frob(&orig);
                assert!((rel - dropped_energy).abs() < 1e-9, "{which}: report {rel} vs dropped {dropped_energy}");
                assert_eq!(dropped.len(), h - hk);
                // ... and it is what the file's f32 weights really lose (to f32 rounding).
                assert!(
                    (measured - rel).abs() < 1e-5,
                    "layer {i} {which} rank {hk}: measured {measured:.3e}, report {rel:.3e}"
                );
                if hk == h {
                    assert_eq!(rel, 0.0);
                    assert!(measured < 1e-5, "full rank must be exact: {measured:.3e}");
                } else {
                    // Negative control: a random matrix truncated loses something real.
                    assert!(rel > 1e-3, "rank {hk} of a random matrix cannot be exact ({rel:.3e})");
                }
            }
        }
    }
}

#[test]
fn exactly_low_rank_projections_compress_without_loss() {
    let (h, d, dm, r) = (8, 4, 6, 3);
    let mut rng = Rng::new(2);
    let layers = vec![Layer { k: projection(&mut rng, h, d, dm, Some(r)), v: projection(&mut rng, h, d, dm, Some(r)) }];
    let (bytes, reports) = compress_layers("lowrank", &layers, h, d, dm, r);
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let rep = &reports[0];
    assert!(rep.k_rel_error < 1e-6 && rep.v_rel_error < 1e-6, "{rep}");
    for (which, orig) in [("k", &layers[0].k), ("v", &layers[0].v)] {
        let (_, comp) = read(&st, &format!("model.layers.0.self_attn.{which}_components"));
        let (_, a) = read(&st, &format!("model.layers.0.self_attn.a{which}"));
        let orig = per_head(&f32_round(orig), h, d, dm);
        let rebuilt = rebuild(&per_head(&comp, r, d, dm), &a, h);
        assert!(rel_err(&rebuilt, &orig) < 1e-5, "{which}: {:.3e}", rel_err(&rebuilt, &orig));
    }
    // One rank fewer loses a real share.
    let (_, reports) = compress_layers("lowrank-minus", &layers, h, d, dm, r - 1);
    assert!(reports[0].k_rel_error > 1e-2, "{}", reports[0]);
}

#[test]
fn per_head_layout_round_trips() {
    let (h, d, dm, hk) = (4, 2, 3, 2);
    let mut rng = Rng::new(3);
    let k: Vec<f32> = rng.normal_vec(h * dm * d, 1.0);
    let v: Vec<f32> = rng.normal_vec(h * dm * d, 1.0);
    let input =
        file_bytes(&[("blk.0.k_proj".into(), vec![h, dm, d], k.clone()), ("blk.0.v_proj".into(), vec![h, dm, d], v)]);
    let (bytes, reports) = compress_safetensors(&input, hk, None).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(reports[0].prefix, "blk.0");
    let (shape, comp) = read(&st, "blk.0.k_components");
    assert_eq!(shape, vec![hk, dm, d]);
    let (_, a) = read(&st, "blk.0.ak");
    let full = compress_safetensors(&input, h, None).unwrap().0;
    let st_full = SafeTensors::deserialize(&full).unwrap();
    let (_, comp_full) = read(&st_full, "blk.0.k_components");
    let (_, a_full) = read(&st_full, "blk.0.ak");
    let kf: Vec<f64> = k.iter().map(|&x| x as f64).collect();
    assert!(rel_err(&rebuild(&comp_full, &a_full, h), &kf) < 1e-6);
    let truncated = rel_err(&rebuild(&comp, &a, h), &kf);
    assert!((truncated - reports[0].k_rel_error).abs() < 1e-5);
}

#[test]
fn compress_errors_are_typed() {
    let (h, d, dm) = (4, 2, 3);
    let w = vec![0.5f32; h * d * dm];
    let good = |name: &str| (name.to_string(), vec![h * d, dm], w.clone());
    let input = file_bytes(&[good("l.0.k_proj.weight"), good("l.0.v_proj.weight")]);
    assert!(compress_safetensors(&input, 2, Some(h)).is_ok());
    // A linear layout needs the head count, and must divide by it.
    assert!(matches!(compress_safetensors(&input, 2, None), Err(CompressError::Tensor { .. })));
    assert!(matches!(compress_safetensors(&input, 2, Some(3)), Err(CompressError::Tensor { .. })));
    // Rank out of range.
    assert!(matches!(compress_safetensors(&input, 0, Some(h)), Err(CompressError::Rank { .. })));
    assert!(matches!(compress_safetensors(&input, h + 1, Some(h)), Err(CompressError::Rank { .. })));
    // A key projection without its value projection; no projections at all; not a file.
    let lone = file_bytes(&[good("l.0.k_proj.weight")]);
    assert!(matches!(compress_safetensors(&lone, 2, Some(h)), Err(CompressError::Tensor { .. })));
    let none = file_bytes(&[good("l.0.q_proj.weight")]);
    assert!(matches!(compress_safetensors(&none, 2, Some(h)), Err(CompressError::Format(_))));
    assert!(matches!(compress_safetensors(b"not a safetensors file", 2, Some(h)), Err(CompressError::Format(_))));
    // Non-finite values; a 1-D tensor.
    let mut nan = w.clone();
    nan[3] = f32::NAN;
    let bad = file_bytes(&[("l.0.k_proj.weight".into(), vec![h * d, dm], nan), good("l.0.v_proj.weight")]);
    assert!(matches!(compress_safetensors(&bad, 2, Some(h)), Err(CompressError::Tensor { .. })));
    let flat = file_bytes(&[
        ("l.0.k_proj".into(), vec![h * d * dm], w.clone()),
        ("l.0.v_proj".into(), vec![h * d * dm], w.clone()),
    ]);
    assert!(matches!(compress_safetensors(&flat, 2, Some(h)), Err(CompressError::Tensor { .. })));
    // Files and arguments.
    let missing = temp("does-not-exist.safetensors");
    assert!(matches!(compress_file(&missing, &temp("x.safetensors"), 2, Some(h)), Err(CompressError::Io { .. })));
    let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    assert!(matches!(run_cli(&args(&["--input", "a", "--output", "b"])), Err(CompressError::Usage(_))));
    assert!(matches!(run_cli(&args(&["--rank", "two"])), Err(CompressError::Usage(_))));
    assert!(matches!(run_cli(&args(&["--bogus"])), Err(CompressError::Usage(_))));
    assert!(run_cli(&args(&["--help"])).unwrap().contains("k_proj"));
}

#[test]
fn cli_compresses_a_file_and_reports_each_layer() {
    let (h, d, dm) = (4, 2, 3);
    let mut rng = Rng::new(4);
    let t = |name: &str, rng: &mut Rng| (name.to_string(), vec![h * d, dm], rng.normal_vec(h * d * dm, 1.0));
    let tensors = vec![
        t("layers.1.k_proj.weight", &mut rng),
        t("layers.1.v_proj.weight", &mut rng),
        t("layers.0.k_proj.weight", &mut rng),
        t("layers.0.v_proj.weight", &mut rng),
    ];
    let (input, output) = (temp("cli-in.safetensors"), temp("cli-out.safetensors"));
    std::fs::write(&input, file_bytes(&tensors)).unwrap();
    let args: Vec<String> =
        ["--input", input.to_str().unwrap(), "--output", output.to_str().unwrap(), "--rank", "2", "--heads", "4"]
            .iter()
            .map(|s| s.to_string())
            .collect();
    let text = run_cli(&args).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines[0].starts_with("layers.0: H = 4 -> Hk = 2: k rel err"), "{text}");
    assert!(lines[1].starts_with("layers.1:"), "{text}");
    assert!(lines[2].contains("wrote 2 layers"), "{text}");
    let bytes = std::fs::read(&output).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(st.names().len(), 8);
}

// ---------------------------------------------------------------------------------------------
// Decoding with the compressed weights equals the model with the rebuilt projections.

/// `x [L, D]` times per-head projections `W [S, D, d]`: heads `[L, S, d]`.
fn project(x: &[f64], w: &[f64], s: usize, d: usize, dm: usize) -> Vec<f64> {
    let l = x.len() / dm;
    let mut out = vec![0.0; l * s * d];
    for t in 0..l {
        for hh in 0..s {
            for i in 0..dm {
                for u in 0..d {
                    out[(t * s + hh) * d + u] += x[t * dm + i] * w[(hh * dm + i) * d + u];
                }
            }
        }
    }
    out
}

#[test]
fn decoding_with_the_compressed_cache_matches_the_rebuilt_model() {
    let (h, d, dm, hk, len, prompt) = (4, 8, 12, 2, 12, 5);
    let mut rng = Rng::new(5);
    let wq = per_head(&normals(&mut rng, h * d * dm, 0.3), h, d, dm);
    let layers = vec![Layer { k: projection(&mut rng, h, d, dm, None), v: projection(&mut rng, h, d, dm, None) }];
    let (bytes, _) = compress_layers("decode", &layers, h, d, dm, hk);
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let (_, ck) = read(&st, "model.layers.0.self_attn.k_components");
    let (_, ak) = read(&st, "model.layers.0.self_attn.ak");
    let (_, cv) = read(&st, "model.layers.0.self_attn.v_components");
    let (_, av) = read(&st, "model.layers.0.self_attn.av");
    let (ck, cv) = (per_head(&ck, hk, d, dm), per_head(&cv, hk, d, dm));
    let x = normals(&mut rng, len * dm, 1.0); // hidden states of one sequence
    // The layer's own head norm (MEA's GroupNorm, untouched by the compression).
    let gamma: Vec<f32> = (0..h * d).map(|_| (1.0 + 0.1 * rng.normal()) as f32).collect();
    let beta: Vec<f32> = rng.normal_vec(h * d, 0.3);
    // The trained MEA layer's own key/value mixing over its H heads, [H, H, 1].
    let (ak_learned, av_learned) = (rng.normal_vec(h * h, 0.5), rng.normal_vec(h * h, 0.5));

    // The compressed model: cache the Hk component heads, mix them back with ak/av on the fly.
    // No collapse (MEA has none): outputs are [B, N, H, P = 1, d].
    let cfg = Config::mea_compressed(h, hk, d).unwrap().with_causal(true).with_rope(Default::default());
    let to32 = |x: &[f64]| x.iter().map(|&v| v as f32).collect::<Vec<f32>>();
    // Its mixing [Hk, H, 1] is the compression's [Hk, H] followed by the learned mixing.
    let ak_c = fold_mixing(&to32(&ak), &ak_learned, hk, h, 1).unwrap();
    let av_c = fold_mixing(&to32(&av), &av_learned, hk, h, 1).unwrap();
    assert!(matches!(fold_mixing(&to32(&ak), &ak_learned[1..], hk, h, 1), Err(CompressError::Tensor { .. })));
    let norm = HeadNorm::Group { gamma: gamma.clone(), beta: beta.clone() };
    let w = Weights { aq: replication(h, h, 1), ak: ak_c, av: av_c, r: None, norm: Some(norm) };
    let (q, kc, vc) =
        (to32(&project(&x, &wq, h, d, dm)), to32(&project(&x, &ck, hk, d, dm)), to32(&project(&x, &cv, hk, d, dm)));
    let cpu = CpuBackend::new();
    let mut cache = KvCache::for_config(&cfg, 1, len, DType::F32).unwrap();
    let mut out = vec![f32::NAN; len * h * d];
    let (row_q, row_k) = (h * d, hk * d);
    cache
        .append(
            &Tensor::new(&kc[..prompt * row_k], &[1, prompt, hk, d]),
            &Tensor::new(&vc[..prompt * row_k], &[1, prompt, hk, d]),
        )
        .unwrap();
    let (qp, kp, vp) = (&q[..prompt * row_q], &kc[..prompt * row_k], &vc[..prompt * row_k]);
    headmix::Backend::forward(
        &cpu,
        &cfg,
        &w,
        Io {
            q: Tensor::new(qp, &[1, prompt, h, d]),
            k: Tensor::new(kp, &[1, prompt, hk, d]),
            v: Tensor::new(vp, &[1, prompt, hk, d]),
            out: TensorMut::new(&mut out[..prompt * row_q], &[1, prompt, h, 1, d]),
            lse: None,
        },
    )
    .unwrap();
    for t in prompt..len {
        let (k1, v1) = (&kc[t * row_k..(t + 1) * row_k], &vc[t * row_k..(t + 1) * row_k]);
        cache.append(&Tensor::new(k1, &[1, 1, hk, d]), &Tensor::new(v1, &[1, 1, hk, d])).unwrap();
        let io = DecodeIo {
            q: Tensor::new(&q[t * row_q..(t + 1) * row_q], &[1, 1, h, d]),
            cache: &cache,
            out: TensorMut::new(&mut out[t * row_q..(t + 1) * row_q], &[1, 1, h, 1, d]),
            lse: None,
        };
        headmix::decode(&cpu, &cfg, &w, io).unwrap();
    }

    // The reference: full MEA with the rebuilt H-head projections, the learned mixing, same norm.
    let reference_with = |wk: &[f64], wv: &[f64]| {
        let full = Config::mea(h, d).with_causal(true).with_rope(Default::default());
        let problem = Problem::new(&full, 1, len, len, DType::F32, false, true).unwrap();
        let id: Vec<f64> = replication(h, h, 1).iter().map(|&v| v as f64).collect();
        let g: Vec<f64> = gamma.iter().map(|&v| v as f64).collect();
        let bt: Vec<f64> = beta.iter().map(|&v| v as f64).collect();
        let (akl, avl): (Vec<f64>, Vec<f64>) =
            (ak_learned.iter().map(|&v| v as f64).collect(), av_learned.iter().map(|&v| v as f64).collect());
        let mix =
            MixWeights { aq: &id, ak: &akl, av: &avl, r: None, norm: Some(HeadNorm::Group { gamma: &g, beta: &bt }) };
        let qf: Vec<f64> = q.iter().map(|&v| v as f64).collect();
        reference::attention(&problem.params(), &qf, &project(&x, wk, h, d, dm), &project(&x, wv, h, d, dm), &mix).out
    };
    let rebuilt = reference_with(&rebuild(&ck, &ak, h), &rebuild(&cv, &av, h));
    let err = rel_err(&out, &rebuilt);
    assert!(err < 1e-5, "compressed decode vs rebuilt model: {err:.3e}");
    // Negative control: the original (untruncated) model is a different function.
    let original = reference_with(&per_head(&layers[0].k, h, d, dm), &per_head(&layers[0].v, h, d, dm));
    let err = rel_err(&out, &original);
    assert!(err > 1e-3, "rank {hk} of {h} cannot match the original model ({err:.3e})");
}
