//! `headmix kernels`: the CUDA kernel variants of the kernel table, what each costs on the chip
//! (registers, stack, spills, shared memory, occupancy) and, for a problem, the counted FLOP and
//! bytes and the roofline ceiling of each kernel version on an H200 (a model), with the measured
//! time beside it when one is given. Also writes the exact NVRTC source of a variant (`--source`)
//! and the emulator's grid (`--emu-grid`).

use std::collections::BTreeMap;

use headmix::backends::cuda::cost::{self, Cost, H200};
use headmix::backends::cuda::variants::{self, Kernel, MaskKind, Variant};
use headmix::backends::cuda::{self as cuda_backend, CudaBackend, compile};
use headmix::{Config, DType, Problem, Weights};

use crate::ptxas;

/// `headmix kernels`: the CUDA kernel variants, their resources and occupancy, and the counted cost
/// (a model) of a problem given with `headmix run`'s flags (dtype bf16 by default). Registers, stack
/// and spills come from the device (cuFuncGetAttribute) when a GPU is present, else from ptxas
/// (PATH, HEADMIX_PTXAS, or the wheel sass-report installs), else they are not shown.
#[derive(clap::Args)]
pub struct Args {
    /// The variant table (kernel_table.rs): threads, tiles, shared memory
    #[arg(long)]
    list: bool,
    /// One line per attention variant: its name and g++ flags (kernels-cuda/emu/run.sh)
    #[arg(long)]
    emu_grid: bool,
    /// Comma-separated variant names [default: what the problem launches, per version]
    #[arg(long)]
    variant: Option<String>,
    /// The resources of every variant (compiles each one)
    #[arg(long)]
    all: bool,
    /// Write the exact NVRTC source of the one --variant to FILE (also a decode module:
    /// `decode_v1_<dtype>`, `decode_v2_<dtype>`)
    #[arg(long, value_name = "FILE")]
    source: Option<String>,
    /// Architecture ptxas assembles for (occupancy is sm_90's)
    #[arg(long, default_value = "sm_90")]
    arch: String,
    /// A `headmix bench` JSON report: its measured cuda time beside the model
    #[arg(long, value_name = "FILE")]
    bench: Option<String>,
    /// Measured milliseconds per kernel version, e.g. v1=41.2,v2=12.5
    #[arg(long, value_name = "K=MS,..")]
    measured: Option<String>,
    /// The problem, as `headmix run` takes it
    #[command(flatten)]
    problem: crate::run::Args,
}

pub fn main(a: Args) -> Result<(), String> {
    if a.emu_grid {
        for v in variants::emu_grid() {
            println!("{} {}", v.name(), v.emu_flags().join(" "));
        }
        return Ok(());
    }
    if a.list {
        print!("{}", list_table());
        return Ok(());
    }
    // The decode modules (outside the attention table): `decode_v1_<dtype>`, `decode_v2_<dtype>`.
    if let (Some(name), Some(file)) = (a.variant.as_deref(), a.source.as_deref())
        && let Some((kernel, dtype)) = decode_variant(name)
    {
        let text = cuda_backend::decode::decode_source_of(kernel, dtype);
        std::fs::write(file, &text).map_err(|e| format!("--source {file}: {e}"))?;
        println!("wrote {file}: the NVRTC source of {name} ({} bytes)", text.len());
        return Ok(());
    }
    let named = match a.variant.as_deref() {
        Some(names) => Some(
            names
                .split(',')
                .map(|n| Variant::parse(n.trim()).ok_or_else(|| format!("--variant: no variant {n:?} (see --list)")))
                .collect::<Result<Vec<_>, _>>()?,
        ),
        None => None,
    };
    if let Some(file) = a.source.as_deref() {
        let v = match named.as_deref() {
            Some([v]) => *v,
            _ => return Err("--source needs exactly one --variant NAME".into()),
        };
        let text = compile::source(&v);
        std::fs::write(file, &text).map_err(|e| format!("--source {file}: {e}"))?;
        println!("wrote {file}: the NVRTC source of {} ({} bytes)", v.name(), text.len());
        return Ok(());
    }

    let pb = problem_from(&a)?;
    let launched = launched_by(&pb);
    let shown: Vec<Variant> = if a.all {
        variants::all_variants()
    } else if let Some(n) = named {
        n
    } else {
        let mut vs: Vec<Variant> = launched.iter().flat_map(|(_, vs)| vs.iter().copied()).collect();
        let mut seen = std::collections::HashSet::new();
        vs.retain(|v| seen.insert(*v)); // the epilogue follows every version: once

        vs
    };
    let arch = a.arch.as_str();
    let measured = measured_times(&a, &pb)?;

    println!("{}", describe_problem(&pb));
    println!();
    print!("{}", resources_table(&shown, arch));
    println!();
    print!("{}", cost_table(&pb, &launched, &measured));
    Ok(())
}

/// The problem named by the flags (`headmix run`'s, dtype bf16 by default).
/// A decode module's name, `decode_<kernel>_<dtype>` (e.g. `decode_v2_f16`).
fn decode_variant(name: &str) -> Option<(cuda_backend::decode::DecodeKernel, DType)> {
    let (kernel, dtype) = name.strip_prefix("decode_")?.split_once('_')?;
    let (kernel, dtype) = (cuda_backend::decode::DecodeKernel::parse(kernel)?, DType::parse(dtype)?);
    kernel.dtypes().contains(&dtype).then_some((kernel, dtype))
}

fn problem_from(a: &Args) -> Result<Problem, String> {
    let r = &a.problem;
    let (n, batch) = (r.seq, r.batch);
    let m = r.kv_seq.unwrap_or(n);
    let dtype = r.dtype.unwrap_or(DType::BF16);
    let cfg: Config = r.config()?;
    if n > m {
        return Err(format!("--seq {n} above --kv-seq {m}"));
    }
    let w = Weights::random(&cfg, 1);
    Problem::for_weights(&cfg, &w, batch, n, m, dtype).map_err(|e| e.to_string())
}

fn describe_problem(pb: &Problem) -> String {
    let c = &pb.cfg;
    format!(
        "problem: {} H={} Hq={} Hk={} P={} d={} causal={} window={:?} {} B={} N={} M={}{}; useful FLOP {} \
         (4·B·H·d·visible pairs)",
        c.method.name(),
        c.heads,
        c.q_heads,
        c.kv_heads,
        c.pseudo,
        c.head_dim,
        c.causal,
        c.window.map(|w| (w.left, w.right)),
        pb.dtype.name(),
        pb.batch,
        pb.n,
        pb.m,
        if pb.collapse { ", collapse r" } else { "" },
        si(pb.flops(), "FLOP"),
    )
}

/// For each attention kernel version that can run the problem: the variants one call launches
/// (the attention variant, then the epilogue when there is a collapse).
fn launched_by(pb: &Problem) -> Vec<(Kernel, Vec<Variant>)> {
    let mask = MaskKind::of(&pb.cfg);
    Kernel::attention()
        .filter_map(|k| {
            let attn = Variant::attention(k, pb.dtype, pb.cfg.head_dim, mask)?;
            let mut vs = vec![attn];
            if pb.collapse {
                vs.push(Variant::epilogue(pb.dtype));
            }
            Some((k, vs))
        })
        .collect()
}

/// A plain text table: a header row, then rows, columns padded to their widest cell.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut width: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (w, c) in width.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let padded: Vec<String> = cells.iter().zip(&width).map(|(c, w)| format!("{c:<w$}")).collect();
        padded.join("  ").trim_end().to_string() + "\n"
    };
    let mut s = line(header.iter().map(|h| h.to_string()).collect());
    s += &line(width.iter().map(|w| "-".repeat(*w)).collect());
    for r in rows {
        s += &line(r.clone());
    }
    s
}

fn list_table() -> String {
    let rows: Vec<Vec<String>> = variants::all_variants()
        .into_iter()
        .map(|v| {
            let (t, s) = (v.tiles(), v.spec());
            vec![
                v.name(),
                s.file.into(),
                t.threads.to_string(),
                t.br.to_string(),
                t.bc.to_string(),
                t.smem.to_string(),
                format!("sm_{}{}", s.min_cc.0, s.min_cc.1),
            ]
        })
        .collect();
    table(&["variant", "file", "threads", "BR", "BC", "smem B", "min arch"], &rows)
}

/// Where registers and spills come from on this machine.
enum Figures {
    Device(CudaBackend),
    Ptxas(std::path::PathBuf),
    Unknown(String),
}

fn figures() -> Figures {
    if let Ok(b) = CudaBackend::new(0) {
        return Figures::Device(b);
    }
    match (ptxas::find(), cuda_backend::nvrtc_available()) {
        (Some(p), Ok(_)) => Figures::Ptxas(p),
        (None, _) => Figures::Unknown("ptxas not found".into()),
        (_, Err(e)) => Figures::Unknown(format!("NVRTC not found: {e}")),
    }
}

fn resources_table(shown: &[Variant], arch: &str) -> String {
    let fig = figures();
    let source = match &fig {
        Figures::Device(b) => format!("the device ({}, cuFuncGetAttribute; stack = local memory per thread)", b.arch()),
        Figures::Ptxas(p) => format!("ptxas -arch={arch} ({}; static)", ptxas::version(p)),
        Figures::Unknown(why) => format!("{why}: registers, stack and spills not shown"),
    };
    let mut rows = Vec::new();
    for v in shown {
        let t = v.tiles();
        // (registers, stack, spills, static shared memory), or why not.
        let got: Result<(u32, u32, String, usize), String> = match &fig {
            Figures::Device(b) => b
                .variant_info(*v)
                .map(|i| (i.registers as u32, i.local_bytes as u32, "-".into(), i.static_smem as usize))
                .map_err(|e| e.to_string()),
            Figures::Ptxas(p) => compile::compile_uncached(v, arch)
                .map_err(|e| e.to_string())
                .and_then(|c| ptxas::run(p, &c.ptx, arch, v.kernel.entry()))
                .map(|i| (i.registers, i.stack, format!("{}/{}", i.spill_stores, i.spill_loads), i.smem as usize)),
            Figures::Unknown(_) => Err(String::new()),
        };
        let (regs, stack, spills, smem) = match &got {
            Ok((r, s, sp, st)) => (r.to_string(), s.to_string(), sp.clone(), t.smem + st),
            Err(e) if e.is_empty() => ("?".into(), "?".into(), "?".into(), t.smem),
            Err(e) => {
                eprintln!("{}: {e}", v.name());
                ("error".into(), "-".into(), "-".into(), t.smem)
            }
        };
        let occ = cost::occupancy(&H200, t.threads, got.as_ref().map(|g| g.0).unwrap_or(0), smem);
        let known_regs = got.is_ok();
        rows.push(vec![
            v.name(),
            t.threads.to_string(),
            format!("{}x{}", t.br, t.bc),
            smem.to_string(),
            regs,
            stack,
            spills,
            format!("{}{} ({})", occ.blocks, if known_regs { "" } else { "+" }, occ.limit),
            format!("{}{}", occ.warps, if known_regs { "" } else { "+" }),
        ]);
    }
    let mut s = format!("resources per variant: registers, stack, spills from {source}\n");
    s += &format!(
        "occupancy on sm_90 ({} regs, {} KiB shared memory, {} blocks, {} warps per SM; + = registers unknown)\n",
        H200.regs_per_sm,
        H200.smem_per_sm / 1024,
        H200.max_blocks_per_sm,
        H200.max_warps_per_sm
    );
    s + &table(
        &["variant", "threads", "BRxBC", "smem B", "regs", "stack B", "spill st/ld B", "blocks/SM (limit)", "warps/SM"],
        &rows,
    )
}

fn cost_table(pb: &Problem, launched: &[(Kernel, Vec<Variant>)], measured: &BTreeMap<String, f64>) -> String {
    let mut rows = Vec::new();
    for (k, vs) in launched {
        let c: Cost = vs.iter().map(|v| cost::cost(v, pb)).fold(Cost::default(), |a, b| a + b);
        let r = c.roofline(&H200);
        let meas = measured.get(k.name());
        rows.push(vec![
            k.name().to_string(),
            vs.iter().map(|v| v.name()).collect::<Vec<_>>().join(" + "),
            si(c.tc_flop, ""),
            si(c.fma_flop, ""),
            si(c.l2_bytes, "B"),
            si(c.hbm_bytes, "B"),
            si(c.atomics, ""),
            format!("{:.1}", c.l2_intensity()),
            format!("{:.3} ({})", r.seconds * 1e3, r.bound),
            format!("{:.1}", r.tflops),
            meas.map_or("-".into(), |s| format!("{:.3}", s * 1e3)),
            meas.map_or("-".into(), |s| format!("{:.1}", pb.flops() / s / 1e12)),
        ]);
    }
    let mut s = format!(
        "counted cost per call and roofline ceiling on the {} (a MODEL, not a measurement: {} TFLOP/s tensor cores, \
         {} TFLOP/s f32 FMA, {} TB/s HBM, ~{} TB/s L2;\nthe ceiling is the slowest resource at its peak with \
         everything overlapped, TFLOP/s counts useful FLOP only)\n",
        H200.name, H200.tc_tflops, H200.fma_tflops, H200.hbm_tb_s, H200.l2_tb_s
    );
    if launched.is_empty() {
        return s + "no kernel version runs this problem\n";
    }
    s += &table(
        &[
            "version",
            "variants",
            "TC FLOP",
            "FMA FLOP",
            "L2 bytes",
            "HBM bytes",
            "f32 atomics",
            "FLOP/B (L2)",
            "ceiling ms (bound)",
            "ceiling TFLOP/s",
            "measured ms",
            "measured TFLOP/s",
        ],
        &rows,
    );
    s
}

/// Measured seconds per kernel version, from `--measured v1=MS,...` and `--bench FILE`.
fn measured_times(a: &Args, pb: &Problem) -> Result<BTreeMap<String, f64>, String> {
    let mut out = BTreeMap::new();
    if let Some(list) = a.measured.as_deref() {
        for item in list.split(',') {
            let (k, ms) = item.split_once('=').ok_or("--measured takes K=MS,... (e.g. v1=41.2)")?;
            let kernel = Kernel::parse(k.trim()).ok_or_else(|| format!("--measured: no kernel version {k:?}"))?;
            let ms: f64 = ms.trim().parse().map_err(|_| format!("--measured: bad time {ms:?}"))?;
            out.insert(kernel.name().to_string(), ms * 1e-3);
        }
    }
    if let Some(file) = a.bench.as_deref() {
        let report = headmix_bench::report::Report::load(file)?;
        // The default implementation ran the kernel the backend's `attention kernel` entry names.
        let default_kernel = report
            .backends
            .iter()
            .find(|b| b.backend == "cuda")
            .and_then(|b| b.describe.iter().find(|(k, _)| k == "attention kernel"))
            .and_then(|(_, v)| v.split_whitespace().next().map(str::to_string))
            .unwrap_or_else(|| Kernel::AttnV1.name().to_string());
        let c = &pb.cfg;
        for row in report.results.iter().filter(|r| r.backend == "cuda" && r.decode.is_none()) {
            let same = row.config == c.method.name()
                && row.dtype == pb.dtype.name()
                && (row.batch, row.n, row.m) == (pb.batch, pb.n, pb.m)
                && (row.heads, row.q_heads, row.kv_heads, row.pseudo, row.head_dim)
                    == (c.heads, c.q_heads, c.kv_heads, c.pseudo, c.head_dim)
                && row.causal == c.causal
                && row.window == c.window.map(|w| [w.left, w.right]);
            if !same {
                continue;
            }
            let kernel = match row.implementation.strip_prefix("cuda attn_") {
                Some(k) => k.to_string(),
                None if row.implementation == "headmix fused" => default_kernel.clone(),
                None => continue,
            };
            out.entry(kernel).or_insert(row.median_s);
        }
    }
    Ok(out)
}

/// `x` with an SI prefix: `4.40 T`, `123 M`.
fn si(x: f64, unit: &str) -> String {
    if x == 0.0 {
        return format!("0 {unit}").trim_end().to_string();
    }
    let (scale, prefix) = [(1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k"), (1.0, "")]
        .into_iter()
        .find(|(s, _)| x.abs() >= *s)
        .unwrap_or((1.0, ""));
    format!("{:.3} {prefix}{unit}", x / scale).trim_end().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Args {
        let v: Vec<String> = s.split_whitespace().map(str::to_string).collect();
        #[derive(clap::Parser)]
        struct T {
            #[command(flatten)]
            a: Args,
        }
        <T as clap::Parser>::try_parse_from(std::iter::once("kernels".to_string()).chain(v)).unwrap().a
    }

    /// `--source` writes exactly the string the host's compile path hands NVRTC, and NVRTC makes
    /// the same PTX of the file's text as of the host's own compile (what sass-report assembles).
    #[test]
    fn source_file_is_what_the_host_compiles() {
        let dir = std::env::temp_dir().join(format!("headmix-kernels-src-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for name in ["v2_bf16_d128_causal", "v1_f32_d64_anymask", "epilogue_f16"] {
            let file = dir.join(format!("{name}.cu"));
            main(args(&format!("--variant {name} --source {}", file.to_str().unwrap()))).unwrap();
            let v = Variant::parse(name).unwrap();
            let written = std::fs::read_to_string(&file).unwrap();
            assert_eq!(written, compile::source(&v), "{name}");
            if cuda_backend::nvrtc_available().is_ok() {
                let host = compile::compile_uncached(&v, "sm_90").unwrap();
                let tool = compile::compile_source(name, &written, "sm_90").unwrap();
                assert_eq!(host.ptx, tool.ptx, "{name}: the file compiles to the host's PTX");
            } else {
                eprintln!("NVRTC not available: the PTX comparison is skipped");
            }
        }
        // Negative control: another variant's source differs, so the comparison can fail.
        let other = Variant::parse("v2_bf16_d128_dense").unwrap();
        let file = dir.join("v2_bf16_d128_causal.cu");
        assert_ne!(std::fs::read_to_string(&file).unwrap(), compile::source(&other));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn source_needs_one_variant_and_names_are_checked() {
        assert!(main(args("--source /tmp/x.cu")).unwrap_err().contains("exactly one"));
        assert!(main(args("--variant v9_bf16 --source /tmp/x.cu")).unwrap_err().contains("no variant"));
        assert!(main(args("--variant v1_f32_d64_anymask,v2_bf16_d64_dense --source /tmp/x.cu")).is_err());
    }

    #[test]
    fn the_problem_launches_every_version_that_can_run_it() {
        let pb =
            problem_from(&args("--config iha --heads 4 --pseudo 2 --head-dim 128 --seq 64 --causal true")).unwrap();
        assert_eq!(pb.dtype, DType::BF16);
        let l = launched_by(&pb);
        let names: Vec<Vec<String>> = l.iter().map(|(_, vs)| vs.iter().map(|v| v.name()).collect()).collect();
        assert_eq!(names[0], ["v1_bf16_d128_anymask", "epilogue_bf16"]);
        assert_eq!(names[1], ["v2_bf16_d128_causal", "epilogue_bf16"]);
        // f32: only v1 runs it.
        let pb = problem_from(&args("--config mha --dtype f32 --head-dim 64")).unwrap();
        assert_eq!(launched_by(&pb).len(), 1);
        let text = cost_table(&pb, &launched_by(&pb), &BTreeMap::new());
        assert!(text.contains("MODEL") && text.contains("v1_f32_d64_anymask"), "{text}");
    }

    #[test]
    fn measured_times_are_read_per_version() {
        let pb = problem_from(&args("--seq 64")).unwrap();
        let m = measured_times(&args("--measured v1=2.5,v2=0.5"), &pb).unwrap();
        assert_eq!(m.get("v1"), Some(&2.5e-3));
        assert_eq!(m.get("v2"), Some(&0.5e-3));
        assert!(measured_times(&args("--measured v7=1"), &pb).is_err());
        let launched = launched_by(&pb);
        let text = cost_table(&pb, &launched, &m);
        assert!(text.contains("2.500"), "{text}");
    }

    /// `--bench`: the cuda rows of the same shape, by implementation (`headmix fused` ran the
    /// kernel the backend's describe() names; `cuda attn_v2` ran v2); other shapes and backends
    /// are ignored.
    #[test]
    fn bench_report_times_are_matched_to_the_problem() {
        use headmix_bench::report::{BackendInfo, Report, Row};
        let pb = problem_from(&args("--config iha --heads 4 --pseudo 2 --head-dim 64 --seq 128 --batch 2")).unwrap();
        let c = &pb.cfg;
        let row = |implementation: &str, backend: &str, n: usize, median_s: f64| Row {
            config: c.method.name().into(),
            implementation: implementation.into(),
            backend: backend.into(),
            device: "GPU".into(),
            driver: "-".into(),
            dtype: "bf16".into(),
            batch: 2,
            n,
            m: n,
            heads: c.heads,
            q_heads: c.q_heads,
            kv_heads: c.kv_heads,
            pseudo: c.pseudo,
            head_dim: c.head_dim,
            causal: c.causal,
            window: None,
            flops: 0.0,
            bytes: 0.0,
            clock: "cuda events".into(),
            seconds: vec![median_s],
            median_s,
            tflops: 0.0,
            gb_s: 0.0,
            pct_peak_flops: None,
            pct_peak_bw: None,
            extra_bytes: None,
            unfused: None,
            speedup_vs_unfused: None,
            decode: None,
        };
        let mut r = Report::new("test", "test");
        r.backends.push(BackendInfo {
            backend: "cuda".into(),
            device: "GPU".into(),
            driver: "-".into(),
            describe: vec![("attention kernel".into(), "v1 (FMA)".into())],
        });
        r.results = vec![
            row("headmix fused", "cuda", 128, 0.004),
            row("cuda attn_v2", "cuda", 128, 0.001),
            row("headmix fused", "cuda", 256, 9.0), // another shape
            row("headmix fused", "wgpu", 128, 9.0), // another backend
        ];
        let file = std::env::temp_dir().join(format!("headmix-kernels-bench-{}.json", std::process::id()));
        r.save(file.to_str().unwrap()).unwrap();
        let m = measured_times(&args(&format!("--bench {}", file.display())), &pb).unwrap();
        let _ = std::fs::remove_file(&file);
        assert_eq!(m.len(), 2, "{m:?}");
        assert_eq!(m.get("v1"), Some(&0.004));
        assert_eq!(m.get("v2"), Some(&0.001));
    }

    #[test]
    fn si_prefixes() {
        assert_eq!(si(4.4e12, "FLOP"), "4.400 TFLOP");
        assert_eq!(si(0.0, "B"), "0 B");
        assert_eq!(si(512.0, ""), "512.000");
    }
}
