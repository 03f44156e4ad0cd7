//! `slm serve`: picks the HTTP component (native or portable), turns the flags into the server's
//! limits and API keys, and runs [`crate::serve`] on the models.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _, Result};

use crate::cli::{Global, ServeArgs};
use crate::commands::{HTTP_FILE, HTTP_PORTABLE_FILE};
use crate::registry::ModelRegistry;
use crate::runtime::find_component;
use crate::serve::{ApiKeys, Limits};

/// Linear memory of one instance by default, in MiB: the native app needs the tokenizer and the
/// request; the portable one also holds the model it runs.
const INSTANCE_MEMORY_MIB: usize = 512;
const PORTABLE_INSTANCE_MEMORY_MIB: usize = 2048;

/// Generations running at once per model by default. Natively their steps share each run of the
/// model (continuous batching); portable instances each hold a model, ~285 MB apiece.
const MAX_RUNNING: usize = 8;
const PORTABLE_MAX_RUNNING: usize = 4;

pub fn serve(g: &Global, registry: ModelRegistry, args: &ServeArgs) -> Result<()> {
    let file = if args.portable {
        HTTP_PORTABLE_FILE
    } else {
        HTTP_FILE
    };
    let component = find_component(g.component.as_deref(), file)?;
    crate::serve::serve(crate::serve::ServeOptions {
        listen: args.listen,
        component: &component,
        registry: Arc::new(registry),
        limits: limits(args)?,
        api_keys: api_keys(args)?,
    })
}

fn limits(args: &ServeArgs) -> Result<Limits> {
    let positive = |flag: &str, n: u64| {
        if n == 0 {
            bail!("{flag} must be at least 1");
        }
        Ok(())
    };
    positive("--max-body-kib", args.max_body_kib as u64)?;
    positive("--header-timeout", args.header_timeout)?;
    positive("--body-timeout", args.body_timeout)?;
    positive("--max-connections", args.max_connections as u64)?;
    let max_running = args.max_running.unwrap_or(if args.portable {
        PORTABLE_MAX_RUNNING
    } else {
        MAX_RUNNING
    });
    positive("--max-running", max_running as u64)?;
    positive("--request-timeout", args.request_timeout)?;
    positive("--max-tokens-limit", args.max_tokens_limit.into())?;
    positive("--instance-reuse", args.instance_reuse.into())?;
    positive("--instance-idle-timeout", args.instance_idle_timeout)?;
    let memory_mib = args.max_instance_memory_mib.unwrap_or(if args.portable {
        PORTABLE_INSTANCE_MEMORY_MIB
    } else {
        INSTANCE_MEMORY_MIB
    });
    positive("--max-instance-memory-mib", memory_mib as u64)?;
    if memory_mib > 4096 {
        bail!("--max-instance-memory-mib: a 32-bit instance has at most 4096 MiB");
    }
    Ok(Limits {
        max_body_bytes: args.max_body_kib.saturating_mul(1024),
        header_timeout: Duration::from_secs(args.header_timeout),
        body_timeout: Duration::from_secs(args.body_timeout),
        drain_timeout: Duration::from_secs(args.drain_timeout),
        max_connections: args.max_connections,
        max_running,
        max_queue: args.max_queue,
        request_timeout: Duration::from_secs(args.request_timeout),
        max_tokens: args.max_tokens_limit,
        instance_memory_bytes: memory_mib << 20,
        instance_reuse: args.instance_reuse,
        instance_idle_timeout: Duration::from_secs(args.instance_idle_timeout),
        warm_up: !args.no_warmup,
    })
}

fn api_keys(args: &ServeArgs) -> Result<ApiKeys> {
    let mut keys = args.api_key.clone();
    if let Some(file) = &args.api_key_file {
        let text = std::fs::read_to_string(file)
            .with_context(|| format!("cannot read --api-key-file {}", file.display()))?;
        keys.extend(
            text.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .map(String::from),
        );
        if keys.is_empty() {
            bail!("--api-key-file {} holds no key", file.display());
        }
    }
    Ok(ApiKeys::new(keys)?.with_public_metrics(args.public_metrics))
}
