//! Admission: how many generations run at once per model, and how many may wait.
//!
//! A request that would generate takes a slot of its model for its whole life (its stream
//! included); without a free slot it waits in the model's queue, and with the queue full it is
//! refused at once (503 with Retry-After), so a burst costs memory for at most
//! `max_running + max_queue` requests per model.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::metrics::Metrics;

/// The queue of this model is full.
#[derive(Debug)]
pub struct QueueFull {
    pub model: String,
    pub running: usize,
    pub waiting: usize,
}

struct Gate {
    slots: Arc<Semaphore>,
    waiting: AtomicUsize,
}

pub struct Admission {
    gates: BTreeMap<String, Gate>,
    max_running: usize,
    max_queue: usize,
    /// Generations running on all models (the heap is trimmed when it drops to 0).
    running: Arc<AtomicUsize>,
    metrics: Arc<Metrics>,
}

/// A running generation's slot, given back when dropped.
pub struct Slot {
    _permit: OwnedSemaphorePermit,
    model: String,
    running: Arc<AtomicUsize>,
    metrics: Arc<Metrics>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.metrics.running(&self.model).dec();
        if self.running.fetch_sub(1, Ordering::SeqCst) == 1 {
            // Idle: give the memory of a burst of long prompts back to the OS.
            slm_engine::release_free_memory();
        }
    }
}

/// Counts a waiting request until it gets a slot or gives up.
struct Waiting<'a> {
    gate: &'a Gate,
    model: &'a str,
    metrics: &'a Metrics,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.gate.waiting.fetch_sub(1, Ordering::SeqCst);
        self.metrics.waiting(self.model).dec();
    }
}

impl Admission {
    pub fn new(
        models: impl IntoIterator<Item = String>,
        max_running: usize,
        max_queue: usize,
        metrics: Arc<Metrics>,
    ) -> Admission {
        let gates = models
            .into_iter()
            .map(|m| {
                let gate = Gate {
                    slots: Arc::new(Semaphore::new(max_running)),
                    waiting: AtomicUsize::new(0),
                };
                (m, gate)
            })
            .collect();
        Admission {
            gates,
            max_running,
            max_queue,
            running: Arc::new(AtomicUsize::new(0)),
            metrics,
        }
    }

    /// A slot on `model`, waiting for one if need be; None for a model this host does not
    /// serve (the component answers that request itself).
    pub async fn admit(&self, model: &str) -> Result<Option<Slot>, QueueFull> {
        let Some(gate) = self.gates.get(model) else {
            return Ok(None);
        };
        let permit = match gate.slots.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                if gate.waiting.fetch_add(1, Ordering::SeqCst) >= self.max_queue {
                    let waiting = gate.waiting.fetch_sub(1, Ordering::SeqCst) - 1;
                    return Err(QueueFull {
                        model: model.to_string(),
                        running: self.max_running,
                        waiting,
                    });
                }
                self.metrics.waiting(model).inc();
                let _waiting = Waiting {
                    gate,
                    model,
                    metrics: &self.metrics,
                };
                let slots = gate.slots.clone();
                slots
                    .acquire_owned()
                    .await
                    .expect("the semaphore is never closed")
            }
        };
        self.running.fetch_add(1, Ordering::SeqCst);
        self.metrics.running(model).inc();
        Ok(Some(Slot {
            _permit: permit,
            model: model.to_string(),
            running: self.running.clone(),
            metrics: self.metrics.clone(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "current_thread")]
    async fn slots_then_queue_then_refusal() {
        let metrics = Arc::new(Metrics::new(Default::default()));
        let admission = Arc::new(Admission::new(["m".to_string()], 1, 1, metrics.clone()));
        assert!(admission.admit("other").await.unwrap().is_none());
        let first = admission.admit("m").await.unwrap().unwrap();
        // The second waits in the queue; the third finds the queue full.
        let a = admission.clone();
        let second = tokio::spawn(async move { a.admit("m").await.map(|s| s.is_some()) });
        tokio::task::yield_now().await;
        assert_eq!(metrics.waiting("m").get(), 1);
        let full = admission.admit("m").await.err().expect("queue full");
        assert_eq!((full.running, full.waiting), (1, 1));
        drop(first);
        assert!(second.await.unwrap().unwrap());
        assert_eq!(metrics.waiting("m").get(), 0);
        assert_eq!(metrics.running("m").get(), 0);
    }
}
