//! `headmix compress`: MEA KV-cache compression of a model's key/value projections (the logic
//! and the accepted layouts are in `headmix::compress`).

use std::path::PathBuf;

use crate::flags::{self, MAX};

#[derive(clap::Args)]
#[command(allow_negative_numbers = true, after_help = headmix::compress::HELP)]
pub struct Args {
    /// The safetensors file holding `<prefix>.k_proj` / `<prefix>.v_proj` tensors
    #[arg(long, value_name = "PATH")]
    input: PathBuf,
    /// Where to write the compressed projections
    #[arg(long, value_name = "PATH")]
    output: PathBuf,
    /// Stored key/value components Hk, in 1..=H
    #[arg(long, value_parser = flags::count(1, MAX))]
    rank: usize,
    /// Heads H of [H*d, D] projections, in 1..=2^31-1
    #[arg(long, value_parser = flags::count(1, MAX))]
    heads: Option<usize>,
}

/// Run `headmix compress`; prints the per-layer report.
pub fn main(a: Args) -> crate::Result {
    let reports = headmix::compress::compress_file(&a.input, &a.output, a.rank, a.heads).map_err(|e| e.to_string())?;
    for r in &reports {
        println!("{r}");
    }
    println!("wrote {} layers to {}", reports.len(), a.output.display());
    Ok(())
}
