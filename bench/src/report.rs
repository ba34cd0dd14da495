//! The benchmark report: JSON (schema `headmix-bench/1`, documented in `bench/README.md`),
//! the readable table, and the side-by-side comparison with the PyTorch peers.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::count;

/// The schema tag every report carries.
pub const SCHEMA: &str = "headmix-bench/1";

/// One benchmark run: where and when it ran, and one row per (case, implementation, backend).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// Always [`SCHEMA`].
    pub schema: String,
    /// What wrote the report: `headmix bench`, `cargo bench`, `bench/peers/peers.py`.
    pub source: String,
    /// The sweep's name (`quick`, `full`, ...).
    pub sweep: String,
    /// `git rev-parse --short HEAD` at run time, or `unknown`.
    pub git_commit: String,
    /// Start of the run, ISO 8601 UTC.
    pub date_utc: String,
    /// The host's 1, 5 and 15 minute load averages at the start (`/proc/loadavg`; `null` elsewhere):
    /// other work sharing the cores slows CPU measurements down.
    #[serde(default)]
    pub load_average: Option<[f64; 3]>,
    /// The denominators of the "% of peak" columns, for the devices that have them.
    pub ceilings: Vec<Ceiling>,
    /// The backends that ran.
    pub backends: Vec<BackendInfo>,
    /// The backends asked for that could not open, with why.
    #[serde(default)]
    pub skipped: Vec<Skipped>,
    pub results: Vec<Row>,
    /// Cases that could not run (unsupported by a backend, or an error), with why.
    #[serde(default)]
    pub errors: Vec<CaseError>,
}

/// Measured ceilings of one device, used only as denominators.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Ceiling {
    /// The device they were measured on, e.g. `H100 SXM`.
    pub device: String,
    /// Dense bf16/f16 tensor-core TFLOP/s.
    pub dense_bf16_tflops: f64,
    /// Device-to-device copy TB/s.
    pub copy_tb_s: f64,
}

impl From<count::Peak> for Ceiling {
    fn from(p: count::Peak) -> Ceiling {
        Ceiling { device: p.device.into(), dense_bf16_tflops: p.tflops, copy_tb_s: p.tb_s }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BackendInfo {
    pub backend: String,
    pub device: String,
    /// The `driver` entry of `describe()` (or `-`).
    pub driver: String,
    /// Everything `describe()` reports, as (key, value) pairs.
    #[serde(default)]
    pub describe: Vec<(String, String)>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Skipped {
    pub backend: String,
    pub why: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CaseError {
    pub backend: String,
    /// The case's label, e.g. `iha P=2 B=1 N=64 d=64 f32`.
    pub case: String,
    pub why: String,
}

/// One timed case.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Row {
    /// Method name: `mha`, `gqa`, `mea`, `mea-compressed`, `iha`, `iha-local`.
    pub config: String,
    /// What ran: `headmix fused`, or a peer's pipeline (e.g. `torch sdpa flash unfused`).
    pub implementation: String,
    /// `cuda`, `wgpu`, `cpu` (or `torch` for peers).
    pub backend: String,
    pub device: String,
    pub driver: String,
    pub dtype: String,
    pub batch: usize,
    pub n: usize,
    pub m: usize,
    pub heads: usize,
    pub q_heads: usize,
    pub kv_heads: usize,
    pub pseudo: usize,
    pub head_dim: usize,
    pub causal: bool,
    /// `[left, right]` in virtual tokens, or `null`.
    pub window: Option<[usize; 2]>,
    /// `4·B·H·d·` visible pairs.
    pub flops: f64,
    /// q, k, v read + out written, in bytes.
    pub bytes: f64,
    /// How the time was taken (`cuda events`, `wgpu timestamps`, `wall clock`).
    pub clock: String,
    /// Seconds per call, one per timed repetition.
    pub seconds: Vec<f64>,
    pub median_s: f64,
    pub tflops: f64,
    pub gb_s: f64,
    /// % of the device's measured TFLOP/s ceiling; `null` when none is known for the device.
    pub pct_peak_flops: Option<f64>,
    /// % of the device's measured copy bandwidth; `null` when none is known for the device.
    pub pct_peak_bw: Option<f64>,
    /// Peak extra device memory beyond inputs and outputs (`Timing::extra_bytes`); `null` when
    /// not tracked (the CPU backend's host allocations).
    pub extra_bytes: Option<u64>,
    /// The unfused pipeline of the same case, stage by stage (absent for MHA and peers).
    #[serde(default)]
    pub unfused: Option<UnfusedResult>,
    /// Unfused median over fused median. A lower bound when `unfused.complete` is false.
    #[serde(default)]
    pub speedup_vs_unfused: Option<f64>,
    /// Decode rows only (`null` for forward passes): the KV cache the call read. In a decode row
    /// `n` is the new tokens per sequence, `m` the tokens the cache holds per sequence, `bytes`
    /// the cache read plus q read and out written, `gb_s` and `pct_peak_bw` follow from those.
    #[serde(default)]
    pub decode: Option<DecodeInfo>,
}

/// The KV cache of a decode row.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DecodeInfo {
    /// Tokens per sequence `L` (the new one included); a ring holds fewer (`m`).
    pub tokens: usize,
    /// `linear` (every token kept) or `ring` (IHA local: the window and the new token).
    pub layout: String,
    /// Bytes of cache read per call: the stored heads of the held tokens, `B·m·Hk·d·2·` dtype size.
    pub cache_read_bytes: f64,
    /// Bytes the headmix cache holds (`Hk` stored heads, keys and values, `m` tokens).
    pub cache_bytes: u64,
    /// Bytes the unfused design's cache would hold for the same tokens (the mixed heads its
    /// attention reads: `H·P` for IHA and MEA, `Hk` for MHA and GQA), from `headmix::cache_bytes`.
    pub unfused_cache_bytes: u64,
    /// `unfused_cache_bytes / cache_bytes`.
    pub cache_ratio: f64,
}

/// The unfused pipeline (mix, attention with `P = 1` over `N·P` tokens, collapse).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct UnfusedResult {
    /// Whether every stage was timed (false on device backends: only the attention stage is).
    pub complete: bool,
    /// Sum of the stages' medians.
    pub median_s: f64,
    /// Bytes of the intermediates the pipeline writes that the fused call does not (counted),
    /// plus its attention stage's own extra memory.
    pub extra_bytes: u64,
    pub stages: Vec<StageResult>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StageResult {
    /// `mix`, `attention`, `collapse`.
    pub name: String,
    /// `host`, or the backend it ran on.
    pub place: String,
    pub clock: String,
    pub median_s: f64,
    pub seconds: Vec<f64>,
}

impl Report {
    /// An empty report stamped with the commit and date of now.
    pub fn new(source: &str, sweep: &str) -> Report {
        Report {
            schema: SCHEMA.into(),
            source: source.into(),
            sweep: sweep.into(),
            git_commit: crate::meta::git_commit(),
            date_utc: crate::meta::utc_now(),
            load_average: crate::meta::load_average(),
            ceilings: vec![count::H100.into()],
            backends: Vec::new(),
            skipped: Vec::new(),
            results: Vec::new(),
            errors: Vec::new(),
        }
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("reports are plain data")
    }

    /// Parse a report and check its schema tag.
    pub fn from_json(text: &str) -> Result<Report, String> {
        let r: Report = serde_json::from_str(text).map_err(|e| format!("not a {SCHEMA} report: {e}"))?;
        if r.schema != SCHEMA {
            return Err(format!("schema is {:?}, expected {SCHEMA:?}", r.schema));
        }
        Ok(r)
    }

    pub fn load(path: &str) -> Result<Report, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{path}: {e}"))?;
        Report::from_json(&text).map_err(|e| format!("{path}: {e}"))
    }

    pub fn save(&self, path: &str) -> Result<(), String> {
        std::fs::write(path, self.to_json() + "\n").map_err(|e| format!("{path}: {e}"))
    }

    /// One line on what, where and when: the header of the printed tables.
    pub fn header(&self) -> String {
        let mut s = format!("{} · sweep {} · commit {} · {}", self.source, self.sweep, self.git_commit, self.date_utc);
        if let Some([a, b, c]) = self.load_average {
            s += &format!(" · load average {a:.2} {b:.2} {c:.2}");
        }
        s
    }
}

impl Row {
    /// Whether `other` is the same configuration at the same size (how peers are matched).
    pub fn same_case(&self, other: &Row) -> bool {
        (&self.config, &self.dtype, self.causal, self.window)
            == (&other.config, &other.dtype, other.causal, other.window)
            && [self.batch, self.n, self.m, self.heads, self.q_heads, self.kv_heads, self.pseudo, self.head_dim]
                == [
                    other.batch,
                    other.n,
                    other.m,
                    other.heads,
                    other.q_heads,
                    other.kv_heads,
                    other.pseudo,
                    other.head_dim,
                ]
    }
}

/// `1.23 µs`, `4.56 ms`, `7.89 s`.
pub fn fmt_time(s: f64) -> String {
    if !s.is_finite() {
        "-".into()
    } else if s < 1e-3 {
        format!("{:.2} µs", s * 1e6)
    } else if s < 1.0 {
        format!("{:.2} ms", s * 1e3)
    } else {
        format!("{s:.2} s")
    }
}

/// Three significant digits (small CPU throughputs stay readable).
pub fn fmt_sig(x: f64) -> String {
    if !x.is_finite() {
        return "-".into();
    }
    if x == 0.0 {
        return "0".into();
    }
    let digits = (2 - x.abs().log10().floor() as i32).clamp(0, 9) as usize;
    format!("{x:.digits$}")
}

/// Bytes in binary units.
pub fn fmt_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut x = b as f64;
    let mut unit = 0;
    while x >= 1024.0 && unit + 1 < UNITS.len() {
        x /= 1024.0;
        unit += 1;
    }
    if unit == 0 { format!("{b} B") } else { format!("{x:.1} {}", UNITS[unit]) }
}

fn speedup_cell(row: &Row) -> String {
    match (row.speedup_vs_unfused, &row.unfused) {
        (Some(x), Some(u)) if u.complete => format!("{x:.2}x"),
        (Some(x), Some(_)) => format!(">={x:.2}x"),
        _ => "-".into(),
    }
}

fn extra_cell(row: &Row) -> String {
    let mut s = row.extra_bytes.map_or("-".into(), fmt_bytes);
    if let Some(u) = &row.unfused {
        s += &format!(" (unfused +{})", fmt_bytes(u.extra_bytes));
    }
    s
}

/// Lay out rows of cells in aligned columns (first column left, the rest right-aligned).
pub fn layout(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, (c, w)) in cells.iter().zip(&widths).enumerate() {
            let pad = w - c.chars().count();
            if i > 0 {
                s += "  ";
            }
            if i == 0 || i == 1 || i == 2 {
                s += c;
                s += &" ".repeat(pad);
            } else {
                s += &" ".repeat(pad);
                s += c;
            }
        }
        s.trim_end().to_string() + "\n"
    };
    let mut out = line(header.to_vec());
    out += &line(widths.iter().map(|&w| "-".repeat(w)).collect::<Vec<_>>().iter().map(|s| s.as_str()).collect());
    for r in rows {
        out += &line(r.iter().map(|s| s.as_str()).collect());
    }
    out
}

fn short(s: &str, max: usize) -> String {
    if s.chars().count() <= max { s.to_string() } else { s.chars().take(max - 1).collect::<String>() + "…" }
}

/// The readable table of a report's forward rows (decode rows: [`decode_table`]).
pub fn table(rows: &[Row]) -> String {
    let header = [
        "config",
        "backend",
        "device",
        "dtype",
        "B",
        "N",
        "P",
        "d",
        "median",
        "TFLOP/s",
        "%peak",
        "GB/s",
        "%bw",
        "vs unfused",
        "extra mem",
    ];
    let cells: Vec<Vec<String>> = rows
        .iter()
        .filter(|r| r.decode.is_none())
        .map(|r| {
            vec![
                config_cell(r),
                r.backend.clone(),
                short(&r.device, 28),
                r.dtype.clone(),
                r.batch.to_string(),
                r.n.to_string(),
                r.pseudo.to_string(),
                r.head_dim.to_string(),
                fmt_time(r.median_s),
                fmt_sig(r.tflops),
                r.pct_peak_flops.map_or("-".into(), fmt_sig),
                fmt_sig(r.gb_s),
                r.pct_peak_bw.map_or("-".into(), fmt_sig),
                speedup_cell(r),
                extra_cell(r),
            ]
        })
        .collect();
    layout(&header, &cells)
}

/// The readable table of decode rows: time, cache read bandwidth, and cache size against the
/// unfused design.
pub fn decode_table(rows: &[Row]) -> String {
    let header = [
        "config",
        "backend",
        "device",
        "dtype",
        "B",
        "L",
        "held",
        "P",
        "d",
        "median",
        "cache read",
        "GB/s",
        "%bw",
        "cache",
        "unfused cache",
        "smaller",
    ];
    let cells: Vec<Vec<String>> = rows
        .iter()
        .filter_map(|r| r.decode.as_ref().map(|dc| (r, dc)))
        .map(|(r, dc)| {
            vec![
                config_cell(r),
                r.backend.clone(),
                short(&r.device, 28),
                r.dtype.clone(),
                r.batch.to_string(),
                dc.tokens.to_string(),
                format!("{} {}", r.m, dc.layout),
                r.pseudo.to_string(),
                r.head_dim.to_string(),
                fmt_time(r.median_s),
                fmt_bytes(dc.cache_read_bytes as u64),
                fmt_sig(r.gb_s),
                r.pct_peak_bw.map_or("-".into(), fmt_sig),
                fmt_bytes(dc.cache_bytes),
                fmt_bytes(dc.unfused_cache_bytes),
                format!("{:.2}x", dc.cache_ratio),
            ]
        })
        .collect();
    layout(&header, &cells)
}

/// What the decode table's columns mean (and its device rows, where there are any).
pub fn decode_legend(rows: &[Row]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "decode: one new token per sequence against a cache of L tokens per sequence (held: tokens the cache keeps and one call reads; a ring keeps IHA local's window and the new token)."
    );
    let _ = writeln!(
        s,
        "cache read = B·held·Hk·d·2·dtype size (the stored heads only; pseudo-heads are mixed on chip); GB/s = (cache read + q read + out written) / median."
    );
    let _ = writeln!(
        s,
        "%bw: percent of {}'s measured {} TB/s copy bandwidth, used only as a denominator; '-' on any other device.",
        count::H100.device,
        count::H100.tb_s
    );
    let _ = writeln!(
        s,
        "cache / unfused cache: bytes held by headmix (Hk stored heads) and by the unfused design (the H·P mixed heads it attends over; Hk for MHA/GQA); smaller = their ratio."
    );
    if rows.iter().any(|r| r.clock.contains("host-resident")) {
        let _ = writeln!(
            s,
            "host-resident cache: the cache lives in host memory, so a device's decode time includes moving it to the device (no %bw)."
        );
    }
    if rows.iter().any(|r| r.implementation == crate::decode_measure::FORWARD_N1) {
        let _ = writeln!(
            s,
            "[{}]: the same attention as a forward pass with one query token on device-resident k/v, timed by the device clock; same bytes.",
            crate::decode_measure::FORWARD_N1
        );
    }
    s
}

/// Configuration name with `Hk` where it differs from `H`, and the implementation when it is not
/// the fused call.
fn config_cell(r: &Row) -> String {
    let mut config = r.config.clone();
    if r.kv_heads != r.heads {
        config += &format!(" Hk={}", r.kv_heads);
    }
    if r.implementation != "headmix fused" {
        config += &format!(" [{}]", r.implementation);
    }
    config
}

/// What the columns mean and where the unfused stages ran, printed under the table.
pub fn legend(rows: &[Row]) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "TFLOP/s = 4·B·H·d·visible pairs / median; GB/s = (q, k, v read + out written) / median.");
    let _ = writeln!(
        s,
        "%peak, %bw: percent of the device's measured ceilings ({}: {} TFLOP/s dense bf16, {} TB/s copy), used only as denominators; '-' where none is known.",
        count::H100.device,
        count::H100.tflops,
        count::H100.tb_s
    );
    let _ =
        writeln!(s, "extra mem: device memory beyond inputs and outputs ('-': not tracked, the CPU's host buffers).");
    // Per backend, every stage its unfused pipelines had, in pipeline order.
    let mut places: Vec<(String, Vec<String>, bool)> = Vec::new();
    for r in rows {
        if let Some(u) = &r.unfused {
            let i = match places.iter().position(|(b, _, _)| *b == r.backend) {
                Some(i) => i,
                None => {
                    places.push((r.backend.clone(), Vec::new(), u.complete));
                    places.len() - 1
                }
            };
            for st in &u.stages {
                let desc = format!("{} on {} ({})", st.name, st.place, st.clock);
                if !places[i].1.contains(&desc) {
                    places[i].1.push(desc);
                }
            }
        }
    }
    let order = |d: &String| ["mix", "attention", "collapse"].iter().position(|s| d.starts_with(s));
    let places: Vec<String> = places
        .into_iter()
        .map(|(backend, mut stages, complete)| {
            stages.sort_by_key(order);
            format!("{backend} backend: unfused = {}{}", stages.join(" + "), if complete { "" } else { " only" })
        })
        .collect();
    if !places.is_empty() {
        let _ = writeln!(
            s,
            "vs unfused = unfused pipeline time / fused time. Unfused = mix (materialise qt, kt, vt) + attention with P = 1 over N·P tokens + collapse/norm:"
        );
        for p in places {
            let _ = writeln!(s, "  {p}");
        }
        let _ = writeln!(s, "  host stages run in f32 on the host's cores.");
        if rows.iter().any(|r| r.unfused.as_ref().is_some_and(|u| !u.complete)) {
            let _ = writeln!(
                s,
                "  \">=\": a lower bound; on devices only the attention stage is timed (mix and collapse have no device op)."
            );
        }
    }
    s
}

/// headmix rows and a peers report side by side, matched by configuration and size.
pub fn side_by_side(ours: &[Row], peers: &Report) -> String {
    let mut s = format!("peers: {}\n", peers.header());
    for b in &peers.backends {
        let _ = writeln!(s, "  {}: {} ({})", b.backend, b.device, b.driver);
    }
    let header = [
        "config",
        "peer",
        "peer device",
        "dtype",
        "B",
        "N",
        "P",
        "d",
        "peer median",
        "peer TFLOP/s",
        "headmix",
        "headmix median",
        "headmix TFLOP/s",
        "headmix speed-up",
    ];
    let mut cells = Vec::new();
    for p in &peers.results {
        let mine =
            ours.iter().filter(|r| r.same_case(p) && r.implementation == crate::measure::FUSED && r.decode.is_none());
        let mut any = false;
        for m in mine {
            any = true;
            cells.push(peer_cells(p, Some(m)));
        }
        if !any {
            cells.push(peer_cells(p, None));
        }
    }
    s += &layout(&header, &cells);
    s
}

fn peer_cells(p: &Row, mine: Option<&Row>) -> Vec<String> {
    let mut config = p.config.clone();
    if p.kv_heads != p.heads {
        config += &format!(" Hk={}", p.kv_heads);
    }
    let mut c = vec![
        config,
        p.implementation.clone(),
        short(&p.device, 24),
        p.dtype.clone(),
        p.batch.to_string(),
        p.n.to_string(),
        p.pseudo.to_string(),
        p.head_dim.to_string(),
        fmt_time(p.median_s),
        fmt_sig(p.tflops),
    ];
    match mine {
        Some(m) => {
            let speedup = if m.median_s > 0.0 && p.median_s > 0.0 {
                format!("{:.2}x", p.median_s / m.median_s)
            } else {
                "-".into()
            };
            c.extend([m.backend.clone(), fmt_time(m.median_s), fmt_sig(m.tflops), speedup]);
        }
        None => c.extend(["(not run)".into(), "-".into(), "-".into(), "-".into()]),
    }
    c
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn sample_row() -> Row {
        Row {
            config: "iha-local".into(),
            implementation: "headmix fused".into(),
            backend: "cpu".into(),
            device: "test device".into(),
            driver: "-".into(),
            dtype: "bf16".into(),
            batch: 2,
            n: 64,
            m: 64,
            heads: 4,
            q_heads: 4,
            kv_heads: 4,
            pseudo: 2,
            head_dim: 32,
            causal: true,
            window: Some([32, 0]),
            flops: 1.5e6,
            bytes: 1024.0,
            clock: "wall clock".into(),
            seconds: vec![0.25, 0.5, 0.125],
            median_s: 0.25,
            tflops: 6e-6,
            gb_s: 4.096e-6,
            pct_peak_flops: None,
            pct_peak_bw: None,
            extra_bytes: None,
            unfused: Some(UnfusedResult {
                complete: true,
                median_s: 0.75,
                extra_bytes: 4096,
                stages: vec![StageResult {
                    name: "attention".into(),
                    place: "cpu".into(),
                    clock: "wall clock".into(),
                    median_s: 0.75,
                    seconds: vec![0.75],
                }],
            }),
            speedup_vs_unfused: Some(3.0),
            decode: None,
        }
    }

    pub(crate) fn sample_decode_row() -> Row {
        Row {
            config: "iha".into(),
            n: 1,
            m: 1024,
            window: None,
            bytes: 2.0 * 8.0 * 1024.0 * 4.0 * 32.0 * 2.0 + 2.0 * 8.0 * 4.0 * 32.0 * 2.0,
            unfused: None,
            speedup_vs_unfused: None,
            batch: 8,
            decode: Some(DecodeInfo {
                tokens: 1024,
                layout: "linear".into(),
                cache_read_bytes: 2.0 * 8.0 * 1024.0 * 4.0 * 32.0 * 2.0,
                cache_bytes: 2 * 8 * 1024 * 4 * 32 * 2,
                unfused_cache_bytes: 2 * 2 * 8 * 1024 * 4 * 32 * 2,
                cache_ratio: 2.0,
            }),
            ..sample_row()
        }
    }

    #[test]
    fn json_round_trip() {
        let mut r = Report::new("test", "quick");
        r.backends.push(BackendInfo {
            backend: "cpu".into(),
            device: "test device".into(),
            driver: "-".into(),
            describe: vec![("threads".into(), "2".into())],
        });
        r.skipped.push(Skipped { backend: "cuda".into(), why: "absent".into() });
        r.results.push(sample_row());
        let mut mha = sample_row();
        mha.config = "mha".into();
        mha.window = None;
        mha.unfused = None;
        mha.speedup_vs_unfused = None;
        r.results.push(mha);
        r.results.push(sample_decode_row());
        let back = Report::from_json(&r.to_json()).unwrap();
        assert_eq!(back, r);
        assert_eq!(back.schema, SCHEMA);
        // Absent optional fields read as null: a peers file may leave out `unfused` and `skipped`.
        let mut v: serde_json::Value = serde_json::from_str(&r.to_json()).unwrap();
        v.as_object_mut().unwrap().remove("skipped");
        v["results"][1].as_object_mut().unwrap().remove("unfused");
        // Reports written before decode rows existed (and peers files) have no `decode` field.
        v["results"][0].as_object_mut().unwrap().remove("decode");
        let back = Report::from_json(&v.to_string()).unwrap();
        assert!(back.skipped.is_empty() && back.results[1].unfused.is_none());
        assert!(back.results[0].decode.is_none() && back.results[2].decode.as_ref().unwrap().cache_ratio == 2.0);
    }

    #[test]
    fn loader_rejects_other_schemas_and_garbage() {
        let mut r = Report::new("test", "quick");
        r.schema = "something-else/9".into();
        assert!(Report::from_json(&r.to_json()).unwrap_err().contains("schema"));
        assert!(Report::from_json("{\"schema\": 3}").is_err());
        assert!(Report::from_json("not json").is_err());
    }

    #[test]
    fn table_and_formats() {
        let rows = vec![sample_row()];
        let t = table(&rows);
        assert!(t.contains("iha-local") && t.contains("250.00 ms") && t.contains("3.00x"));
        assert!(legend(&rows).contains("attention on cpu"));
        assert!(!legend(&rows).contains("lower bound"));
        // A device row whose unfused pipeline was only timed at its attention stage: ">=".
        let mut device = sample_row();
        device.backend = "cuda".into();
        device.unfused.as_mut().unwrap().complete = false;
        let rows = vec![device];
        assert!(table(&rows).contains(">=3.00x"));
        assert!(legend(&rows).contains("lower bound") && legend(&rows).contains("cuda backend: unfused = attention"));
        // Decode rows go to their own table, not the forward one.
        let rows = vec![sample_row(), sample_decode_row()];
        assert_eq!(table(&rows).lines().count(), 3);
        let t = decode_table(&rows);
        assert_eq!(t.lines().count(), 3, "{t}");
        assert!(
            t.contains("1024 linear") && t.contains("2.00x") && t.contains("4.0 MiB") && t.contains("8.0 MiB"),
            "{t}"
        );
        assert!(decode_legend(&rows).contains("B·held·Hk·d·2"));
        assert!(!decode_legend(&rows).contains("host-resident"));
        let mut device = sample_decode_row();
        device.clock = "wall clock (host-resident cache)".into();
        assert!(decode_legend(&[device]).contains("host-resident cache:"));
        assert_eq!(fmt_time(2.5e-6), "2.50 µs");
        assert_eq!(fmt_sig(123.456), "123");
        assert_eq!(fmt_sig(0.0012345), "0.00123");
        assert_eq!(fmt_bytes(512), "512 B");
        assert_eq!(fmt_bytes(3 * 1024 * 1024), "3.0 MiB");
    }

    #[test]
    fn side_by_side_matches_by_configuration_and_size() {
        let ours = vec![sample_row()];
        let mut peers = Report::new("peers", "quick");
        let mut p = sample_row();
        p.implementation = "torch flex_attention".into();
        p.backend = "torch".into();
        p.median_s = 0.5;
        p.unfused = None;
        peers.results.push(p.clone());
        let mut other = p;
        other.n = 128;
        peers.results.push(other);
        let text = side_by_side(&ours, &peers);
        assert!(text.contains("2.00x"), "{text}");
        assert!(text.contains("(not run)"), "{text}");
    }
}
