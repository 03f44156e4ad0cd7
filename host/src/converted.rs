//! GGUF files as models: each is converted once into the model directory the engine runs
//! (slm-convert), cached under the cache directory and keyed by the file's content and the
//! converter's format version, so a second start only hashes the file.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{anyhow, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use sha2::{Digest, Sha256};
use slm_gguf::Gguf;

use crate::runtime::cache_dir;

/// Whether `path` names a GGUF file (by its extension).
pub fn is_gguf(path: &Path) -> bool {
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
}

/// The model name of a GGUF file: its file stem.
pub fn model_name(gguf: &Path) -> Result<String> {
    gguf.file_stem()
        .and_then(|s| s.to_str())
        .filter(|s| !s.is_empty() && !s.starts_with('.'))
        .map(str::to_string)
        .ok_or_else(|| anyhow!("{}: cannot name a model after this file", gguf.display()))
}

/// The `.gguf` files directly in `dir`, with their model names, sorted by name.
pub fn ggufs_in(dir: &Path) -> Vec<(String, PathBuf)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut found: Vec<(String, PathBuf)> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| is_gguf(p) && p.is_file())
        .filter_map(|p| Some((model_name(&p).ok()?, p)))
        .collect();
    found.sort();
    found
}

/// The model directory converted from `gguf`: from the cache when this file (by content) was
/// converted before, else converted now, with a progress bar on stderr unless `quiet`.
pub fn model_dir(gguf: &Path, quiet: bool) -> Result<PathBuf> {
    let cache = cache_dir().ok_or_else(|| {
        anyhow!("no cache directory for converted models: set SLM_CACHE_DIR (or HOME)")
    })?;
    let key = content_key(gguf)?;
    let dir = cache.join("models").join(key);
    if dir.join("model.onnx").is_file() {
        tracing::debug!("{}: converted before, in {}", gguf.display(), dir.display());
        return Ok(dir);
    }
    let started = Instant::now();
    let file = Gguf::open(gguf).map_err(|e| anyhow!("{}: {e}", gguf.display()))?;
    let bar = progress_bar(gguf, quiet);
    slm_convert::write_model_dir_with(&file, &dir, &mut |done, total| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    })
    .map_err(|e| anyhow!("{}: {e}", gguf.display()))?;
    bar.finish_and_clear();
    if !quiet {
        eprintln!(
            "converted {} in {:.1} s (cached in {})",
            gguf.display(),
            started.elapsed().as_secs_f64(),
            dir.display()
        );
    }
    Ok(dir)
}

/// The cache key of a GGUF file: the sha-256 of its bytes and the converter's format version.
fn content_key(gguf: &Path) -> Result<String> {
    let mut file =
        std::fs::File::open(gguf).with_context(|| format!("cannot open {}", gguf.display()))?;
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file
            .read(&mut buf)
            .with_context(|| format!("cannot read {}", gguf.display()))?;
        if n == 0 {
            break;
        }
        hash.update(&buf[..n]);
    }
    let hex: String = hash.finalize()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    Ok(format!("{hex}-v{}", slm_convert::FORMAT_VERSION))
}

/// A bar of the conversion's steps; hidden when `quiet` or when stderr is not a terminal.
pub fn progress_bar(gguf: &Path, quiet: bool) -> ProgressBar {
    if quiet {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("converting {msg} {bar:30} {pos}/{len} [{elapsed}]")
            .expect("a valid template"),
    );
    bar.set_message(
        gguf.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
    );
    bar
}
