//! The SVG chart: TFLOP/s against sequence length, one panel per configuration, one line per
//! backend (and `P`, `d`, dtype, implementation). Rows that a log axis and a TFLOP/s axis cannot
//! show (`N = 0`, a non-finite or negative throughput) are left out; nothing left is an error.

use std::collections::BTreeMap;

use plotters::prelude::*;

use crate::report::Row;

/// The legend name of a row's line.
fn series_name(r: &Row) -> String {
    let mut s = r.backend.clone();
    if r.implementation != crate::report::FUSED {
        s += &format!(" [{}]", r.implementation);
    }
    if r.config.starts_with("iha") {
        s += &format!(" P={}", r.pseudo);
    }
    format!("{s} d={} {}", r.head_dim, r.dtype)
}

/// Lines of one panel: name -> points (N, TFLOP/s) sorted by N.
fn lines(rows: &[&Row]) -> BTreeMap<String, Vec<(f64, f64)>> {
    let mut out: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    for r in rows {
        out.entry(series_name(r)).or_default().push((r.n as f64, r.tflops));
    }
    for pts in out.values_mut() {
        pts.sort_by(|a, b| a.0.total_cmp(&b.0));
    }
    out
}

/// Draw `rows` into an SVG file at `path`.
pub fn svg(rows: &[Row], title: &str, path: &str) -> Result<(), String> {
    let err = |e: &dyn std::fmt::Display| format!("{path}: {e}");
    let rows: Vec<&Row> = rows.iter().filter(|r| r.n > 0 && r.tflops.is_finite() && r.tflops >= 0.0).collect();
    let mut configs: Vec<&str> = rows.iter().map(|r| r.config.as_str()).collect();
    configs.sort();
    configs.dedup();
    if configs.is_empty() {
        return Err(format!("{path}: nothing to plot (no forward row with N >= 1 and a finite TFLOP/s)"));
    }
    let cols = configs.len().min(2);
    let panel_rows = configs.len().div_ceil(cols);
    let root = SVGBackend::new(path, (640 * cols as u32, 420 * panel_rows as u32 + 40)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let root = root.titled(title, ("sans-serif", 20)).map_err(|e| err(&e))?;
    let panels = root.split_evenly((panel_rows, cols));
    for (panel, config) in panels.iter().zip(&configs) {
        let sel: Vec<&Row> = rows.iter().copied().filter(|r| r.config == *config).collect();
        let lines = lines(&sel);
        let (mut x0, mut x1) = sel.iter().fold((f64::MAX, 0f64), |(a, b), r| (a.min(r.n as f64), b.max(r.n as f64)));
        if x0 >= x1 {
            (x0, x1) = (x0 / 2.0, x1 * 2.0);
        }
        let y1 = sel.iter().map(|r| r.tflops).fold(0f64, f64::max);
        let y1 = if y1 > 0.0 { y1 * 1.15 } else { 1.0 };
        let mut chart = ChartBuilder::on(panel)
            .caption(*config, ("sans-serif", 16))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(64)
            .build_cartesian_2d((x0 * 0.9..x1 * 1.1).log_scale().base(2.0), 0f64..y1)
            .map_err(|e| err(&e))?;
        chart
            .configure_mesh()
            .x_desc("sequence length N (tokens)")
            .y_desc("TFLOP/s")
            .x_label_formatter(&|x| format!("{}", x.round() as u64))
            .y_label_formatter(&|y| crate::report::fmt_sig(*y))
            .draw()
            .map_err(|e| err(&e))?;
        for (i, (name, pts)) in lines.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            chart
                .draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2)))
                .map_err(|e| err(&e))?
                .label(name.as_str())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2)));
            chart.draw_series(pts.iter().map(|&p| Circle::new(p, 3, color.filled()))).map_err(|e| err(&e))?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(|e| err(&e))?;
    }
    root.present().map_err(|e| err(&e))?;
    Ok(())
}
