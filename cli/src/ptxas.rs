//! ptxas, when present: registers, stack frame and spills of a kernel's PTX without a GPU.
//!
//! Looked for in `HEADMIX_PTXAS`, then `PATH`, then the pip wheel `nvidia-cuda-nvcc` that
//! `sass-report` installs under `~/.cache/headmix-sass-tools`. Nothing is installed here.

use std::path::{Path, PathBuf};
use std::process::Command;

/// What `ptxas -v` says about one entry function.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PtxasInfo {
    pub registers: u32,
    /// Stack frame of the entry, bytes.
    pub stack: u32,
    pub spill_stores: u32,
    pub spill_loads: u32,
    /// Static shared memory, bytes.
    pub smem: u32,
}

/// The ptxas binary, if one is found.
pub fn find() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("HEADMIX_PTXAS").map(PathBuf::from) {
        return p.is_file().then_some(p);
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let p = dir.join("ptxas");
            if p.is_file() {
                return Some(p);
            }
        }
    }
    let home = std::env::var_os("HOME").map(PathBuf::from)?;
    find_under(&home.join(".cache/headmix-sass-tools"), 6)
}

/// `bin/ptxas` somewhere below `dir` (at most `depth` levels).
fn find_under(dir: &Path, depth: usize) -> Option<PathBuf> {
    let p = dir.join("bin/ptxas");
    if p.is_file() {
        return Some(p);
    }
    if depth == 0 {
        return None;
    }
    let mut entries: Vec<_> = std::fs::read_dir(dir).ok()?.filter_map(|e| e.ok()).map(|e| e.path()).collect();
    entries.sort();
    entries.into_iter().filter(|e| e.is_dir()).find_map(|e| find_under(&e, depth - 1))
}

/// The first line of `ptxas --version`'s last line (e.g. `Cuda compilation tools, release 13.0, V13.0.88`).
pub fn version(ptxas: &Path) -> String {
    Command::new(ptxas)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).lines().last().map(str::to_string))
        .unwrap_or_else(|| "?".into())
}

/// Assemble `ptx` for `arch` with `ptxas -v` and read the figures of `entry`.
pub fn run(ptxas: &Path, ptx: &str, arch: &str, entry: &str) -> Result<PtxasInfo, String> {
    let dir = std::env::temp_dir().join(format!("headmix-ptxas-{}-{entry}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let (src, cubin) = (dir.join("k.ptx"), dir.join("k.cubin"));
    std::fs::write(&src, ptx).map_err(|e| format!("{}: {e}", src.display()))?;
    let out = Command::new(ptxas)
        .arg(format!("-arch={arch}"))
        .arg("-v")
        .arg(&src)
        .arg("-o")
        .arg(&cubin)
        .output()
        .map_err(|e| format!("running {}: {e}", ptxas.display()));
    let _ = std::fs::remove_dir_all(&dir);
    let out = out?;
    let log = String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(format!("ptxas failed: {}", log.trim()));
    }
    parse(&log, entry).ok_or_else(|| format!("no figures for {entry} in the ptxas log:\n{log}"))
}

/// The number before `word` in `line` (`"184 bytes stack frame"`, `"bytes stack"` -> 184).
fn number_before(line: &str, word: &str) -> Option<u32> {
    let at = line.find(word)?;
    line[..at].split_whitespace().last()?.parse().ok()
}

/// Read the figures of `entry` from a `ptxas -v` log:
/// ```text
/// ptxas info    : Function properties for hm_attn_v2
///     184 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
/// ptxas info    : Used 255 registers, used 1 barriers, 184 bytes cumulative stack size, 552 bytes cmem[0]
/// ```
pub fn parse(log: &str, entry: &str) -> Option<PtxasInfo> {
    let lines: Vec<&str> = log.lines().collect();
    let start =
        lines.iter().position(|l| l.contains("Compiling entry function") && l.contains(&format!("'{entry}'")))?;
    let mut info = PtxasInfo::default();
    let mut in_entry_props = false;
    let mut used = false;
    for line in &lines[start + 1..] {
        if line.contains("Compiling entry function") {
            break;
        }
        if line.contains("Function properties for") {
            in_entry_props = line.trim_end().ends_with(&format!("for {entry}"));
            continue;
        }
        if in_entry_props && line.contains("bytes stack frame") {
            info.stack = number_before(line, "bytes stack frame")?;
            info.spill_stores = number_before(line, "bytes spill stores")?;
            info.spill_loads = number_before(line, "bytes spill loads")?;
            in_entry_props = false;
        }
        if line.contains("Used") && line.contains("registers") {
            info.registers = number_before(line, "registers")?;
            info.smem = number_before(line, "bytes smem").unwrap_or(0);
            used = true;
        }
    }
    used.then_some(info)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOG: &str = "\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'hm_attn_v2' for 'sm_90'
ptxas info    : Function properties for v2_mix_tile
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Function properties for hm_attn_v2
    184 bytes stack frame, 12 bytes spill stores, 8 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 184 bytes cumulative stack size, 16 bytes smem, 552 bytes cmem[0]
ptxas info    : Compiling entry function 'other' for 'sm_90'
ptxas info    : Function properties for other
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 20 registers, used 0 barriers, 552 bytes cmem[0]
";

    #[test]
    fn reads_the_entry_functions_figures() {
        let i = parse(LOG, "hm_attn_v2").unwrap();
        assert_eq!(i, PtxasInfo { registers: 255, stack: 184, spill_stores: 12, spill_loads: 8, smem: 16 });
        let o = parse(LOG, "other").unwrap();
        assert_eq!((o.registers, o.stack, o.smem), (20, 0, 0));
        assert_eq!(parse(LOG, "missing"), None);
    }
}
