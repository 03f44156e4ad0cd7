//! `slm`: run small language models as WebAssembly components on wasmtime, with wasi:nn on tract.

mod bench;
mod cli;
mod commands;
mod completion;
mod converted;
mod devcheck;
mod nn_guest;
mod registry;
mod runtime;
mod serve;
mod stats;
mod wasi_nn;

use std::process::ExitCode;

fn main() -> ExitCode {
    // One line, never a backtrace (RUST_BACKTRACE may be set in the environment).
    std::panic::set_hook(Box::new(|info| {
        if slm_wasi_nn::panics_are_caught() {
            return; // turned into an error by the caller
        }
        let msg = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "panic".to_string());
        let at = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        eprintln!(
            "error: internal error: {}{at} (please report this bug)",
            msg.replace('\n', " ")
        );
    }));
    match commands::main() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let msg = format!("{e:#}").replace('\n', " ");
            eprintln!("error: {msg}");
            ExitCode::FAILURE
        }
    }
}
