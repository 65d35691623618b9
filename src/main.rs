//! The `unweight` command line: a thin shell over [`triton_unweight::cli`] that owns the exit
//! codes (0 success, 1 verification found differences, 2 error).

use std::process::ExitCode;

fn main() -> ExitCode {
    match triton_unweight::cli::run() {
        Ok(code) => code,
        Err(err) => {
            eprintln!("unweight: error: {err:#}");
            ExitCode::from(2)
        }
    }
}
