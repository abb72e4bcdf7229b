//! Slot-aware admission: at most N requests in flight to an upstream.
//!
//! llama-server runs a fixed number of parallel slots (`-np`); requests
//! beyond that queue inside it, invisibly and without bound. The gateway
//! instead keeps at most `max_in_flight` requests at the upstream and queues
//! the rest itself, for a bounded time, fairly across keys (round-robin
//! between keys, first come first served within a key), so one client cannot
//! starve the others and a client that gives up leaves the queue at once.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::oneshot;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denied {
    /// More waiters than `max_queued`.
    QueueFull,
    /// Waited `queue_timeout` without a slot.
    Timeout,
    /// The shared store (`state.redis`) did not answer and
    /// `state.on_error` is `deny`.
    StoreUnavailable,
}

#[derive(Debug, Default)]
struct State {
    in_flight: usize,
    queued: usize,
    waiters: HashMap<String, VecDeque<oneshot::Sender<SlotPermit>>>,
    /// Keys with waiters, in round-robin order.
    order: VecDeque<String>,
}

#[derive(Debug)]
pub struct SlotQueue {
    limit: usize,
    max_queued: usize,
    state: Mutex<State>,
}

/// One upstream slot; handed to the next waiter when dropped.
#[derive(Debug)]
pub struct SlotPermit {
    queue: Option<Arc<SlotQueue>>,
}

impl Drop for SlotPermit {
    fn drop(&mut self) {
        if let Some(queue) = self.queue.take() {
            queue.release();
        }
    }
}

impl SlotQueue {
    pub fn new(limit: usize, max_queued: usize) -> Arc<SlotQueue> {
        Arc::new(SlotQueue {
            limit: limit.max(1),
            max_queued,
            state: Mutex::new(State::default()),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn in_flight(&self) -> usize {
        self.lock().in_flight
    }

    pub fn queued(&self) -> usize {
        self.lock().queued
    }

    /// Whether a request would take a slot at once, without queueing.
    pub fn has_room(&self) -> bool {
        let s = self.lock();
        s.in_flight < self.limit && s.queued == 0
    }

    /// A slot now, or none (nobody waiting is overtaken).
    pub fn try_acquire(self: &Arc<Self>) -> Option<SlotPermit> {
        let mut s = self.lock();
        if s.in_flight < self.limit && s.queued == 0 {
            s.in_flight += 1;
            return Some(SlotPermit {
                queue: Some(self.clone()),
            });
        }
        None
    }

    /// Waits for a slot for a request of `key`, at most `timeout`.
    /// Cancel-safe: dropping the future leaves the queue.
    pub async fn acquire(
        self: &Arc<Self>,
        key: &str,
        timeout: Duration,
    ) -> Result<SlotPermit, Denied> {
        let rx = {
            let mut s = self.lock();
            if s.in_flight < self.limit && s.queued == 0 {
                s.in_flight += 1;
                return Ok(SlotPermit {
                    queue: Some(self.clone()),
                });
            }
            if s.queued >= self.max_queued {
                return Err(Denied::QueueFull);
            }
            let (tx, rx) = oneshot::channel();
            let waiters = s.waiters.entry(key.to_string()).or_default();
            if waiters.is_empty() {
                s.order.push_back(key.to_string());
            }
            // re-borrow: entry() above ended
            if let Some(w) = s.waiters.get_mut(key) {
                w.push_back(tx);
            }
            s.queued += 1;
            rx
        };
        let _leave = LeaveQueue(self);
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(permit)) => Ok(permit),
            Ok(Err(_)) | Err(_) => Err(Denied::Timeout),
        }
    }

    /// A slot came free: hand it to the next waiter, or give it back.
    fn release(self: &Arc<Self>) {
        let mut s = self.lock();
        while let Some(key) = s.order.pop_front() {
            let Some(waiters) = s.waiters.get_mut(&key) else {
                continue;
            };
            let next = waiters.pop_front();
            let more = !waiters.is_empty();
            if more {
                s.order.push_back(key.clone());
            } else {
                s.waiters.remove(&key);
            }
            if let Some(tx) = next {
                match tx.send(SlotPermit {
                    queue: Some(self.clone()),
                }) {
                    Ok(()) => return,
                    // The waiter gave up: disarm the returned permit, try the next.
                    Err(mut permit) => {
                        permit.queue = None;
                    }
                }
            }
        }
        s.in_flight = s.in_flight.saturating_sub(1);
    }
}

/// Counts a waiter out of the queue however its wait ends.
struct LeaveQueue<'a>(&'a SlotQueue);

impl Drop for LeaveQueue<'_> {
    fn drop(&mut self) {
        let mut s = self.0.lock();
        s.queued = s.queued.saturating_sub(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn try_acquire_takes_a_free_slot_and_never_overtakes_a_waiter() {
        let q = SlotQueue::new(1, 100);
        let first = q.try_acquire().expect("a free slot");
        assert!(q.try_acquire().is_none(), "the only slot is taken");
        let waiter = tokio::spawn({
            let q = q.clone();
            async move { q.acquire("k", Duration::from_secs(10)).await.map(drop) }
        });
        for _ in 0..1000 {
            if q.queued() == 1 {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert_eq!(q.queued(), 1);
        // The freed slot goes to the waiter, not to a request that asks now.
        drop(first);
        assert!(q.try_acquire().is_none());
        waiter.await.unwrap().unwrap();
        assert!(q.try_acquire().is_some(), "free again");
    }

    #[tokio::test]
    async fn never_more_than_the_limit_and_fifo_within_a_key() {
        let q = SlotQueue::new(2, 100);
        let a = q.acquire("k", Duration::from_secs(1)).await.unwrap();
        let b = q.acquire("k", Duration::from_secs(1)).await.unwrap();
        assert_eq!(q.in_flight(), 2);
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for i in 0..4 {
            let (q, order) = (q.clone(), order.clone());
            tasks.push(tokio::spawn(async move {
                let p = q.acquire("k", Duration::from_secs(10)).await.unwrap();
                order.lock().unwrap().push(i);
                tokio::time::sleep(Duration::from_millis(10)).await;
                drop(p);
            }));
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(q.queued(), 4);
        drop(a);
        drop(b);
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(*order.lock().unwrap(), vec![0, 1, 2, 3]);
        assert_eq!(q.in_flight(), 0);
        assert_eq!(q.queued(), 0);
    }

    #[tokio::test]
    async fn fair_across_keys() {
        let q = SlotQueue::new(1, 100);
        let held = q.acquire("x", Duration::from_secs(1)).await.unwrap();
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        // a greedy key queues 3, then a polite key queues 1
        for key in ["greedy", "greedy", "greedy", "polite"] {
            let (q, order) = (q.clone(), order.clone());
            tasks.push(tokio::spawn(async move {
                let p = q.acquire(key, Duration::from_secs(10)).await.unwrap();
                order.lock().unwrap().push(key);
                drop(p);
            }));
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        drop(held);
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(
            *order.lock().unwrap(),
            vec!["greedy", "polite", "greedy", "greedy"]
        );
    }

    #[tokio::test]
    async fn timeouts_and_a_full_queue() {
        let q = SlotQueue::new(1, 1);
        let _held = q.acquire("k", Duration::from_secs(1)).await.unwrap();
        let waiting = {
            let q = q.clone();
            tokio::spawn(async move { q.acquire("k", Duration::from_millis(100)).await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(
            q.acquire("k", Duration::from_secs(1)).await.unwrap_err(),
            Denied::QueueFull
        );
        assert_eq!(waiting.await.unwrap().unwrap_err(), Denied::Timeout);
        assert_eq!(q.queued(), 0);
    }

    #[tokio::test]
    async fn a_waiter_that_leaves_does_not_leak_the_slot() {
        let q = SlotQueue::new(1, 10);
        let held = q.acquire("k", Duration::from_secs(1)).await.unwrap();
        let gone = {
            let q = q.clone();
            tokio::spawn(async move { q.acquire("k", Duration::from_secs(10)).await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        gone.abort();
        let _ = gone.await;
        drop(held);
        assert_eq!(
            q.in_flight(),
            0,
            "the slot went back, not to the departed waiter"
        );
        let again = q.acquire("k", Duration::from_millis(50)).await;
        assert!(again.is_ok());
    }
}
