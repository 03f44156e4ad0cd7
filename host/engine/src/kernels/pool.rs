//! The worker pool for the small, back-to-back matrix products of a decode step.
//!
//! A decode step runs ~200 products of 0.1 to 1 M multiply-adds each (~10 to 70 us). Waking a
//! sleeping thread for each costs about as much as the product (more in a VM), so with a rayon
//! pool 2 threads decoded slower than 1. These workers poll for the next job for a short while
//! before they park: while tokens are being generated a job starts within a microsecond.
//!
//! On a busy machine (other processes on the same cores) any thread may be descheduled for a
//! whole scheduler slice (milliseconds). So nothing here waits for a thread that is not running:
//! - a product is cut into chunks (one per thread; more for a large product), claimed one at a
//!   time from a shared counter, so the caller runs the chunks of a worker that has not started;
//! - a worker that has not started when the caller ran out of chunks is told not to start
//!   (`taken`), and the caller returns without it;
//! - the caller polls briefly for a worker still in its last chunk, then parks until the worker
//!   unparks it;
//! - an idle worker polls for the next job, then parks. It polls for up to a millisecond, but only
//!   0.1 ms after it was found descheduled while polling (the caller called its job off): a
//!   thread that polls on a busy core spends the share of the core it will need for its next job.
//!
//! Each output element is computed by one thread, whole, whatever the split: results do not
//! depend on the thread count or on who ran which chunk. Only one caller at a time uses the
//! workers (a server's concurrent sessions of one model share one run, `batching.rs`; those of
//! other models run their products on their own thread meanwhile).

use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::Thread;
use std::time::{Duration, Instant};

/// How long an idle worker polls for the next job before it parks (microseconds), on a quiet
/// machine: longer than the gaps between the products of a decode step and between two tokens.
const IDLE_POLL_US: u32 = 1000;
/// The same once the worker was found descheduled while polling: longer than the gaps between the
/// products of a step (the other ops, ~5 to 50 us), much shorter than a scheduler slice. Measured
/// on 2 cores with 2 CPU hogs: decode 53 tokens/s polling 0.1 ms, 41 polling 2 ms.
const BUSY_IDLE_POLL_US: u32 = 100;
/// Added back to a worker's polling time for each job it starts (up to [`IDLE_POLL_US`]).
const IDLE_POLL_RECOVERY_US: u32 = 10;

/// How long the caller polls for a worker's last chunk before it parks.
const WAIT_POLL: Duration = Duration::from_micros(30);

/// Polls between two looks at the clock.
const POLLS_PER_CHECK: u32 = 128;

/// Work (multiply-adds) per chunk beyond the one chunk per thread: a decode step's layer products
/// (under 1 M) are cut in one chunk per thread (more chunks cost ~5% of decode on a quiet machine),
/// the LM head (~28 M) in up to [`MAX_CHUNKS_PER_THREAD`] per thread.
const CHUNK_MACS: usize = 1 << 21;
const MAX_CHUNKS_PER_THREAD: usize = 8;

/// One product: `f` over `0..blocks`, cut into `chunks` contiguous chunks that whoever runs
/// claims one at a time.
struct Job<'a> {
    f: &'a (dyn Fn(usize, usize) + Sync + 'a),
    blocks: usize,
    chunks: usize,
    next: AtomicUsize,
    /// Unparked by a worker that finishes while the caller is parked.
    caller: Thread,
}

impl Job<'_> {
    /// Runs chunks until none is left.
    fn drain(&self) {
        loop {
            let c = self.next.fetch_add(1, Ordering::Relaxed);
            if c >= self.chunks {
                return;
            }
            (self.f)(
                self.blocks * c / self.chunks,
                self.blocks * (c + 1) / self.chunks,
            );
        }
    }
}

/// One worker's mailbox. Jobs are numbered: the caller writes `job`, then sets `posted` to the
/// job's number; the worker or the caller (to call it off) then sets `taken` to that number,
/// whoever comes first; a worker that took a job sets `done` to its number when it has finished.
struct Slot {
    posted: AtomicUsize,
    taken: AtomicUsize,
    done: AtomicUsize,
    panicked: AtomicBool,
    worker_parked: AtomicBool,
    caller_parked: AtomicBool,
    /// How long the worker polls for its next job before it parks, in microseconds.
    idle_poll_us: AtomicU32,
    /// Written by the caller before its `posted` store (SeqCst), read by the worker only after
    /// it has taken that job; the caller keeps the job alive until `done`.
    job: UnsafeCell<*const Job<'static>>,
}

// SAFETY: `job` is the only field that is not Sync. The caller writes it only when no job of
// this slot is taken and unfinished (the previous one is `done` or was called off), and
// publishes it with its store of `posted`; the worker reads it only after winning `taken` for
// that number, which it can only do after seeing `posted`.
unsafe impl Sync for Slot {}
// SAFETY: the raw job pointer is only dereferenced under the protocol above, while the caller
// that owns the job waits for `done`.
unsafe impl Send for Slot {}

impl Slot {
    fn new() -> Slot {
        Slot {
            posted: AtomicUsize::new(0),
            taken: AtomicUsize::new(0),
            done: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            worker_parked: AtomicBool::new(false),
            caller_parked: AtomicBool::new(false),
            idle_poll_us: AtomicU32::new(IDLE_POLL_US),
            job: UnsafeCell::new(std::ptr::null()),
        }
    }

    /// Takes job `n` (for the worker, to run it; for the caller, to call it off). Job `n - 1`
    /// was taken before `n` was posted, so exactly one of the two wins.
    fn take(&self, n: usize) -> bool {
        self.taken
            .compare_exchange(n - 1, n, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
    }
}

struct Pool {
    slots: Vec<Arc<Slot>>,
    threads: Vec<Thread>,
    /// Held by the one caller using the workers.
    busy: Mutex<()>,
}

static POOL: OnceLock<Mutex<Option<Arc<Pool>>>> = OnceLock::new();

fn pool_cell() -> &'static Mutex<Option<Arc<Pool>>> {
    POOL.get_or_init(|| Mutex::new(None))
}

/// Uses `threads` threads in all (the caller and `threads - 1` workers); 1 turns them off.
pub fn set_threads(threads: usize) {
    let mut cell = pool_cell().lock().unwrap_or_else(|e| e.into_inner());
    if cell.as_ref().map(|p| p.slots.len() + 1) == Some(threads.max(1)) {
        return;
    }
    // Workers of a previous setting stay parked (they hold only their slot).
    *cell = (threads > 1).then(|| Arc::new(Pool::start(threads - 1)));
}

/// The threads a product may use: the caller and the workers.
pub fn threads() -> usize {
    pool_cell()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .as_ref()
        .map_or(1, |p| p.slots.len() + 1)
}

impl Pool {
    fn start(workers: usize) -> Pool {
        let mut slots = vec![];
        let mut threads = vec![];
        for i in 0..workers {
            let slot = Arc::new(Slot::new());
            let s = slot.clone();
            let handle = std::thread::Builder::new()
                .name(format!("slm-worker-{i}"))
                .spawn(move || work(&s))
                .expect("cannot start a worker thread");
            threads.push(handle.thread().clone());
            slots.push(slot);
        }
        Pool {
            slots,
            threads,
            busy: Mutex::new(()),
        }
    }
}

fn work(slot: &Slot) {
    let mut seen = 0;
    loop {
        let n = next_post(slot, seen);
        seen = n;
        if !slot.take(n) {
            continue; // called off: the caller ran every chunk itself
        }
        // SAFETY: the caller wrote the pointer before posting `n` (seen above), and keeps the
        // job alive until it sees `done` == n, which this worker has taken.
        let job = unsafe { &**slot.job.get() };
        let caller = job.caller.clone();
        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job.drain())).is_err() {
            slot.panicked.store(true, Ordering::SeqCst);
        }
        slot.done.store(n, Ordering::SeqCst);
        // `job` may be gone from here on. A stale flag only costs a spurious unpark.
        if slot.caller_parked.load(Ordering::SeqCst) {
            caller.unpark();
        }
    }
}

/// Waits for a job numbered other than `seen`: polls for the slot's `idle_poll_us`, then parks.
/// Each job found lengthens the next polls a little (back towards [`IDLE_POLL_US`]).
fn next_post(slot: &Slot, seen: usize) -> usize {
    let start = Instant::now();
    let poll = Duration::from_micros(slot.idle_poll_us.load(Ordering::Relaxed) as u64);
    let mut polls = 0u32;
    loop {
        let n = slot.posted.load(Ordering::SeqCst);
        if n != seen {
            let us = slot.idle_poll_us.load(Ordering::Relaxed);
            if us < IDLE_POLL_US {
                let longer = (us + IDLE_POLL_RECOVERY_US).min(IDLE_POLL_US);
                slot.idle_poll_us.store(longer, Ordering::Relaxed);
            }
            return n;
        }
        polls += 1;
        if polls % POLLS_PER_CHECK != 0 || start.elapsed() < poll {
            std::hint::spin_loop();
            continue;
        }
        // Parked until the next job; the timeout only bounds what a missed unpark could cost.
        slot.worker_parked.store(true, Ordering::SeqCst);
        while slot.posted.load(Ordering::SeqCst) == seen {
            std::thread::park_timeout(Duration::from_millis(50));
        }
        slot.worker_parked.store(false, Ordering::SeqCst);
    }
}

/// Waits until the worker has finished job `n`: polls for [`WAIT_POLL`] (its last chunk is
/// usually that close to done), then parks until the worker unparks it.
fn wait_done(slot: &Slot, n: usize) {
    let start = Instant::now();
    let mut polls = 0u32;
    while slot.done.load(Ordering::SeqCst) != n {
        polls += 1;
        if polls % POLLS_PER_CHECK != 0 || start.elapsed() < WAIT_POLL {
            std::hint::spin_loop();
            continue;
        }
        slot.caller_parked.store(true, Ordering::SeqCst);
        while slot.done.load(Ordering::SeqCst) != n {
            std::thread::park_timeout(Duration::from_millis(5));
        }
        slot.caller_parked.store(false, Ordering::SeqCst);
    }
}

/// Runs `f(b0, b1)` over `0..blocks` split between the caller and the workers; false (nothing
/// run) when there are no workers or another caller is using them.
/// `macs` (the product's multiply-adds) sets how many chunks it is cut into.
pub fn run<'a>(blocks: usize, macs: usize, f: &'a (dyn Fn(usize, usize) + Sync + 'a)) -> bool {
    let pool = match pool_cell()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .as_ref()
    {
        Some(p) => p.clone(),
        None => return false,
    };
    let _busy = match pool.busy.try_lock() {
        Ok(guard) => guard,
        // A panic that went through here earlier: the workers are idle again.
        Err(std::sync::TryLockError::Poisoned(e)) => e.into_inner(),
        Err(std::sync::TryLockError::WouldBlock) => return false,
    };
    let parts = (pool.slots.len() + 1).min(blocks);
    if parts < 2 {
        return false;
    }
    let job = Job {
        f,
        blocks,
        chunks: (macs / CHUNK_MACS)
            .clamp(parts, parts * MAX_CHUNKS_PER_THREAD)
            .min(blocks),
        next: AtomicUsize::new(0),
        caller: std::thread::current(),
    };
    // SAFETY: only the lifetime is erased (same type otherwise); every worker that takes this
    // job is waited for below, before `job` goes out of scope, and the others never read it.
    let erased: *const Job<'static> =
        unsafe { std::mem::transmute::<*const Job<'_>, *const Job<'static>>(&job) };
    let helpers = &pool.slots[..parts - 1];
    // Per helper: whether it was polling (not parked) when its job was posted.
    let mut polling = [false; 64];
    for (i, (slot, thread)) in helpers.iter().zip(&pool.threads).enumerate() {
        let n = slot.posted.load(Ordering::SeqCst) + 1;
        // SAFETY: the slot's previous job is done or was called off (both waited for below,
        // in the previous call), so no worker reads `job` now.
        unsafe { *slot.job.get() = erased };
        slot.posted.store(n, Ordering::SeqCst);
        if slot.worker_parked.load(Ordering::SeqCst) {
            thread.unpark();
        } else if let Some(p) = polling.get_mut(i) {
            *p = true;
        }
    }
    let mine = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job.drain()));
    let mut worker_panicked = false;
    for (i, slot) in helpers.iter().enumerate() {
        let n = slot.posted.load(Ordering::SeqCst);
        if slot.take(n) {
            // The worker had not started: called off, nothing to wait for. Polling all the
            // while, it would have started within a microsecond: it was descheduled.
            if polling.get(i) == Some(&true) {
                slot.idle_poll_us
                    .store(BUSY_IDLE_POLL_US, Ordering::Relaxed);
            }
            continue;
        }
        wait_done(slot, n);
        worker_panicked |= slot.panicked.swap(false, Ordering::SeqCst);
    }
    if let Err(p) = mine {
        std::panic::resume_unwind(p);
    }
    assert!(
        !worker_panicked,
        "a worker thread panicked in a parallel product"
    );
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One test: the pool is process-wide, and tests run in parallel.
    #[test]
    fn chunks_cover_the_range_once_busy_or_not_and_panics_reach_the_caller() {
        set_threads(3);
        let hits: Vec<AtomicUsize> = (0..100).map(|_| AtomicUsize::new(0)).collect();
        let cover = |rounds: usize| {
            for r in 0..rounds {
                // One chunk per thread, and the most chunks.
                let macs = if r % 2 == 0 { 0 } else { 1 << 30 };
                // Other tests' products may hold the workers for a moment: then nothing ran.
                while !run(100, macs, &|b0, b1| {
                    for h in &hits[b0..b1] {
                        h.fetch_add(1, Ordering::Relaxed);
                    }
                }) {}
            }
        };
        cover(200);
        assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 200));

        // Busy cores: more spinning threads than cores, so workers are descheduled mid-job,
        // start late (called off) or park; every block is still computed exactly once.
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        let stop = Arc::new(AtomicBool::new(false));
        let hogs: Vec<_> = (0..cores)
            .map(|_| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        std::hint::spin_loop();
                    }
                })
            })
            .collect();
        cover(300);
        // Workers that parked (idle longer than they poll) are woken by the next job.
        std::thread::sleep(Duration::from_millis(5));
        cover(100);
        stop.store(true, Ordering::Relaxed);
        hogs.into_iter().for_each(|h| h.join().unwrap());
        assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 600));

        let panicked = loop {
            match std::panic::catch_unwind(|| run(10, 1 << 24, &|b0, _| assert!(b0 != 3, "boom"))) {
                Ok(false) => continue, // the workers were busy: nothing ran
                Ok(true) => break false,
                Err(_) => break true,
            }
        };
        assert!(panicked);
        // The workers still serve after a panic.
        while !run(10, 0, &|_, _| {}) {}
        set_threads(1);
        assert!(!run(10, 0, &|_, _| {}));
    }
}
