//! `headmix compress`: MEA KV-cache compression of a model's key/value projections
//! (the logic and the accepted layouts are in `headmix::compress`; `--help` prints them).

/// Run `headmix compress ARGS` (the arguments after `compress`); prints the per-layer report.
pub fn main(args: &[String]) -> Result<(), String> {
    let text = headmix::compress::run_cli(args).map_err(|e| e.to_string())?;
    print!("{text}");
    Ok(())
}
