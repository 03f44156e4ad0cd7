//! Splitting a product across threads: the spinning workers (`super::pool`) for the small,
//! back-to-back products of a decode step, tract's executor (rayon) for large ones, the calling
//! thread alone below that.

/// A pointer to the output of a product, shared by the threads that write disjoint parts of it
/// (columns in the matrix products, rows in attention).
#[derive(Clone, Copy)]
pub(crate) struct OutPtr(pub(crate) *mut f32);
// SAFETY: an `OutPtr` is only an address; the kernels that share it across threads write
// disjoint elements (each thread its own range of columns or rows) and the caller waits for
// all of them before it reads the buffer.
unsafe impl Send for OutPtr {}
// SAFETY: as for `Send`: shared access only ever writes disjoint elements.
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// Element `i` of the output. (A method, so that closures capture the whole Send + Sync
    /// wrapper, not its raw pointer.)
    ///
    /// # Safety
    /// `i` is inside the output buffer.
    pub(crate) unsafe fn at(self, i: usize) -> *mut f32 {
        // SAFETY: the caller keeps `i` inside the buffer `self.0` points to.
        unsafe { self.0.add(i) }
    }
}

/// Work (multiply-adds) from which a product is split across the spinning workers
/// (`super::pool`), which start a job within a microsecond while tokens are generated.
#[cfg(feature = "threads")]
const SPIN_MIN_MACS: usize = 1 << 16;

/// Work from which a product goes to the tract executor's (rayon) threads when the spinning
/// workers are taken by another session. Waking a parked pool thread costs tens of microseconds
/// (more in a VM): a decode step's layer products (at most ~0.9 M multiply-adds, ~70 us) ran
/// slower split over 2 such threads than on one.
#[cfg(feature = "threads")]
const PARALLEL_MIN_MACS: usize = 1 << 22;

/// Runs `f(b0, b1)` over `0..blocks`, split across the tract executor's threads when the work
/// (multiply-adds) is large enough to pay for the dispatch.
pub(crate) fn parallel_ranges(blocks: usize, macs: usize, f: &(dyn Fn(usize, usize) + Sync)) {
    #[cfg(feature = "threads")]
    {
        use tract_linalg::multithread::{current_tract_executor, Executor};
        if blocks >= 2 && macs >= SPIN_MIN_MACS && super::pool::run(blocks, macs, f) {
            return;
        }
        if blocks >= 2 && macs >= PARALLEL_MIN_MACS {
            if let Executor::MultiThread(pool) = current_tract_executor() {
                let threads = pool.current_num_threads();
                if threads > 1 {
                    let parts = threads.min(blocks);
                    pool.scope(|s| {
                        for p in 1..parts {
                            let (b0, b1) = (blocks * p / parts, blocks * (p + 1) / parts);
                            s.spawn(move |_| f(b0, b1));
                        }
                        f(0, blocks / parts);
                    });
                    return;
                }
            }
        }
    }
    let _ = macs;
    f(0, blocks)
}

/// The threads [`parallel_ranges`] splits work across now (1 without the `threads` feature).
pub(crate) fn threads() -> usize {
    #[cfg(feature = "threads")]
    return super::pool::threads();
    #[allow(unreachable_code)]
    1
}

/// Uses every core for matrix products (native builds with the `threads` feature); `n` <= 1 runs
/// single-threaded.
pub fn set_threads(n: usize) {
    #[cfg(feature = "threads")]
    {
        use tract_linalg::multithread::{set_default_executor, Executor};
        set_default_executor(if n > 1 {
            Executor::multithread(n)
        } else {
            Executor::SingleThread
        });
        super::pool::set_threads(n);
    }
    #[cfg(not(feature = "threads"))]
    let _ = n;
}
