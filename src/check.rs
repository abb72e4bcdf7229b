//! `llm-edge check`: client-side diagnostics for Machine C.

use std::process::ExitCode;

use crate::cli::CheckArgs;

pub fn run(_args: &CheckArgs) -> ExitCode {
    eprintln!("llm-edge check: not implemented yet");
    ExitCode::from(2)
}
