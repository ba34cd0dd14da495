//! Tests of `bench/src/report.rs`.

use headmix_bench::report::*;

pub fn sample_row() -> Row {
    let stage = StageResult {
        name: "attention".into(),
        place: "cpu".into(),
        clock: "wall clock".into(),
        median_s: 0.75,
        seconds: vec![0.75],
    };
    Row {
        config: "iha-local".into(),
        implementation: FUSED.into(),
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
        unfused: Some(UnfusedResult { complete: true, median_s: 0.75, extra_bytes: 4096, stages: vec![stage] }),
        speedup_vs_unfused: Some(3.0),
        decode: None,
    }
}

pub fn sample_decode_row() -> Row {
    let read = 2.0 * 8.0 * 1024.0 * 4.0 * 32.0 * 2.0;
    Row {
        config: "iha".into(),
        n: 1,
        m: 1024,
        window: None,
        bytes: read + 2.0 * 8.0 * 4.0 * 32.0 * 2.0,
        unfused: None,
        speedup_vs_unfused: None,
        batch: 8,
        decode: Some(DecodeInfo {
            tokens: 1024,
            layout: "linear".into(),
            cache_read_bytes: read,
            cache_gb_s: Some(read / 0.25 / 1e9),
            pct_copy_bw: Some(100.0 * read / 0.25 / 4.3e12),
            roofline_s: Some(read / 4.3e12),
            cache_bytes: read as u64,
            unfused_cache_bytes: 2 * read as u64,
            cache_ratio: 2.0,
        }),
        ..sample_row()
    }
}

#[test]
fn json_round_trip_and_optional_fields() {
    let mut r = Report::new("test", "quick");
    r.backends.push(BackendInfo {
        backend: "cpu".into(),
        device: "test device".into(),
        driver: "-".into(),
        describe: vec![("threads".into(), "2".into())],
    });
    r.skipped.push(Skipped { backend: "cuda".into(), why: "absent".into() });
    let mha = Row { config: "mha".into(), window: None, unfused: None, speedup_vs_unfused: None, ..sample_row() };
    r.results.extend([sample_row(), mha, sample_decode_row()]);
    let back = Report::from_json(&r.to_json()).unwrap();
    assert_eq!((back.schema.as_str(), &back), (SCHEMA, &r));
    assert!(r.date_utc.ends_with('Z') && r.date_utc.len() == 20, "{}", r.date_utc);
    // Absent optional fields read as null: a peers file may leave out `unfused`, `skipped`, `decode`.
    let mut v: serde_json::Value = serde_json::from_str(&r.to_json()).unwrap();
    v.as_object_mut().unwrap().remove("skipped");
    v["results"][1].as_object_mut().unwrap().remove("unfused");
    v["results"][0].as_object_mut().unwrap().remove("decode");
    let back = Report::from_json(&v.to_string()).unwrap();
    assert!(back.skipped.is_empty() && back.results[1].unfused.is_none());
    assert!(back.results[0].decode.is_none() && back.results[2].decode.as_ref().unwrap().cache_ratio == 2.0);
    // Other schemas and garbage are refused.
    r.schema = "something-else/9".into();
    assert!(Report::from_json(&r.to_json()).unwrap_err().contains("schema"));
    assert!(Report::from_json("{\"schema\": 3}").is_err() && Report::from_json("not json").is_err());
    let c = git_commit();
    let hash = c.strip_suffix("-dirty").unwrap_or(&c);
    assert!(c == "unknown" || (hash.len() >= 7 && hash.chars().all(|x| x.is_ascii_hexdigit())), "{c}");
}

#[test]
fn tables_legends_and_formats() {
    let rows = vec![sample_row()];
    let t = table(&rows);
    assert!(t.contains("iha-local") && t.contains("250.00 ms") && t.contains("3.00x"), "{t}");
    assert!(legend(&rows).contains("attention on cpu") && !legend(&rows).contains("lower bound"));
    // A device row whose unfused pipeline was only timed at its attention stage: ">=".
    let mut device = sample_row();
    device.backend = "cuda".into();
    device.unfused.as_mut().unwrap().complete = false;
    assert!(table(std::slice::from_ref(&device)).contains(">=3.00x"));
    let l = legend(&[device]);
    assert!(l.contains("lower bound") && l.contains("cuda backend: unfused = attention"), "{l}");
    // Decode rows go to their own table, not the forward one.
    let rows = vec![sample_row(), sample_decode_row()];
    assert_eq!(table(&rows).lines().count(), 3);
    let t = decode_table(&rows);
    assert_eq!(t.lines().count(), 3, "{t}");
    assert!(t.contains("1024 linear") && t.contains("2.00x") && t.contains("4.0 MiB") && t.contains("8.0 MiB"), "{t}");
    // The counted roofline (bytes / 4.3 TB/s) beside the median: 4 MiB / 4.3 TB/s = 975.4 ns.
    assert!(t.contains("975.4 ns") && t.contains("roofline") && t.contains("%copy"), "{t}");
    let l = decode_legend(&rows);
    assert!(l.contains("4.3 TB/s") && l.contains("timed by wall clock"), "{l}");
    // A report written before the bandwidth fields existed still loads (they read as null).
    let mut v = serde_json::to_value(sample_decode_row()).unwrap();
    v["decode"]
        .as_object_mut()
        .unwrap()
        .retain(|k, _| !["cache_gb_s", "pct_copy_bw", "roofline_s"].contains(&k.as_str()));
    let old: Row = serde_json::from_value(v).unwrap();
    assert!(old.decode.as_ref().unwrap().roofline_s.is_none() && decode_table(&[old]).contains(" - "));
    let sizes = sizes_table(&headmix_bench::sweep::issue_size_cases()).unwrap();
    assert_eq!(sizes.lines().count(), 2 + headmix_bench::sweep::issue_size_cases().len());
    assert!(sizes.contains("2147483648") && sizes.contains("2.0 GiB") && sizes.contains("4097 ring"), "{sizes}");
    assert_eq!(
        (fmt_time(2.5e-6) + &fmt_time(4.25e-9), fmt_sig(123.456), fmt_sig(0.0012345), fmt_sig(3.2e-9)),
        ("2.50 µs4.2 ns".into(), "123".into(), "0.00123".into(), "0.00000000320".into())
    );
    assert_eq!(
        (fmt_bytes(512), fmt_bytes(3 * 1024 * 1024), fmt_bytes(1024)),
        ("512 B".into(), "3.0 MiB".into(), "1.0 KiB".into())
    );
    assert_eq!((median(&[3.0, 1.0, 2.0]), median(&[4.0, 1.0, 3.0, 2.0])), (2.0, 2.5));
    assert!(median(&[]).is_nan());
}

#[test]
fn side_by_side_matches_by_configuration_and_size() {
    let mut peers = Report::new("peers", "quick");
    let p = Row {
        implementation: "torch flex_attention".into(),
        backend: "torch".into(),
        median_s: 0.5,
        unfused: None,
        ..sample_row()
    };
    peers.results.extend([p.clone(), Row { n: 128, ..p }]);
    let text = side_by_side(&[sample_row()], &peers);
    assert!(text.contains("2.00x") && text.contains("(not run)"), "{text}");
}
