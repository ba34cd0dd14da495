//! The benchmark report: JSON (schema `headmix-bench/1`, documented field by field in
//! `bench/README.md`), the readable tables, and the side-by-side comparison with the peers.

use comfy_table::{CellAlignment, Table, presets};
use serde::{Deserialize, Serialize};

use crate::count::{H100, H200};
use crate::sweep::Case;

/// The schema tag every report carries.
pub const SCHEMA: &str = "headmix-bench/1";
/// What the fused rows' `implementation` says.
pub const FUSED: &str = "headmix fused";

/// One benchmark run: where and when it ran, and one row per (case, implementation, backend).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub schema: String,
    /// What wrote the report: `headmix bench`, `bench/peers/peers.py`.
    pub source: String,
    pub sweep: String,
    /// `git rev-parse --short HEAD` (`-dirty` with uncommitted changes to measured code), or `unknown`.
    pub git_commit: String,
    /// Start of the run, ISO 8601 UTC.
    pub date_utc: String,
    /// The host's 1, 5 and 15 minute load averages at the start (`null` where unknown).
    #[serde(default)]
    pub load_average: Option<[f64; 3]>,
    pub ceilings: Vec<Ceiling>,
    pub backends: Vec<BackendInfo>,
    #[serde(default)]
    pub skipped: Vec<Skipped>,
    pub results: Vec<Row>,
    #[serde(default)]
    pub errors: Vec<CaseError>,
}

/// Measured ceilings of one device, used only as denominators.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Ceiling {
    pub device: String,
    pub dense_bf16_tflops: f64,
    pub copy_tb_s: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BackendInfo {
    pub backend: String,
    pub device: String,
    pub driver: String,
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
    pub case: String,
    pub why: String,
}

/// One timed case (fields in `bench/README.md`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Row {
    pub config: String,
    pub implementation: String,
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
    pub window: Option<[usize; 2]>,
    pub flops: f64,
    pub bytes: f64,
    pub clock: String,
    pub seconds: Vec<f64>,
    pub median_s: f64,
    pub tflops: f64,
    pub gb_s: f64,
    pub pct_peak_flops: Option<f64>,
    pub pct_peak_bw: Option<f64>,
    pub extra_bytes: Option<u64>,
    #[serde(default)]
    pub unfused: Option<UnfusedResult>,
    #[serde(default)]
    pub speedup_vs_unfused: Option<f64>,
    #[serde(default)]
    pub decode: Option<DecodeInfo>,
}

/// The KV cache of a decode row (the bandwidth fields are optional: older reports load).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DecodeInfo {
    pub tokens: usize,
    pub layout: String,
    /// Counted by the backend: each visible held token's stored heads, keys and values, once.
    pub cache_read_bytes: f64,
    #[serde(default)]
    pub cache_gb_s: Option<f64>,
    /// Percent of the H200's measured 4.3 TB/s copy bandwidth.
    #[serde(default)]
    pub pct_copy_bw: Option<f64>,
    /// Counted roofline: `cache_read_bytes / 4.3 TB/s`.
    #[serde(default)]
    pub roofline_s: Option<f64>,
    pub cache_bytes: u64,
    pub unfused_cache_bytes: u64,
    pub cache_ratio: f64,
}

/// The unfused pipeline (mix, attention with `P = 1` over `N·P` tokens, collapse).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct UnfusedResult {
    /// Whether every stage was timed (false on device backends: only the attention stage is).
    pub complete: bool,
    pub median_s: f64,
    pub extra_bytes: u64,
    pub stages: Vec<StageResult>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StageResult {
    pub name: String,
    pub place: String,
    pub clock: String,
    pub median_s: f64,
    pub seconds: Vec<f64>,
}

/// Median of the samples (mean of the middle two for an even count); `NaN` when empty.
pub fn median(xs: &[f64]) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => 0.5 * (v[n / 2 - 1] + v[n / 2]),
    }
}

/// `git rev-parse --short HEAD` of the source tree, with `-dirty` when tracked files of the
/// measured code differ from it; `unknown` outside a git checkout.
pub fn git_commit() -> String {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let git = |args: &[&str]| std::process::Command::new("git").arg("-C").arg(dir).args(args).output().ok();
    let hash = git(&["rev-parse", "--short", "HEAD"])
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    let Some(hash) = hash.filter(|h| !h.is_empty()) else { return "unknown".into() };
    let measured = ["host", "reference", "bench", "cli", "kernels-cuda", "kernels-wgsl", "Cargo.toml", "Cargo.lock"];
    let dirty =
        git(&[&["diff", "--quiet", "HEAD", "--"][..], &measured].concat()).is_some_and(|o| o.status.code() == Some(1));
    if dirty { hash + "-dirty" } else { hash }
}

impl Report {
    /// An empty report stamped with the commit, date and host load of now.
    pub fn new(source: &str, sweep: &str) -> Report {
        let load = std::fs::read_to_string("/proc/loadavg").ok().and_then(|t| {
            let x: Vec<f64> = t.split_whitespace().take(3).filter_map(|x| x.parse().ok()).collect();
            x.try_into().ok()
        });
        Report {
            schema: SCHEMA.into(),
            source: source.into(),
            sweep: sweep.into(),
            git_commit: git_commit(),
            date_utc: jiff::Timestamp::now()
                .round(jiff::Unit::Second)
                .map_or_else(|_| "unknown".into(), |t| t.to_string()),
            load_average: load,
            ceilings: [H100, H200]
                .map(|p| Ceiling { device: p.device.into(), dense_bf16_tflops: p.tflops, copy_tb_s: p.tb_s })
                .to_vec(),
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
    pub fn same_case(&self, o: &Row) -> bool {
        let sizes = |r: &Row| [r.batch, r.n, r.m, r.heads, r.q_heads, r.kv_heads, r.pseudo, r.head_dim];
        (&self.config, &self.dtype, self.causal, self.window, sizes(self))
            == (&o.config, &o.dtype, o.causal, o.window, sizes(o))
    }
}

/// `4.5 ns`, `1.23 µs`, `4.56 ms`, `7.89 s`.
pub fn fmt_time(s: f64) -> String {
    match s {
        s if !s.is_finite() => "-".into(),
        s if s < 1e-6 => format!("{:.1} ns", s * 1e9),
        s if s < 1e-3 => format!("{:.2} µs", s * 1e6),
        s if s < 1.0 => format!("{:.2} ms", s * 1e3),
        s => format!("{s:.2} s"),
    }
}

/// Three significant digits (small CPU throughputs stay readable: `0.00123`, not `0.000`).
pub fn fmt_sig(x: f64) -> String {
    let digits = (2 - x.abs().log10().floor() as i32).clamp(0, 12) as usize;
    match x {
        x if !x.is_finite() => "-".into(),
        x if x == 0.0 => "0".into(),
        x => format!("{x:.digits$}"),
    }
}

/// Bytes in binary units.
pub fn fmt_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let unit = ((64 - b.leading_zeros()).saturating_sub(1) / 10).min(4) as usize;
    if unit == 0 { format!("{b} B") } else { format!("{:.1} {}", b as f64 / (1u64 << (10 * unit)) as f64, UNITS[unit]) }
}

/// A markdown table of `|`-separated `header` names, the first `left` columns left-aligned, the
/// rest right-aligned.
pub fn layout(header: &str, left: usize, rows: Vec<Vec<String>>) -> String {
    let mut t = Table::new();
    t.load_style(presets::ASCII_MARKDOWN).set_header(header.split('|').collect::<Vec<_>>());
    for r in rows {
        t.add_row(r);
    }
    for col in t.column_iter_mut().skip(left) {
        col.set_cell_alignment(CellAlignment::Right);
    }
    t.to_string() + "\n"
}

fn short(s: &str, max: usize) -> String {
    if s.chars().count() <= max { s.to_string() } else { s.chars().take(max - 1).collect::<String>() + "…" }
}

/// Configuration name with `Hk` where it differs from `H`, and the implementation when it is
/// not the fused call.
fn config_cell(r: &Row) -> String {
    let mut config = r.config.clone();
    if r.kv_heads != r.heads {
        config += &format!(" Hk={}", r.kv_heads);
    }
    if r.implementation != FUSED {
        config += &format!(" [{}]", r.implementation);
    }
    config
}

fn opt(x: Option<f64>) -> String {
    x.map_or("-".into(), fmt_sig)
}

/// The readable table of forward rows (decode rows: [`decode_table`]).
pub fn table(rows: &[Row]) -> String {
    let header = "config|backend|device|dtype|B|N|P|d|median|TFLOP/s|%peak|GB/s|%bw|vs unfused|extra mem";
    let cells = rows.iter().filter(|r| r.decode.is_none()).map(|r| {
        let speedup = match (r.speedup_vs_unfused, &r.unfused) {
            (Some(x), Some(u)) => format!("{}{x:.2}x", if u.complete { "" } else { ">=" }),
            _ => "-".into(),
        };
        let mut extra = r.extra_bytes.map_or("-".into(), fmt_bytes);
        if let Some(u) = &r.unfused {
            extra += &format!(" (unfused +{})", fmt_bytes(u.extra_bytes));
        }
        let mut c = vec![config_cell(r), r.backend.clone(), short(&r.device, 28), r.dtype.clone()];
        c.extend([r.batch, r.n, r.pseudo, r.head_dim].map(|x| x.to_string()));
        c.extend([fmt_time(r.median_s), fmt_sig(r.tflops), opt(r.pct_peak_flops), fmt_sig(r.gb_s)]);
        c.extend([opt(r.pct_peak_bw), speedup, extra]);
        c
    });
    layout(header, 3, cells.collect())
}

/// The readable table of decode rows: time against the counted roofline, cache read
/// bandwidth, cache size against unfused.
pub fn decode_table(rows: &[Row]) -> String {
    let header =
        "config|backend|device|dtype|B|L|held|P|d|median|roofline|cache read|GB/s|%copy|cache|unfused cache|smaller";
    let cells = rows.iter().filter_map(|r| r.decode.as_ref().map(|dc| (r, dc))).map(|(r, dc)| {
        let mut c = vec![config_cell(r), r.backend.clone(), short(&r.device, 28), r.dtype.clone(), r.batch.to_string()];
        c.extend([
            dc.tokens.to_string(),
            format!("{} {}", r.m, dc.layout),
            r.pseudo.to_string(),
            r.head_dim.to_string(),
        ]);
        c.extend([fmt_time(r.median_s), dc.roofline_s.map_or("-".into(), fmt_time)]);
        c.extend([fmt_bytes(dc.cache_read_bytes as u64), opt(dc.cache_gb_s), opt(dc.pct_copy_bw)]);
        c.extend([fmt_bytes(dc.cache_bytes), fmt_bytes(dc.unfused_cache_bytes), format!("{:.2}x", dc.cache_ratio)]);
        c
    });
    layout(header, 3, cells.collect())
}

/// The cache size table of decode cases: bytes held by headmix (the `Hk` stored heads) and by
/// the unfused design (the mixed heads it attends over), exact, and their ratio.
pub fn sizes_table(cases: &[Case]) -> Result<String, String> {
    let header = "config|dtype|B|L|held|H|Hk|P|d|headmix bytes|unfused bytes|headmix|unfused|smaller";
    let mut cells = Vec::new();
    for c in cases {
        let b = c.cache_bytes()?;
        let (config, held) = (c.label().split(" B=").next().unwrap_or_default().into(), c.held()?);
        let mut row = vec![config, c.dtype.name().into(), c.batch.to_string(), c.m.to_string()];
        row.push(format!("{held} {}", c.layout_name()));
        row.extend([c.heads, c.kv_heads, c.pseudo, c.head_dim, b.headmix, b.unfused].map(|x| x.to_string()));
        row.extend([fmt_bytes(b.headmix as u64), fmt_bytes(b.unfused as u64), format!("{:.2}x", b.ratio())]);
        cells.push(row);
    }
    Ok(layout(header, 2, cells))
}

/// What the forward table's columns mean and where the unfused stages ran.
pub fn legend(rows: &[Row]) -> String {
    let mut s =
        String::from("TFLOP/s = 4·B·H·d·visible pairs / median; GB/s = (q, k, v read + out written) / median.\n");
    let peaks = [H100, H200].map(|p| format!("{}: {} TFLOP/s dense bf16, {} TB/s copy", p.device, p.tflops, p.tb_s));
    s += &format!(
        "%peak, %bw: percent of the device's measured ceilings ({}), used only as denominators; '-' where none is known.\n",
        peaks.join("; ")
    );
    s += "extra mem: device memory beyond inputs and outputs ('-': not tracked, the CPU's host buffers).\n";
    // Per backend, every stage its unfused pipelines had, in pipeline order.
    let mut backends: Vec<(&str, Vec<String>, bool)> = Vec::new();
    for (r, u) in rows.iter().filter_map(|r| r.unfused.as_ref().map(|u| (r, u))) {
        let stages = u.stages.iter().map(|st| format!("{} on {} ({})", st.name, st.place, st.clock));
        match backends.iter_mut().find(|b| b.0 == r.backend) {
            Some(b) => b.1.extend(stages),
            None => backends.push((&r.backend, stages.collect(), u.complete)),
        }
    }
    if backends.is_empty() {
        return s;
    }
    s += "vs unfused = unfused pipeline time / fused time. Unfused = mix (materialise qt, kt, vt) + attention with P = 1 over N·P tokens + collapse/norm:\n";
    for (backend, mut stages, complete) in backends {
        stages.sort_by_key(|d| ["mix", "attention", "collapse"].iter().position(|s| d.starts_with(s)));
        stages.dedup();
        s += &format!("  {backend} backend: unfused = {}{}\n", stages.join(" + "), if complete { "" } else { " only" });
    }
    s += "  host stages run in f32 on the host's cores (the reference's mix and collapse).\n";
    if rows.iter().any(|r| r.unfused.as_ref().is_some_and(|u| !u.complete)) {
        s += "  \">=\": a lower bound; on devices only the attention stage is timed (mix and collapse have no device op).\n";
    }
    s
}

/// What the decode table's columns mean.
pub fn decode_legend(rows: &[Row]) -> String {
    let mut clocks: Vec<&str> = rows.iter().map(|r| r.clock.as_str()).collect();
    clocks.sort();
    clocks.dedup();
    format!(
        "decode: one new token per sequence against a cache of L tokens on the backend's device (held: tokens the cache keeps; a ring keeps IHA local's window and the new token), timed by {}.\n\
         cache read: bytes of stored heads one call reads (counted by the backend: each visible held token's keys and values, once; pseudo-heads are mixed on chip); GB/s = cache read / median.\n\
         %copy: percent of {}'s measured {} TB/s copy bandwidth; roofline = cache read / {} TB/s (counted, not measured).\n\
         cache / unfused cache: bytes held by headmix (Hk stored heads) and by the unfused design (the H·P mixed heads it attends over; Hk for MHA/GQA); smaller = their ratio.\n",
        clocks.join(", "),
        H200.device,
        H200.tb_s,
        H200.tb_s
    )
}

/// headmix rows and a peers report side by side, matched by configuration and size.
pub fn side_by_side(ours: &[Row], peers: &Report) -> String {
    let mut s = format!("peers: {}\n", peers.header());
    for b in &peers.backends {
        s += &format!("  {}: {} ({})\n", b.backend, b.device, b.driver);
    }
    let header = "config|peer|peer device|dtype|B|N|P|d|peer median|peer TFLOP/s|headmix|headmix median|headmix TFLOP/s|headmix speed-up";
    let mut cells = Vec::new();
    for p in &peers.results {
        let config = config_cell(&Row { implementation: FUSED.into(), ..p.clone() });
        let mut c = vec![config, p.implementation.clone(), short(&p.device, 24), p.dtype.clone()];
        c.extend([p.batch, p.n, p.pseudo, p.head_dim].map(|x| x.to_string()));
        c.extend([fmt_time(p.median_s), fmt_sig(p.tflops)]);
        let mine: Vec<&Row> =
            ours.iter().filter(|r| r.same_case(p) && r.implementation == FUSED && r.decode.is_none()).collect();
        if mine.is_empty() {
            cells.push([c.clone(), ["(not run)", "-", "-", "-"].map(String::from).to_vec()].concat());
        }
        for m in mine {
            let ok = m.median_s > 0.0 && p.median_s > 0.0;
            let speedup = if ok { format!("{:.2}x", p.median_s / m.median_s) } else { "-".into() };
            cells.push([c.clone(), vec![m.backend.clone(), fmt_time(m.median_s), fmt_sig(m.tflops), speedup]].concat());
        }
    }
    s + &layout(header, 3, cells)
}
