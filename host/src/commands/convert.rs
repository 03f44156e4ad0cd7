//! `slm convert FILE.gguf [-o DIR]`: a GGUF file into a model directory, with slm-convert.

use std::path::Path;
use std::time::Instant;

use anyhow::{anyhow, Result};
use slm_gguf::Gguf;

use crate::cli::Global;

pub fn convert(global: &Global, gguf: &Path, output: Option<&Path>) -> Result<()> {
    let started = Instant::now();
    let file = Gguf::open(gguf).map_err(|e| anyhow!("{}: {e}", gguf.display()))?;
    let out = match output {
        Some(dir) => dir.to_path_buf(),
        None => {
            let stem = gguf
                .file_stem()
                .ok_or_else(|| anyhow!("{}: not a file name", gguf.display()))?;
            global.models.join(stem)
        }
    };
    if !global.quiet {
        eprintln!("converting {} -> {}", gguf.display(), out.display());
    }
    let bar = crate::converted::progress_bar(gguf, global.quiet);
    slm_convert::write_model_dir_with(&file, &out, &mut |done, total| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    })
    .map_err(|e| anyhow!("{}: {e}", gguf.display()))?;
    bar.finish_and_clear();
    if !global.quiet {
        let bytes = std::fs::metadata(out.join("model.onnx"))
            .map(|m| m.len())
            .unwrap_or(0);
        eprintln!(
            "wrote {} (model.onnx {:.1} MB) in {:.1} s",
            out.display(),
            bytes as f64 / 1e6,
            started.elapsed().as_secs_f64()
        );
    }
    Ok(())
}
