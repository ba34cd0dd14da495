//! The `headmix` command line: `info`, `run`, `bench`, `compress`.

mod args;
mod compress;
mod info;
mod run;
mod run_backward;

const HELP: &str = "\
headmix — fused head-mixing attention (IHA, MEA, GQA, MHA) on CUDA, wgpu or the CPU

usage: headmix <command> [options]
  info     backends and devices found, and their limits
  run      one forward pass on the best (or a chosen) backend, checked and timed  (headmix run --help)
  bench    benchmark sweeps: table, JSON, SVG                                     (headmix bench --help)
  compress MEA KV-cache compression of k/v projections in a safetensors file     (headmix compress --help)";

fn main() {
    // Mesa's Vulkan drivers print "error: XDG_RUNTIME_DIR is invalid" on headless machines when
    // the variable is unset; give them a harmless value. Done first, before any thread exists.
    if std::env::var_os("XDG_RUNTIME_DIR").is_none() {
        // SAFETY: single-threaded at this point; nothing else reads the environment concurrently.
        unsafe { std::env::set_var("XDG_RUNTIME_DIR", std::env::temp_dir()) };
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    let rest = args.get(1..).unwrap_or(&[]);
    let result = match args.first().map(|s| s.as_str()) {
        Some("info") => info::main(),
        Some("run") => run::main(rest),
        Some("bench") => headmix_bench::cli::main(rest),
        Some("compress") => compress::main(rest),
        None | Some("help") | Some("--help") | Some("-h") => {
            println!("{HELP}");
            Ok(())
        }
        Some(other) => Err(format!("unknown command {other:?}\n\n{HELP}")),
    };
    if let Err(e) = result {
        eprintln!("error: {e}");
        std::process::exit(2);
    }
}
