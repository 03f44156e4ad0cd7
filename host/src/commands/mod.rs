//! Runs a parsed command line: the set-up every command shares (logging, threads, device, models
//! directory), then the command's own module.

mod app;
mod bench;
mod chat;
mod convert;
mod errors;
mod generate;
mod models;
mod run;
mod serve;
mod tokenize;

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Result};
use clap::Parser as _;
use slm_engine::{Device, Placement};

use crate::cli::{Cli, Cmd, Global};
use crate::converted;
use crate::registry::ModelRegistry;
use app::App;

/// The generator component's file name (in `dist/`, and next to the `slm` executable).
pub const GENERATOR_FILE: &str = "slm-generator.wasm";
/// The generator composed with the in-wasm wasi:nn (imports only wasi:*).
pub const GENERATOR_PORTABLE_FILE: &str = "slm-generator-portable.wasm";
/// The in-wasm wasi:nn (the engine compiled to wasm32; exports wasi:nn).
pub const NN_FILE: &str = "slm-nn.wasm";
/// The HTTP app composed with the generator (imports wasi:nn).
pub const HTTP_FILE: &str = "slm-http.wasm";
/// The HTTP app composed with the generator and the in-wasm wasi:nn (imports only wasi:*).
pub const HTTP_PORTABLE_FILE: &str = "slm-http-portable.wasm";

/// What the global flags come to.
pub struct Setup {
    /// Inference threads.
    pub threads: usize,
    /// `--device` as asked.
    pub device: Device,
    /// Where models run (the CPU for the commands that run none).
    pub placement: Placement,
}

pub fn main() -> Result<()> {
    let mut cli = parse()?;
    init_logging(cli.global.verbose);
    let threads = cli.global.threads.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    });
    if threads == 0 {
        bail!("--threads must be at least 1");
    }
    slm_engine::set_threads(threads);
    let device: Device = cli.global.device.parse().map_err(|e: String| anyhow!(e))?;
    // Only the commands that run a model look for a GPU.
    let placement = match &cli.cmd {
        Cmd::Tokenize { .. } | Cmd::Models | Cmd::Convert { .. } => Placement::Cpu,
        _ => resolve_device(device, cli.global.quiet)?,
    };
    // `--model` as given (a GGUF file by its path), for `bench` to start `slm run` again with it.
    let given_model = model_arg(&mut cli.cmd).map(|m| m.clone());
    // `--model FILE.gguf`: the file, converted (or found converted), runs under its stem.
    let gguf_model = match model_arg(&mut cli.cmd) {
        Some(model) if converted::is_gguf(Path::new(model.as_str())) => {
            let gguf = PathBuf::from(model.as_str());
            if !gguf.is_file() {
                bail!("--model {}: no such file", gguf.display());
            }
            let name = converted::model_name(&gguf)?;
            let dir = converted::model_dir(&gguf, cli.global.quiet)?;
            *model = name.clone();
            Some((name, dir))
        }
        _ => None,
    };
    let registry = || discover(&cli.global, device, placement.clone(), gguf_model.as_ref());

    match &cli.cmd {
        Cmd::Convert { gguf, output } => {
            return convert::convert(&cli.global, gguf, output.as_deref())
        }
        Cmd::Serve(args) => return serve::serve(&cli.global, registry()?, args),
        Cmd::Logits(args) => return crate::devcheck::logits(registry()?, args, &cli.global),
        _ => {}
    }
    let file = match &cli.cmd {
        Cmd::Bench { portable: true, .. } => GENERATOR_PORTABLE_FILE,
        _ => GENERATOR_FILE,
    };
    let app = App::new(&cli.global, file, registry()?)?;
    let setup = Setup {
        threads,
        device,
        placement,
    };
    match &cli.cmd {
        Cmd::Run { gen, raw, prompt } => run::run(&app, gen, *raw, prompt),
        Cmd::Chat { gen } => chat::chat(&app, gen),
        Cmd::Tokenize { model, text } => tokenize::tokenize(&app, model.as_deref(), text),
        Cmd::Models => models::models(&app),
        Cmd::Bench {
            model,
            prompt_tokens,
            gen_tokens,
            runs,
            prompt_file,
            json,
            portable,
        } => bench::bench(
            &app,
            &cli.global,
            &setup,
            bench::Flags {
                model: model.as_deref(),
                given_model: given_model.as_deref(),
                prompt_tokens: *prompt_tokens,
                gen_tokens: *gen_tokens,
                runs: *runs,
                prompt_file: prompt_file.as_ref(),
                json: *json,
                portable: *portable,
            },
        ),
        Cmd::Serve(_) | Cmd::Logits(_) | Cmd::Convert { .. } => unreachable!("handled above"),
    }
}

/// The command line, or an error of one line (clap's own for --help and --version).
fn parse() -> Result<Cli> {
    Cli::try_parse().or_else(|e| {
        use clap::error::ErrorKind;
        if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
            e.exit();
        }
        // clap's message is several lines; keep the first, and point at --help.
        let text = e.to_string();
        let first = text
            .lines()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("invalid arguments")
            .trim_start_matches("error: ")
            .to_string();
        bail!("{first} (see slm --help)");
    })
}

fn init_logging(verbose: bool) {
    let filter = if verbose {
        tracing_subscriber::EnvFilter::new("slm=debug")
    } else {
        tracing_subscriber::EnvFilter::try_from_env("SLM_LOG")
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"))
    };
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
}

/// What `--device` comes to here: `gpu` without a usable GPU is an error naming what is missing;
/// a GPU that `auto` picks is named on stderr (unless --quiet).
fn resolve_device(device: Device, quiet: bool) -> Result<Placement> {
    let placement = slm_engine::resolve(device).map_err(|why| anyhow!("--device gpu: {why}"))?;
    match &placement {
        Placement::Gpu(g) if !quiet => eprintln!("device: {g}"),
        Placement::Gpu(_) => {}
        Placement::Cpu if device == Device::Auto => {
            let why = slm_engine::gpu().err().unwrap_or_default();
            tracing::debug!("device: CPU (--device auto; no GPU: {why})");
        }
        Placement::Cpu => tracing::debug!("device: CPU"),
    }
    Ok(placement)
}

/// The `--model` argument of the commands that take one.
fn model_arg(cmd: &mut Cmd) -> Option<&mut String> {
    match cmd {
        Cmd::Run { gen, .. } | Cmd::Chat { gen } => gen.model.as_mut(),
        Cmd::Tokenize { model, .. } | Cmd::Bench { model, .. } => model.as_mut(),
        _ => None,
    }
}

/// The models of `--models`: its model directories, then its GGUF files (converted, or found
/// converted in the cache; one that cannot be converted is named on stderr and left out), then
/// `extra`: a `--model FILE.gguf` converted into `(name, directory)`.
fn discover(
    g: &Global,
    device: Device,
    placement: Placement,
    extra: Option<&(String, PathBuf)>,
) -> Result<ModelRegistry> {
    let dir = &g.models;
    let mut registry = ModelRegistry::discover_on(dir, g.prefix_cache_mb << 20, device, placement)
        .map_err(|e| {
            anyhow!(
                "cannot read models directory {}: {e} (run scripts/setup, or pass --models DIR)",
                dir.display()
            )
        })?;
    for (name, gguf) in converted::ggufs_in(dir) {
        if registry.model(&name).is_some() {
            eprintln!(
                "warning: {}: the models directory has a model named {name} already; the file is not served",
                gguf.display()
            );
            continue;
        }
        match converted::model_dir(&gguf, g.quiet) {
            Ok(converted) => {
                registry.add_model_dir(&name, &converted);
            }
            Err(e) => eprintln!("warning: {e:#}; not served"),
        }
    }
    if let Some((name, converted)) = extra {
        let same = |m: &std::sync::Arc<crate::registry::LazyModel>| {
            m.path().parent() == Some(converted.as_path())
        };
        if !registry.model(name).is_some_and(same) && !registry.add_model_dir(name, converted) {
            bail!(
                "--model: the models directory {} has another model named {name}; rename the file",
                dir.display()
            );
        }
    }
    Ok(registry)
}
