//! `slm bench`: the benchmark's settings from the flags (model, device, how to start this program
//! again for the cold-start runs), then [`crate::bench`].

use std::path::PathBuf;

use anyhow::Result;
use slm_engine::Placement;

use crate::cli::Global;
use crate::commands::app::App;
use crate::commands::Setup;

/// `slm bench`'s own flags.
pub struct Flags<'a> {
    pub model: Option<&'a str>,
    /// `--model` as the user gave it (a GGUF file's path rather than its name).
    pub given_model: Option<&'a str>,
    pub prompt_tokens: usize,
    pub gen_tokens: u32,
    pub runs: usize,
    pub prompt_file: Option<&'a PathBuf>,
    pub json: bool,
    pub portable: bool,
}

pub fn bench(app: &App, g: &Global, setup: &Setup, f: Flags) -> Result<()> {
    let model = app.model(f.model)?;
    let relaunch = vec![
        std::env::current_exe()?.display().to_string(),
        "--models".into(),
        g.models.display().to_string(),
        "--threads".into(),
        setup.threads.to_string(),
        "--device".into(),
        setup.device.to_string(),
        "--component".into(),
        app.component.display().to_string(),
    ];
    crate::bench::bench(
        &app.rt,
        &crate::bench::BenchArgs {
            model,
            prompt_tokens: f.prompt_tokens,
            gen_tokens: f.gen_tokens,
            runs: f.runs,
            prompt_file: f.prompt_file.cloned(),
            json: f.json,
            threads: setup.threads,
            portable: f.portable,
            device: if f.portable {
                Placement::Cpu
            } else {
                setup.placement.clone()
            },
            relaunch,
            // The bench's model, not the default one (a GGUF file by its path, as given).
            relaunch_model: f
                .given_model
                .map(|m| vec!["--model".to_string(), m.to_string()])
                .unwrap_or_default(),
        },
    )
}
