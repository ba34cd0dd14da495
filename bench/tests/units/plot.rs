//! Tests of `bench/src/plot.rs`.

use crate::report::sample_row;
use headmix_bench::plot::*;
use headmix_bench::report::Row;

#[test]
fn renders_an_svg_with_a_panel_per_configuration() {
    let mut rows = Vec::new();
    for (config, n, t) in [("iha", 64, 1.0), ("iha", 128, 2.0), ("mha", 64, 0.5), ("mha", 128, 0.75)] {
        let mut r = sample_row();
        r.config = config.into();
        r.n = n;
        r.tflops = t;
        rows.push(r);
    }
    let path = std::env::temp_dir().join(format!("headmix-bench-plot-{}.svg", std::process::id()));
    let path = path.to_str().unwrap();
    // Rows a log axis cannot show are left out (a row with N = 0 once hung the drawing).
    let zero = Row { n: 0, ..sample_row() };
    let nan = Row { tflops: f64::NAN, ..sample_row() };
    rows.extend([zero.clone(), nan]);
    svg(&rows, "test chart", path).unwrap();
    let text = std::fs::read_to_string(path).unwrap();
    std::fs::remove_file(path).unwrap();
    assert!(text.starts_with("<svg"), "{}", &text[..80.min(text.len())]);
    // plotters writes each text on its own line between the tags.
    for caption in ["test chart", "iha", "mha", "TFLOP/s"] {
        assert!(text.contains(&format!(">\n{caption}\n</text>")), "{caption}");
    }
    assert!(text.contains("cpu P=2 d=32 bf16"));
    assert!(text.contains("<polyline"), "lines drawn");
    assert!(svg(&[], "empty", path).is_err());
    assert!(svg(&[zero], "only N = 0", path).unwrap_err().contains("nothing to plot"));
}
