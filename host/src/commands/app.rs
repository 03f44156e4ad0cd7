//! What the commands that run the generator component share: the runtime (engine, pre-linked
//! component, models), the choice of model, and fresh instances.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{anyhow, bail, Result};

use crate::cli::Global;
use crate::commands::errors;
use crate::completion::{Failure, Instance};
use crate::registry::ModelRegistry;
use crate::runtime::{find_component, GuestError, Runtime};

pub struct App {
    pub rt: Runtime,
    /// The component file `rt` runs.
    pub component: PathBuf,
    /// `--quiet`: no summary line on stderr.
    pub quiet: bool,
}

impl App {
    /// The runtime for component `file` (or `--component`) on the models of `registry`.
    pub fn new(g: &Global, file: &str, registry: ModelRegistry) -> Result<App> {
        let component = find_component(g.component.as_deref(), file)?;
        tracing::debug!("component {}", component.display());
        let rt = Runtime::new(&component, Arc::new(registry))?;
        Ok(App {
            rt,
            component,
            quiet: g.quiet,
        })
    }

    /// The model to use: the one asked for (if it exists), else the registry's default.
    pub fn model(&self, asked: Option<&str>) -> Result<String> {
        let names = self.rt.registry.names();
        let dir = self.rt.registry.dir().display();
        match asked {
            Some(m) if names.iter().any(|n| n == m) => Ok(m.to_string()),
            Some(m) => bail!(
                "model {m:?} not found in {dir} (available: {}; use --model NAME or --models DIR)",
                errors::available(&names)
            ),
            None => self.rt.registry.default_model().ok_or_else(|| {
                anyhow!("no models found in {dir} (run scripts/setup, or pass --models DIR)")
            }),
        }
    }

    /// A fresh store and generator instance.
    pub fn instance(&self) -> Result<Instance> {
        self.rt.instantiate()
    }

    /// Starts loading model `name` on a background thread, so that the load overlaps the
    /// guest's start (instantiation, tokenizer parse): the guest's wasi:nn `load` then waits for
    /// this load instead of starting its own. A failed load is reported by that `load`.
    pub fn preload(&self, name: &str) {
        if let Some(m) = self.rt.registry.model(name) {
            let m = Arc::clone(m);
            std::thread::spawn(move || {
                let _ = m.get();
            });
        }
    }

    /// A guest error as the command line words it.
    pub fn guest_error(&self, e: GuestError) -> anyhow::Error {
        errors::guest(e, &self.rt.registry.names())
    }

    /// A failed completion as the command line words it.
    pub fn failure(&self, f: Failure) -> anyhow::Error {
        errors::failure(f, &self.rt.registry.names())
    }
}
