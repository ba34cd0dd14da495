//! Facts recorded with every report: git commit and UTC date of the run.

use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

/// The workspace this crate was built from (a git checkout, unless the binary moved).
const SOURCE_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");

/// The paths whose changes alter what the benchmarks measure.
const MEASURED_PATHS: [&str; 8] =
    ["host", "reference", "bench", "cli", "kernels-cuda", "kernels-wgsl", "Cargo.toml", "Cargo.lock"];

fn git(args: &[&str]) -> Option<std::process::Output> {
    Command::new("git").arg("-C").arg(SOURCE_DIR).args(args).output().ok()
}

/// `git rev-parse --short HEAD` of the source tree at run time, with `-dirty` when tracked files of
/// the measured code (host, reference, bench, cli, kernels, manifests) differ from it; `"unknown"`
/// outside a git checkout.
pub fn git_commit() -> String {
    let Some(hash) = git(&["rev-parse", "--short", "HEAD"])
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
    else {
        return "unknown".into();
    };
    let mut args = vec!["diff", "--quiet", "HEAD", "--"];
    args.extend(MEASURED_PATHS);
    let dirty = git(&args).is_some_and(|o| o.status.code() == Some(1));
    if dirty { hash + "-dirty" } else { hash }
}

/// The 1, 5 and 15 minute load averages of the host (Linux `/proc/loadavg`), `None` elsewhere.
pub fn load_average() -> Option<[f64; 3]> {
    let text = std::fs::read_to_string("/proc/loadavg").ok()?;
    let mut it = text.split_whitespace().map(|x| x.parse::<f64>().ok());
    Some([it.next()??, it.next()??, it.next()??])
}

/// The current UTC time as ISO 8601, e.g. `2026-11-23T08:40:53Z`.
pub fn utc_now() -> String {
    let secs = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    utc_iso8601(secs)
}

/// Seconds since the Unix epoch as ISO 8601 UTC (proleptic Gregorian calendar).
pub fn utc_iso8601(secs: u64) -> String {
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + (month <= 2) as i64;
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem / 60 % 60, rem % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_in_utc() {
        assert_eq!(utc_iso8601(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc_iso8601(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(utc_iso8601(1_709_251_199), "2024-02-29T23:59:59Z");
        assert_eq!(utc_iso8601(1_798_761_600), "2027-01-01T00:00:00Z");
        assert!(utc_now().ends_with('Z'));
    }

    #[test]
    fn load_average_reads_three_numbers_on_linux() {
        if cfg!(target_os = "linux") {
            assert!(load_average().unwrap().iter().all(|x| x.is_finite() && *x >= 0.0));
        }
    }

    #[test]
    fn commit_is_a_hash_or_unknown() {
        let c = git_commit();
        let hash = c.strip_suffix("-dirty").unwrap_or(&c);
        assert!(c == "unknown" || (hash.len() >= 7 && hash.chars().all(|x| x.is_ascii_hexdigit())), "{c}");
    }
}
