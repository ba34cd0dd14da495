//! The `headmix` command line: one file per subcommand (`info`, `run`, `bench`, `compress`, `kernels`), each
//! a `clap` derive struct with its own `main`. A new subcommand is a new file and one line in
//! [`Command`].

use clap::{CommandFactory, Parser, Subcommand};

mod bench;
mod compress;
mod flags;
mod info;
mod kernels;
mod ptxas;
mod run;
mod run_backward;

/// headmix: fused head-mixing attention (IHA, MEA, GQA, MHA) on CUDA, wgpu or the CPU.
#[derive(Parser)]
#[command(name = "headmix", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Backends and devices found, and their limits.
    Info,
    /// One forward pass on the best (or a chosen) backend, checked against the f64 reference and timed.
    Run(run::Args),
    /// Benchmark sweeps: table, JSON, SVG, PyTorch peers side by side.
    Bench(bench::Args),
    /// MEA KV-cache compression of the k/v projections in a safetensors file.
    Compress(compress::Args),
    /// CUDA kernel variants: registers, occupancy, counted cost (a model), the exact NVRTC source.
    Kernels(Box<kernels::Args>),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

/// A failed command: one line on stderr, exit code 2.
pub type Result<T = ()> = std::result::Result<T, String>;

fn main() {
    // Mesa's Vulkan drivers print "error: XDG_RUNTIME_DIR is invalid" on headless machines when
    // the variable is unset; give them a harmless value. Done first, before any thread exists.
    if std::env::var_os("XDG_RUNTIME_DIR").is_none() {
        // SAFETY: single-threaded at this point; nothing else reads the environment concurrently.
        unsafe { std::env::set_var("XDG_RUNTIME_DIR", std::env::temp_dir()) };
    }
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind::{DisplayHelp, DisplayHelpOnMissingArgumentOrSubcommand, DisplayVersion};
            if matches!(e.kind(), DisplayHelp | DisplayVersion | DisplayHelpOnMissingArgumentOrSubcommand) {
                e.exit();
            }
            // One line naming the flag and what it takes: clap's message without usage and tips.
            let text = e.render().to_string();
            let message = text
                .lines()
                .take_while(|l| !l.starts_with("Usage:"))
                .filter(|l| !l.trim_start().starts_with("tip:") && !l.starts_with("For more information"));
            eprintln!("{}", message.map(str::trim).filter(|l| !l.is_empty()).collect::<Vec<_>>().join(" "));
            std::process::exit(2);
        }
    };
    let result = match cli.command {
        Command::Info => info::main(),
        Command::Run(args) => run::main(args),
        Command::Bench(args) => bench::main(args),
        Command::Compress(args) => compress::main(args),
        Command::Kernels(args) => kernels::main(*args),
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "headmix", &mut std::io::stdout());
            Ok(())
        }
    };
    if let Err(e) = result {
        eprintln!("error: {}", e.lines().next().unwrap_or_default());
        std::process::exit(2);
    }
}
