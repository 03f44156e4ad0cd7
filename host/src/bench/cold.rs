//! Bench scenario: cold start, a new `slm run` process from its start to the first byte of its
//! answer, compared with that process's own model load; its peak RSS, both read from its `-v` log.

use std::io::Read as _;
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context as _, Result};

use super::BenchArgs;
use crate::stats::median;

/// The prompt of the cold-start runs.
pub const COLD_START_PROMPT: &str = "Hello";

/// What the cold-start runs measured (None: no run, or its log did not say).
pub struct ColdStarts {
    /// Median time from process start to the first byte of the answer.
    pub ms: Option<f64>,
    /// Median of each run's time over its own model load.
    pub over_load: Option<f64>,
    /// The highest peak resident memory of the runs.
    pub peak_rss_mb: Option<f64>,
}

/// What one cold-start run measured.
struct ColdStart {
    /// From process start to the first byte of the answer.
    ms: f64,
    /// Its own model load, which the start-up overlaps (its `-v` log).
    load_ms: Option<f64>,
    /// Its peak resident memory (its `-v` log).
    peak_rss_mb: Option<f64>,
}

/// `--runs` cold starts (none without a program to start).
///
/// Cold start is the start-up path (process, compiled code, model load, guest start), so its
/// prompt is one word: the prompt's own prefill is the speed scenario's time to first token.
/// Its ratio to the model load is taken within each run (that process's own load, under the
/// same conditions: this machine's speed drifts by tens of percent between runs).
pub fn measure(a: &BenchArgs) -> Result<ColdStarts> {
    let (mut colds, mut ratios, mut rss) = (Vec::new(), Vec::new(), Vec::new());
    if !a.relaunch.is_empty() {
        for _ in 0..a.runs {
            let c = cold_start(&a.relaunch, &a.relaunch_model, COLD_START_PROMPT)?;
            colds.push(c.ms);
            ratios.extend(c.load_ms.map(|l| c.ms / l));
            rss.extend(c.peak_rss_mb);
        }
    }
    Ok(ColdStarts {
        ms: Some(median(colds)).filter(|ms| !ms.is_nan()),
        over_load: Some(median(ratios)).filter(|r| r.is_finite()),
        peak_rss_mb: rss.into_iter().reduce(f64::max),
    })
}

/// A new `slm run` process (`relaunch`'s global options, `model`'s run options), answering
/// `prompt` with one token.
fn cold_start(relaunch: &[String], model: &[String], prompt: &str) -> Result<ColdStart> {
    let (exe, args) = relaunch.split_first().context("no program to relaunch")?;
    let t = Instant::now();
    let mut child = Command::new(exe)
        .args(args)
        .args(["-v", "run"])
        .args(model)
        .args(["--raw", "--max-tokens", "1", "--temperature", "0", prompt])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot start slm for the cold-start run")?;
    let mut first = [0u8; 1];
    let got = child
        .stdout
        .as_mut()
        .map(|o| o.read(&mut first))
        .transpose()?;
    let ms = t.elapsed().as_secs_f64() * 1e3;
    let out = child.wait_with_output()?;
    let log = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() || got != Some(1) {
        bail!("the cold-start run failed: {}", log.trim());
    }
    Ok(ColdStart {
        ms,
        load_ms: logged_load_ms(&log),
        peak_rss_mb: logged_peak_rss_mb(&log),
    })
}

/// The model load time in an `slm -v` log: "loaded PATH on DEVICE in N ms".
fn logged_load_ms(log: &str) -> Option<f64> {
    logged_number(log, "loaded ", " in ", " ms")
}

/// The peak RSS in an `slm -v run` log: "peak RSS N MiB".
fn logged_peak_rss_mb(log: &str) -> Option<f64> {
    logged_number(log, "peak RSS ", "peak RSS ", " MiB")
}

/// The number between the last `before` and the final `unit` of the last line of `log` that
/// contains `marker` and ends with `unit`.
fn logged_number(log: &str, marker: &str, before: &str, unit: &str) -> Option<f64> {
    let line = log
        .lines()
        .rev()
        .find(|l| l.contains(marker) && l.ends_with(unit))?;
    let (_, tail) = line.rsplit_once(before)?;
    tail.strip_suffix(unit)?.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::{logged_load_ms, logged_peak_rss_mb};

    #[test]
    fn load_time_is_read_from_the_verbose_log() {
        let log = "\u{1b}[2m2026-11-27T06:16:33Z\u{1b}[0m \u{1b}[34mDEBUG\u{1b}[0m compile cache hit: x.cwasm\n\
                   \u{1b}[2m2026-11-27T06:16:33Z\u{1b}[0m \u{1b}[34mDEBUG\u{1b}[0m loaded models/m/model.onnx on CPU in 585 ms\n\
                   [prompt 1 tokens (0 cached), completion 1 tokens, time to first token 593 ms]";
        assert_eq!(logged_load_ms(log), Some(585.0));
        assert_eq!(logged_load_ms("no model here"), None);
        assert_eq!(
            logged_peak_rss_mb("x\n\u{1b}[34mDEBUG\u{1b}[0m peak RSS 154.2 MiB\n"),
            Some(154.2)
        );
    }
}
