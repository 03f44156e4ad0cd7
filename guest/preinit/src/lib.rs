//! Pre-initialization support for the guest components (`scripts/build --bake`).
//!
//! `wasmtime wizer` calls a component's `preload` export once and writes the instance's memory
//! into the component as its initial data. wasi-libc's preopened-directory handles and the
//! environment it read must not end up in that snapshot: the instances made from it have other
//! handles (or none) and another environment.

/// Run `load` (a component's `preload`), then make wasi-libc forget its preopens and environment,
/// so that an instance made from the snapshot reads its own on first use.
pub fn preloading<R>(load: impl FnOnce() -> R) -> R {
    let out = load();
    forget_wasi_state();
    out
}

#[cfg(target_arch = "wasm32")]
fn forget_wasi_state() {
    extern "C" {
        fn __wasilibc_reset_preopens();
        fn __wasilibc_deinitialize_environ();
    }
    // SAFETY: wasi-libc's own hooks for pre-initialization; `load` has returned, so no file it
    // opened is still open, and nothing holds a pointer into the environment.
    unsafe {
        __wasilibc_reset_preopens();
        __wasilibc_deinitialize_environ();
    }
}

/// Natively there is no wasi-libc state to forget (unit tests of the guests run natively).
#[cfg(not(target_arch = "wasm32"))]
fn forget_wasi_state() {}
