//! A global budget for request bodies held in memory at once.
//!
//! Model routes buffer the whole body before anything goes upstream (the body
//! decides routing and authorization). One 32 MiB body is fine; a thousand at
//! once is not. Every buffered byte is reserved here first, and a request that
//! does not fit is answered 503 instead of growing the process without bound.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

#[derive(Debug)]
pub struct BodyBudget {
    used: AtomicUsize,
    limit: usize,
}

impl BodyBudget {
    pub fn new(limit: usize) -> Arc<BodyBudget> {
        Arc::new(BodyBudget {
            used: AtomicUsize::new(0),
            limit,
        })
    }

    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    fn try_take(&self, bytes: usize) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(bytes).filter(|&total| total <= self.limit)
            })
            .is_ok()
    }
}

/// Bytes reserved for one request; released when dropped.
#[derive(Debug)]
pub struct Reservation {
    budget: Arc<BodyBudget>,
    bytes: usize,
}

impl Reservation {
    pub fn empty(budget: &Arc<BodyBudget>) -> Reservation {
        Reservation {
            budget: budget.clone(),
            bytes: 0,
        }
    }

    /// Grows the reservation to at least `total` bytes; false if the budget is spent.
    pub fn grow_to(&mut self, total: usize) -> bool {
        if total <= self.bytes {
            return true;
        }
        let extra = total - self.bytes;
        if self.budget.try_take(extra) {
            self.bytes = total;
            true
        } else {
            false
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.budget.used.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_share_the_limit_and_release_on_drop() {
        let budget = BodyBudget::new(100);
        let mut a = Reservation::empty(&budget);
        assert!(a.grow_to(60));
        assert!(a.grow_to(50), "shrinking requests are free");
        let mut b = Reservation::empty(&budget);
        assert!(!b.grow_to(41));
        assert!(b.grow_to(40));
        assert_eq!(budget.used(), 100);
        drop(a);
        assert_eq!(budget.used(), 40);
        assert!(b.grow_to(100));
        drop(b);
        assert_eq!(budget.used(), 0);
    }

    #[test]
    fn concurrent_reservations_never_exceed_the_limit() {
        let budget = BodyBudget::new(1000);
        let handles: Vec<_> = (0..8)
            .map(|_| {
                let budget = budget.clone();
                std::thread::spawn(move || {
                    for _ in 0..1000 {
                        let mut r = Reservation::empty(&budget);
                        if r.grow_to(300) {
                            assert!(budget.used() <= 1000);
                        }
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        assert_eq!(budget.used(), 0);
    }
}
