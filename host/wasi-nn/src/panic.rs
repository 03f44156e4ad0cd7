//! Engine panics become errors: a panic inside tract must not take the host (and every other
//! request) down. In wasm32 a panic aborts the instance instead, which is the host's to report.

use std::cell::Cell;

thread_local! {
    static QUIET_PANICS: Cell<bool> = const { Cell::new(false) };
}

/// Whether a panic on this thread is being caught: the host's panic hook then stays silent.
pub fn panics_are_caught() -> bool {
    QUIET_PANICS.with(|q| q.get())
}

/// Runs `f`, turning a panic into its message.
pub fn catch_panic<R>(f: impl FnOnce() -> R) -> Result<R, String> {
    let was = QUIET_PANICS.with(|q| q.replace(true));
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    QUIET_PANICS.with(|q| q.set(was));
    r.map_err(|p| {
        p.downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| p.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".to_string())
    })
}
