//! The models of a models directory: every subdirectory with a `model.onnx`, named after it
//! (and model directories from elsewhere: GGUF files converted into the cache), loaded lazily, once per process, and shared by every component instance (with its prefix
//! cache), and the rule for which model runs when a request names none.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use slm_engine::{Device, EngineError, Model, Placement};
use slm_wasi_nn::{catch_panic, PrefixCache};

/// The model `scripts/setup` installs, used when a request names none (see
/// [`ModelRegistry::default_model`]). The generator's `list-models` lists it first for the same
/// reason (guest/generator/src/model.rs), so HTTP requests without a `model` get it too.
pub const DEFAULT_MODEL: &str = "smollm2-135m-instruct";

/// A model file loaded on first use, once per process, with its prefix cache.
pub struct LazyModel {
    /// The model's name: its directory's.
    name: String,
    path: PathBuf,
    cell: OnceLock<Result<Arc<Model>, String>>,
    prefix: Arc<PrefixCache>,
    /// How long parsing and optimizing took.
    load_ms: OnceLock<f64>,
    /// What was asked (`auto` falls back to the CPU when the GPU plan cannot be built) and where
    /// it goes; `placed` is where the model ended up, once loaded.
    device: Device,
    placement: Placement,
    placed: OnceLock<Placement>,
}

impl LazyModel {
    /// `prefix_cache_bytes`: the prefix cache's size limit (0: no cache). Loads on `placement`
    /// (what `device` resolved to: [`slm_engine::resolve`]).
    pub fn new(
        name: String,
        path: PathBuf,
        prefix_cache_bytes: usize,
        device: Device,
        placement: Placement,
    ) -> Self {
        LazyModel {
            name,
            path,
            cell: OnceLock::new(),
            prefix: Arc::new(PrefixCache::new(prefix_cache_bytes)),
            load_ms: OnceLock::new(),
            device,
            placement,
            placed: OnceLock::new(),
        }
    }

    /// The model's name (its directory's).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The model file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Where the model runs, once loaded.
    pub fn placed(&self) -> Option<&Placement> {
        self.placed.get()
    }

    /// The model if it is loaded (never loads it).
    pub fn loaded(&self) -> Option<Arc<Model>> {
        self.cell.get().and_then(|r| r.as_ref().ok()).cloned()
    }

    /// The prefix cache every execution context on this model shares.
    pub fn prefix_cache(&self) -> Arc<PrefixCache> {
        self.prefix.clone()
    }

    fn load(&self) -> Result<Model, EngineError> {
        // tract panics on some malformed graphs, the GPU engine on some driver failures:
        // `catch_panic` turns both into errors (and keeps the panic hook quiet).
        let load_on = |placement: &Placement| {
            catch_panic(|| Model::load_on(&self.path, placement)).unwrap_or_else(|p| {
                Err(EngineError::Runtime(format!(
                    "the engine failed while loading: {p}"
                )))
            })
        };
        let r = load_on(&self.placement);
        let placed = match (&r, &self.placement, self.device) {
            (Err(e), Placement::Gpu(g), Device::Auto) => {
                let why = format!("{e}").replace('\n', " ");
                eprintln!(
                    "warning: cannot run {} on {g}: {why}; using the CPU",
                    self.path.display()
                );
                let _ = self.placed.set(Placement::Cpu);
                return load_on(&Placement::Cpu);
            }
            _ => self.placement.clone(),
        };
        let _ = self.placed.set(placed);
        r
    }

    /// The model, loading it on the first call (every caller waits for that one load). The error
    /// names the model, not the host's path: it reaches guests and, through them, HTTP clients.
    pub fn get(&self) -> Result<Arc<Model>, String> {
        self.cell
            .get_or_init(|| {
                let t = std::time::Instant::now();
                let r = self.load().map(Arc::new);
                // Packing's freed buffers, before requests allocate on top of them (3.5 MiB of
                // Gemma 3's peak).
                crate::runtime::release_freed_memory();
                let r = r.map_err(|e| match e {
                    EngineError::Load { message, .. } => {
                        format!("cannot load model {} (model.onnx): {message}", self.name)
                    }
                    other => format!("cannot load model {}: {other}", self.name),
                });
                let _ = self.load_ms.set(t.elapsed().as_secs_f64() * 1e3);
                match &r {
                    Ok(_) => tracing::debug!(
                        "loaded {} on {} in {:.0} ms",
                        self.path.display(),
                        self.placed.get().unwrap_or(&Placement::Cpu),
                        t.elapsed().as_secs_f64() * 1e3
                    ),
                    Err(e) => tracing::debug!("{e}"),
                }
                r
            })
            .clone()
    }
}

/// The models of a directory, by name.
pub struct ModelRegistry {
    dir: PathBuf,
    models: BTreeMap<String, Arc<LazyModel>>,
    /// Models whose directory is a symbolic link or lies elsewhere (a converted GGUF), with that
    /// directory: guests get each mounted at `/models/<name>`, since their sandbox does not
    /// follow links.
    linked: Vec<(String, PathBuf)>,
    prefix_cache_bytes: usize,
    device: Device,
    placement: Placement,
}

impl ModelRegistry {
    /// Scan `dir` (not recursive). Nothing is loaded yet. Each model gets a prefix cache of
    /// `prefix_cache_bytes` (0: none) and is to be loaded on `placement` (what `device`, the
    /// host's `--device`, resolved to).
    pub fn discover_on(
        dir: &Path,
        prefix_cache_bytes: usize,
        device: Device,
        placement: Placement,
    ) -> std::io::Result<Self> {
        let mut models = BTreeMap::new();
        let mut linked = Vec::new();
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            let path = entry.path();
            let model = path.join("model.onnx");
            if !model.is_file() {
                continue;
            }
            let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
                continue;
            };
            if entry.file_type()?.is_symlink() {
                linked.push((name.to_string(), std::fs::canonicalize(&path)?));
            }
            let lazy = LazyModel::new(
                name.to_string(),
                model,
                prefix_cache_bytes,
                device,
                placement.clone(),
            );
            models.insert(name.to_string(), Arc::new(lazy));
        }
        Ok(ModelRegistry {
            dir: dir.to_path_buf(),
            models,
            linked,
            prefix_cache_bytes,
            device,
            placement,
        })
    }

    /// Adds model `name` from a directory outside the models directory (mounted for guests at
    /// `/models/<name>`). False, and nothing added, when a model of that name exists.
    pub fn add_model_dir(&mut self, name: &str, dir: &Path) -> bool {
        if self.models.contains_key(name) {
            return false;
        }
        let lazy = LazyModel::new(
            name.to_string(),
            dir.join("model.onnx"),
            self.prefix_cache_bytes,
            self.device,
            self.placement.clone(),
        );
        self.models.insert(name.to_string(), Arc::new(lazy));
        self.linked.push((name.to_string(), dir.to_path_buf()));
        true
    }

    /// The host's `--device`.
    pub fn device(&self) -> Device {
        self.device
    }

    /// The lazily loaded model `name`.
    pub fn model(&self, name: &str) -> Option<&Arc<LazyModel>> {
        self.models.get(name)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Models whose directory is a symbolic link or lies elsewhere, and that directory.
    pub fn linked_dirs(&self) -> &[(String, PathBuf)] {
        &self.linked
    }

    /// The context length `config.json` declares (`max_position_embeddings`), if it is readable.
    pub fn context_length(&self, name: &str) -> Option<u64> {
        let dir = self.models.get(name)?.path.parent()?;
        let config = std::fs::read(dir.join("config.json")).ok()?;
        let config: serde_json::Value = serde_json::from_slice(&config).ok()?;
        config.get("max_position_embeddings")?.as_u64()
    }

    /// How long loading `name` took, once it is loaded.
    pub fn load_ms(&self, name: &str) -> Option<f64> {
        self.models.get(name)?.load_ms.get().copied()
    }

    /// Empties every model's prefix cache.
    pub fn clear_prefix_caches(&self) {
        for m in self.models.values() {
            m.prefix.clear();
        }
    }

    /// Model names, sorted.
    pub fn names(&self) -> Vec<String> {
        self.models.keys().cloned().collect()
    }

    /// The model used when none is named: [`DEFAULT_MODEL`] when it is installed, else the first
    /// by name; None for an empty directory.
    pub fn default_model(&self) -> Option<String> {
        let names = self.names();
        names
            .iter()
            .find(|n| *n == DEFAULT_MODEL)
            .or(names.first())
            .cloned()
    }
}
