//! The spinning thread pool: worker threads that poll for the next job instead of sleeping, for
//! the small, back-to-back matrix products of a decode step.
//!
//! A decode step runs ~200 products of 0.1 to 1 M multiply-adds each (~10 to 70 us). Waking a
//! sleeping pool thread for each costs about as much as the product (more in a VM), so with a
//! rayon pool 2 threads decoded slower than 1. These workers instead poll for the next job for a
//! while (a few milliseconds) before they park, as llama.cpp's do: while tokens are being
//! generated a job starts within a fraction of a microsecond. Only one caller at a time uses them
//! (a server's other sessions run their products on their own thread meanwhile).

use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::Thread;

/// Polls before a worker parks (~1 to 3 ms of `spin_loop` hints).
const SPIN_ROUNDS: usize = 1 << 16;

type Job = dyn Fn(usize, usize) + Sync;

/// One worker's mailbox: the caller writes `job` and `range`, then bumps `seq`; the worker runs
/// it and sets `done` to that `seq`.
struct Slot {
    seq: AtomicUsize,
    done: AtomicUsize,
    panicked: AtomicBool,
    parked: AtomicBool,
    /// Written by the caller before the `seq` bump (Release), read by the worker after seeing
    /// it (Acquire); the caller waits for `done` before the job's borrow ends.
    job: UnsafeCell<Option<(*const Job, usize, usize)>>,
}

// SAFETY: the only field that is not Sync is `job`, which the caller and the worker never touch
// at the same time: the caller writes it only while the worker is idle (`done` == `seq`) and
// publishes it by the Release store of `seq`; the worker reads it after its Acquire load of `seq`.
unsafe impl Sync for Slot {}
// SAFETY: the raw job pointer is only dereferenced under the protocol above, while the caller
// that owns the closure waits for `done`.
unsafe impl Send for Slot {}

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

impl Pool {
    fn start(workers: usize) -> Pool {
        let mut slots = vec![];
        let mut threads = vec![];
        for i in 0..workers {
            let slot = Arc::new(Slot {
                seq: AtomicUsize::new(0),
                done: AtomicUsize::new(0),
                panicked: AtomicBool::new(false),
                parked: AtomicBool::new(false),
                job: UnsafeCell::new(None),
            });
            let s = slot.clone();
            let handle = std::thread::Builder::new()
                .name(format!("slm-spin-{i}"))
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
        let mut rounds = 0;
        let seq = loop {
            let s = slot.seq.load(Ordering::Acquire);
            if s != seen {
                break s;
            }
            if rounds < SPIN_ROUNDS {
                rounds += 1;
                std::hint::spin_loop();
            } else {
                // Parked until the next job (idle workers cost nothing); the timeout only bounds
                // what a missed unpark could cost.
                slot.parked.store(true, Ordering::SeqCst);
                if slot.seq.load(Ordering::SeqCst) == seen {
                    std::thread::park_timeout(std::time::Duration::from_millis(50));
                }
                slot.parked.store(false, Ordering::SeqCst);
            }
        };
        seen = seq;
        // SAFETY: the caller wrote `job` before its Release store of `seq` (seen above with
        // Acquire) and does not write it again before this worker stores `done`.
        if let Some((job, b0, b1)) = unsafe { *slot.job.get() } {
            // SAFETY: the caller keeps the closure borrowed (alive) until it sees `done` == `seq`.
            let job = unsafe { &*job };
            if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job(b0, b1))).is_err() {
                slot.panicked.store(true, Ordering::SeqCst);
            }
        }
        slot.done.store(seq, Ordering::Release);
    }
}

/// Runs `f(b0, b1)` over `0..blocks` split between the caller and the workers; false (nothing
/// run) when there are no workers or another caller is using them.
pub fn run<'a>(blocks: usize, f: &'a (dyn Fn(usize, usize) + Sync + 'a)) -> bool {
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
    // SAFETY: only the borrow's lifetime is erased (same type otherwise); every worker given a
    // part is waited for below, before `f` goes out of scope, so none uses it past its lifetime.
    let job: *const Job =
        unsafe { std::mem::transmute::<&'a (dyn Fn(usize, usize) + Sync + 'a), &'static Job>(f) };
    let mut sent = vec![];
    for p in 1..parts {
        let (slot, thread) = (&pool.slots[p - 1], &pool.threads[p - 1]);
        let seq = slot.seq.load(Ordering::Relaxed) + 1;
        // SAFETY: the worker is idle (its `done` equals the last `seq`), so no one reads `job`.
        unsafe { *slot.job.get() = Some((job, blocks * p / parts, blocks * (p + 1) / parts)) };
        slot.seq.store(seq, Ordering::SeqCst);
        if slot.parked.load(Ordering::SeqCst) {
            thread.unpark();
        }
        sent.push((slot, seq));
    }
    let mine = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(0, blocks / parts)));
    let mut worker_panicked = false;
    for (slot, seq) in sent {
        while slot.done.load(Ordering::Acquire) != seq {
            std::hint::spin_loop();
        }
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

    #[test]
    fn parts_cover_the_range_once_and_panics_reach_the_caller() {
        set_threads(3);
        let hits: Vec<AtomicUsize> = (0..100).map(|_| AtomicUsize::new(0)).collect();
        for _ in 0..200 {
            let ran = run(100, &|b0, b1| {
                for h in &hits[b0..b1] {
                    h.fetch_add(1, Ordering::Relaxed);
                }
            });
            assert!(ran);
        }
        assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 200));
        let r = std::panic::catch_unwind(|| run(10, &|b0, _| assert!(b0 == 0, "boom")));
        assert!(r.is_err());
        // The workers still serve after a panic.
        assert!(run(10, &|_, _| {}));
        set_threads(1);
        assert!(!run(10, &|_, _| {}));
    }
}
