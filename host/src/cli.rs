//! The command line: `slm run`, `slm chat`, `slm serve`, `slm tokenize`, `slm models`.

use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{anyhow, bail, Context as _, Result};
use clap::{Args, Parser, Subcommand};
use wasmtime::component::ResourceAny;
use wasmtime::Store;

use slm_engine::{Device, Placement};

use crate::nn::ModelRegistry;
use crate::runtime::{
    find_component, one_line, FinishReason, GeneratorComponent, GuestError, HostState, Message,
    Options, Runtime, Sampling, Summary,
};

/// The model used when `--model` is not given (if present).
pub const DEFAULT_MODEL: &str = "smollm2-135m-instruct";
/// The generator component's file name (in `dist/`, and next to the `slm` executable).
pub const GENERATOR_FILE: &str = "slm-generator.wasm";
/// The generator composed with the in-wasm wasi:nn (imports only wasi:*).
pub const GENERATOR_PORTABLE_FILE: &str = "slm-generator-portable.wasm";
/// The HTTP app composed with the generator (imports wasi:nn).
pub const HTTP_FILE: &str = "slm-http.wasm";
/// The HTTP app composed with the generator and the in-wasm wasi:nn (imports only wasi:*).
pub const HTTP_PORTABLE_FILE: &str = "slm-http-portable.wasm";

/// Run small language models as WebAssembly components (wasmtime + wasi:nn on tract).
///
/// Generated text goes to stdout; timings and diagnostics go to stderr.
#[derive(Parser)]
#[command(name = "slm", version, propagate_version = true)]
struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Args)]
struct Global {
    /// Models directory: every subdirectory with a model.onnx is a model named after it.
    #[arg(
        long,
        global = true,
        env = "SLM_MODELS",
        default_value = "models",
        value_name = "DIR"
    )]
    models: PathBuf,
    /// The component to run (default: slm-generator.wasm, for `serve` slm-http.wasm; looked up
    /// next to the slm executable, then in dist/).
    #[arg(long, global = true, env = "SLM_COMPONENT", value_name = "PATH")]
    component: Option<PathBuf>,
    /// Inference threads (default: the number of CPU cores).
    #[arg(long, global = true, value_name = "N")]
    threads: Option<usize>,
    /// Where models run: `gpu` (an NVIDIA GPU through CUDA; fails with the reason when there is
    /// none), `cpu`, or `auto`: the GPU when one is usable (named on stderr), else the CPU.
    /// GPU support is a build option: scripts/build-gpu. Guests asking wasi:nn for the `gpu`
    /// target get the GPU unless this is `cpu`.
    #[arg(long, global = true, env = "SLM_DEVICE", default_value = "auto", value_name = "DEVICE",
          value_parser = ["auto", "gpu", "cpu"])]
    device: String,
    /// Prefix cache size per model, in MiB: KV caches of earlier prompts (a shared system
    /// prompt, earlier chat turns) are reused by later ones that start the same way. 0 disables it.
    #[arg(
        long,
        global = true,
        env = "SLM_PREFIX_CACHE_MB",
        default_value_t = 256,
        value_name = "MIB"
    )]
    prefix_cache_mb: usize,
    /// No summary line on stderr.
    #[arg(long, short, global = true)]
    quiet: bool,
    /// Debug logging on stderr (also: SLM_LOG=debug).
    #[arg(long, short, global = true)]
    verbose: bool,
}

#[derive(Subcommand)]
enum Cmd {
    /// Generate a reply to PROMPT (through the chat template unless --raw), streamed to stdout.
    Run {
        #[command(flatten)]
        gen: GenArgs,
        /// Plain completion of PROMPT, without the chat template.
        #[arg(long)]
        raw: bool,
        /// The prompt.
        prompt: String,
    },
    /// Interactive multi-turn chat (reads lines from stdin; `/exit` or end of input ends it).
    Chat {
        #[command(flatten)]
        gen: GenArgs,
    },
    /// Print the token ids of TEXT as a JSON array (no BOS; special-token text becomes special tokens).
    Tokenize {
        /// Model whose tokenizer to use.
        #[arg(long, short)]
        model: Option<String>,
        /// The text.
        text: String,
    },
    /// List the models found in the models directory.
    Models,
    /// Measure time to first token, prefill and decode speed, peak memory, cold start and the
    /// prefix cache (greedy, through the generator component; median of --runs after a warm-up).
    ///
    /// With --json the last line of stdout is one JSON object.
    Bench {
        /// Model name [default: smollm2-135m-instruct if present, else the first model].
        #[arg(long, short)]
        model: Option<String>,
        /// Prompt length in tokens (cut from --prompt-file).
        #[arg(long, default_value_t = 128, value_name = "N")]
        prompt_tokens: usize,
        /// Tokens to generate per run.
        #[arg(long, default_value_t = 64, value_name = "M")]
        gen_tokens: u32,
        /// Timed runs (the median is reported).
        #[arg(long, default_value_t = 3, value_name = "R")]
        runs: usize,
        /// Text the prompt is cut from [default: a built-in English text].
        #[arg(long, value_name = "PATH")]
        prompt_file: Option<PathBuf>,
        /// Print only the JSON report.
        #[arg(long)]
        json: bool,
        /// Measure the in-wasm path: slm-generator-portable.wasm, with wasi:nn compiled to wasm.
        #[arg(long)]
        portable: bool,
    },
    /// Diagnostic (scripts/gpu-check): greedy decoding straight on the engine (no component),
    /// its logits written to a file, timings, and the session contract (rewind, prefix snapshot)
    /// checked on this device. One JSON line on stdout.
    #[command(hide = true)]
    Logits(crate::devcheck::LogitsArgs),
    /// Serve the OpenAI-compatible HTTP API (dist/slm-http.wasm) with wasi:nn on this host.
    ///
    /// Routes: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /health.
    /// One instance per request; one log line per request on stderr.
    Serve {
        /// Address to listen on (port 0 picks a free port; the address is printed on stderr).
        #[arg(long, default_value = "127.0.0.1:8080", value_name = "ADDR:PORT")]
        listen: std::net::SocketAddr,
        /// Serve slm-http-portable.wasm, which carries its own wasi:nn (tract compiled to wasm),
        /// instead of using this host's native one.
        #[arg(long)]
        portable: bool,
    },
}

#[derive(Args, Clone)]
struct GenArgs {
    /// Model name (a subdirectory of the models directory) [default: smollm2-135m-instruct if present,
    /// else the first model].
    #[arg(long, short)]
    model: Option<String>,
    /// The most tokens to generate [default: until end of sequence or a full context].
    #[arg(long, short = 'n', value_name = "N")]
    max_tokens: Option<u32>,
    /// Sampling temperature; 0 is greedy decoding [default: 0].
    #[arg(long, short, value_name = "T", allow_hyphen_values = true)]
    temperature: Option<f32>,
    /// Keep only the K most likely tokens (0: off).
    #[arg(long, value_name = "K")]
    top_k: Option<u32>,
    /// Nucleus sampling: keep the most likely tokens up to probability P, in (0, 1].
    #[arg(long, value_name = "P", allow_hyphen_values = true)]
    top_p: Option<f32>,
    /// Drop tokens less likely than P times the most likely one, in [0, 1).
    #[arg(long, value_name = "P", allow_hyphen_values = true)]
    min_p: Option<f32>,
    /// Repetition penalty (> 0; 1 is off).
    #[arg(long, value_name = "R", allow_hyphen_values = true)]
    repeat_penalty: Option<f32>,
    /// Random seed: same seed, prompt and options give the same output.
    #[arg(long, short, value_name = "S")]
    seed: Option<u64>,
    /// Stop before this string (repeatable; the stop string is not printed).
    #[arg(long, value_name = "STR")]
    stop: Vec<String>,
    /// System message (chat only).
    #[arg(long, value_name = "TEXT")]
    system: Option<String>,
}

impl GenArgs {
    fn options(&self, model: String) -> Options {
        Options {
            model: Some(model),
            max_tokens: self.max_tokens,
            stop: self.stop.clone(),
            sampling: Sampling {
                temperature: self.temperature,
                top_k: self.top_k,
                top_p: self.top_p,
                min_p: self.min_p,
                repetition_penalty: self.repeat_penalty,
                seed: self.seed,
            },
        }
    }
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

pub fn main() -> Result<()> {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
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
        }
    };
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
        Cmd::Tokenize { .. } | Cmd::Models => Placement::Cpu,
        _ => resolve_device(device, cli.global.quiet)?,
    };
    let registry = || discover(&cli.global, device, placement.clone());

    if let Cmd::Serve { listen, portable } = &cli.cmd {
        let registry = registry()?;
        let file = if *portable {
            HTTP_PORTABLE_FILE
        } else {
            HTTP_FILE
        };
        let component = find_component(cli.global.component.as_deref(), file)?;
        return crate::serve::serve(crate::serve::ServeOptions {
            listen: *listen,
            component: &component,
            registry: Arc::new(registry),
        });
    }

    let file = match &cli.cmd {
        Cmd::Bench { portable: true, .. } => GENERATOR_PORTABLE_FILE,
        _ => GENERATOR_FILE,
    };
    if let Cmd::Logits(args) = &cli.cmd {
        return crate::devcheck::logits(&registry()?, args);
    }
    let app = App::new(&cli.global, file, registry()?)?;
    match &cli.cmd {
        Cmd::Run { gen, raw, prompt } => {
            let r = app.run(gen, *raw, prompt);
            // For `slm bench`'s cold-start runs, which read it from the -v log.
            if let Some(mb) = crate::bench::peak_rss_mb() {
                tracing::debug!("peak RSS {mb:.1} MiB");
            }
            r
        }
        Cmd::Chat { gen } => app.chat(gen),
        Cmd::Tokenize { model, text } => app.tokenize(model.as_deref(), text),
        Cmd::Models => app.models(),
        Cmd::Serve { .. } | Cmd::Logits(_) => unreachable!("handled above"),
        Cmd::Bench {
            model,
            prompt_tokens,
            gen_tokens,
            runs,
            prompt_file,
            json,
            portable,
        } => {
            let model = app.model(model.as_deref())?;
            let relaunch = vec![
                std::env::current_exe()?.display().to_string(),
                "--models".into(),
                cli.global.models.display().to_string(),
                "--threads".into(),
                threads.to_string(),
                "--device".into(),
                device.to_string(),
                "--component".into(),
                app.component.display().to_string(),
            ];
            crate::bench::bench(
                &app.rt,
                &crate::bench::BenchArgs {
                    model,
                    prompt_tokens: *prompt_tokens,
                    gen_tokens: *gen_tokens,
                    runs: *runs,
                    prompt_file: prompt_file.clone(),
                    json: *json,
                    threads,
                    portable: *portable,
                    device: if *portable {
                        Placement::Cpu
                    } else {
                        placement.clone()
                    },
                    relaunch,
                },
            )
        }
    }
}

struct App {
    rt: Runtime,
    component: PathBuf,
    quiet: bool,
}

type Instance = (Store<HostState>, GeneratorComponent);

impl App {
    fn new(g: &Global, file: &str, registry: ModelRegistry) -> Result<App> {
        let component = find_component(g.component.as_deref(), file)?;
        tracing::debug!("component {}", component.display());
        let rt = Runtime::new(&component, Arc::new(registry))?;
        Ok(App {
            rt,
            component,
            quiet: g.quiet,
        })
    }

    fn available(&self) -> String {
        let names = self.rt.registry.names();
        if names.is_empty() {
            "none".to_string()
        } else {
            names.join(", ")
        }
    }

    /// The model to use: the one asked for (if it exists), else the default, else the first.
    fn model(&self, asked: Option<&str>) -> Result<String> {
        let names = self.rt.registry.names();
        let dir = self.rt.registry.dir().display();
        match asked {
            Some(m) if names.iter().any(|n| n == m) => Ok(m.to_string()),
            Some(m) => bail!(
                "model {m:?} not found in {dir} (available: {}; use --model NAME or --models DIR)",
                self.available()
            ),
            None if names.is_empty() => {
                bail!("no models found in {dir} (run scripts/setup, or pass --models DIR)")
            }
            None => Ok(names
                .iter()
                .find(|n| *n == DEFAULT_MODEL)
                .unwrap_or(&names[0])
                .clone()),
        }
    }

    fn instance(&self) -> Result<Instance> {
        self.rt.instantiate()
    }

    /// Starts loading model `name` on a background thread, so that the load overlaps the
    /// guest's start (instantiation, tokenizer parse): the guest's wasi:nn `load` then waits for
    /// this load instead of starting its own. A failed load is reported by that `load`.
    fn preload(&self, name: &str) {
        if let Some(m) = self.rt.registry.model(name) {
            let m = Arc::clone(m);
            std::thread::spawn(move || {
                let _ = m.get();
            });
        }
    }

    fn guest_error(&self, e: GuestError) -> anyhow::Error {
        match e {
            GuestError::ModelNotFound(m) => anyhow!(
                "model not found: {m} (available: {}; use --model NAME or --models DIR)",
                self.available()
            ),
            GuestError::InvalidRequest(m) => anyhow!("{}", name_flag(&m)),
            GuestError::ContextOverflow(c) => anyhow!(
                "prompt has {} tokens, context is {} (shorten the prompt)",
                c.prompt_tokens,
                c.context_length
            ),
            GuestError::ModelError(m) => anyhow!("model error: {m}"),
            GuestError::BackendFailure(m) => anyhow!("backend failure: {m}"),
        }
    }

    fn run(&self, gen: &GenArgs, raw: bool, prompt: &str) -> Result<()> {
        if prompt.trim().is_empty() {
            bail!("the prompt is empty (pass the text to generate from)");
        }
        let model = self.model(gen.model.as_deref())?;
        self.preload(&model);
        let mut inst = self.instance()?;
        let opts = gen.options(model);
        let text = if raw {
            self.generate(&mut inst, |store, g| {
                g.edge_slm_generator().call_complete(store, prompt, &opts)
            })?
        } else {
            let mut messages = Vec::new();
            if let Some(s) = &gen.system {
                messages.push(Message {
                    role: "system".into(),
                    content: s.clone(),
                });
            }
            messages.push(Message {
                role: "user".into(),
                content: prompt.to_string(),
            });
            self.generate(&mut inst, |store, g| {
                g.edge_slm_generator().call_chat(store, &messages, &opts)
            })?
        };
        drop(text);
        Ok(())
    }

    /// Start a completion with `start`, stream its pieces to stdout, print the summary on
    /// stderr; return the text.
    fn generate(
        &self,
        inst: &mut Instance,
        start: impl FnOnce(
            &mut Store<HostState>,
            &GeneratorComponent,
        ) -> wasmtime::Result<Result<ResourceAny, GuestError>>,
    ) -> Result<String> {
        let (store, g) = inst;
        let completion = start(store, g)
            .map_err(|e| anyhow!("the generator component failed: {}", one_line(&e)))?
            .map_err(|e| self.guest_error(e))?;
        let result = self.stream(store, g, completion);
        let _ = completion.resource_drop(&mut *store);
        let (text, summary) = result?;
        if !self.quiet {
            eprintln!("{}", summary_line(&summary));
        }
        Ok(text)
    }

    fn stream(
        &self,
        store: &mut Store<HostState>,
        g: &GeneratorComponent,
        completion: ResourceAny,
    ) -> Result<(String, Summary)> {
        let api = g.edge_slm_generator().completion();
        let stdout = std::io::stdout();
        let mut out = stdout.lock();
        let mut text = String::new();
        loop {
            let piece = api
                .call_next(&mut *store, completion)
                .map_err(|e| anyhow!("the generator component failed: {}", one_line(&e)))?;
            match piece {
                Ok(Some(p)) => {
                    out.write_all(p.as_bytes())
                        .and_then(|_| out.flush())
                        .context("cannot write to stdout")?;
                    text.push_str(&p);
                }
                Ok(None) => break,
                Err(e) => {
                    let _ = writeln!(out);
                    return Err(self.guest_error(e));
                }
            }
        }
        writeln!(out)
            .and_then(|_| out.flush())
            .context("cannot write to stdout")?;
        let summary = api
            .call_summary(&mut *store, completion)
            .map_err(|e| anyhow!("the generator component failed: {}", one_line(&e)))?;
        Ok((text, summary))
    }

    fn chat(&self, gen: &GenArgs) -> Result<()> {
        let model = self.model(gen.model.as_deref())?;
        self.preload(&model);
        let mut inst = self.instance()?;
        let opts = gen.options(model.clone());
        let stdin = std::io::stdin();
        let interactive = stdin.is_terminal();
        if interactive {
            eprintln!("chatting with {model}; /exit or Ctrl-D to end");
        }
        let mut messages = Vec::new();
        if let Some(s) = &gen.system {
            messages.push(Message {
                role: "system".into(),
                content: s.clone(),
            });
        }
        let mut lines = stdin.lock();
        loop {
            if interactive {
                eprint!("> ");
                let _ = std::io::stderr().flush();
            }
            let mut line = String::new();
            if lines.read_line(&mut line).context("cannot read stdin")? == 0 {
                break;
            }
            let line = line.trim_end_matches(['\n', '\r']);
            if line.trim() == "/exit" {
                break;
            }
            if line.trim().is_empty() {
                continue;
            }
            messages.push(Message {
                role: "user".into(),
                content: line.to_string(),
            });
            let r = self.generate(&mut inst, |store, g| {
                g.edge_slm_generator().call_chat(store, &messages, &opts)
            });
            match r {
                Ok(text) => messages.push(Message {
                    role: "assistant".into(),
                    content: text,
                }),
                Err(e) if interactive => {
                    messages.pop();
                    eprintln!("error: {}", format!("{e:#}").replace('\n', " "));
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn tokenize(&self, model: Option<&str>, text: &str) -> Result<()> {
        let model = self.model(model)?;
        let (mut store, g) = self.instance()?;
        let ids = g
            .edge_slm_generator()
            .call_tokenize(&mut store, Some(&model), text)
            .map_err(|e| anyhow!("the generator component failed: {}", one_line(&e)))?
            .map_err(|e| self.guest_error(e))?;
        println!("{}", serde_json::to_string(&ids)?);
        Ok(())
    }

    fn models(&self) -> Result<()> {
        let (mut store, g) = self.instance()?;
        let models = g
            .edge_slm_generator()
            .call_list_models(&mut store)
            .map_err(|e| anyhow!("the generator component failed: {}", one_line(&e)))?
            .map_err(|e| self.guest_error(e))?;
        let names = self.rt.registry.names();
        let models: Vec<_> = models
            .into_iter()
            .filter(|m| names.contains(&m.name))
            .collect();
        if models.is_empty() {
            eprintln!(
                "no models in {} (run scripts/setup, or pass --models DIR)",
                self.rt.registry.dir().display()
            );
            return Ok(());
        }
        let w = models
            .iter()
            .map(|m| m.name.len())
            .max()
            .unwrap_or(4)
            .max(4);
        println!("{:w$}  {:>7}  {:>6}  chat", "name", "context", "vocab");
        for m in models {
            println!(
                "{:w$}  {:>7}  {:>6}  {}",
                m.name,
                m.context_length,
                m.vocab_size,
                if m.has_chat_template { "yes" } else { "no" }
            );
        }
        Ok(())
    }
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

fn discover(g: &Global, device: Device, placement: Placement) -> Result<ModelRegistry> {
    let dir = &g.models;
    ModelRegistry::discover_on(dir, g.prefix_cache_mb << 20, device, placement).map_err(|e| {
        anyhow!(
            "cannot read models directory {}: {e} (run scripts/setup, or pass --models DIR)",
            dir.display()
        )
    })
}

/// Point a guest message about an option at the command-line flag that sets it.
fn name_flag(msg: &str) -> String {
    const FLAGS: [(&str, &str); 7] = [
        ("repetition-penalty", "--repeat-penalty"),
        ("temperature", "--temperature"),
        ("top-k", "--top-k"),
        ("top-p", "--top-p"),
        ("min-p", "--min-p"),
        ("max-tokens", "--max-tokens"),
        ("stop", "--stop"),
    ];
    match FLAGS.iter().find(|(field, _)| msg.starts_with(field)) {
        Some((_, flag)) => format!("{msg} ({flag})"),
        None => msg.to_string(),
    }
}

fn summary_line(s: &Summary) -> String {
    let u = &s.usage;
    let t = &s.timings;
    let decode_tps = if u.completion_tokens > 1 && t.decode_ms > 0.0 {
        format!(
            "{:.1} tokens/s",
            (u.completion_tokens - 1) as f64 * 1000.0 / t.decode_ms
        )
    } else {
        "n/a".to_string()
    };
    let finish = match s.finish_reason {
        FinishReason::Stop => "stop",
        FinishReason::StopString => "stop-string",
        FinishReason::Length => "length",
        FinishReason::ContextFull => "context-full",
    };
    format!(
        "[prompt {} tokens ({} cached), completion {} tokens, time to first token {:.0} ms, decode {}, total {:.0} ms, finish {}]",
        u.prompt_tokens, u.cached_tokens, u.completion_tokens, t.time_to_first_token_ms, decode_tps, t.total_ms, finish
    )
}
