//! A global budget for request bodies held in memory at once.
//!
//! Model routes buffer the whole body before anything goes upstream (the body
//! decides routing and authorization). One 32 MiB body is fine; a thousand at
//! once is not. Every buffered byte is reserved here first, and a request that
//! does not fit is answered 503 instead of growing the process without bound.
//!
//! Bytes are reserved as they arrive, never from a declared `Content-Length`:
//! otherwise a few connections that announce 32 MiB and then send a byte a
//! second would hold the whole budget without costing the sender anything.
//! [`Uploads`] also caps how many bodies one key and one client IP may be
//! sending at once, so a slow sender cannot crowd out everyone else.

use std::net::IpAddr;
use std::time::Duration;

use pingora_limits::inflight::{Guard, Inflight};

use crate::labels::LimitReason;
use crate::policy::limits::Refusal;

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

/// Request bodies being received at once, per key and per client IP
/// (count-min estimates: bounded memory however many addresses show up).
pub struct Uploads {
    per_key: Option<u32>,
    per_ip: Option<u32>,
    keys: Inflight,
    ips: Inflight,
}

fn too_many(reason: LimitReason, who: &str, max: u32, setting: &str) -> Refusal {
    Refusal {
        reason,
        message: format!(
            "{who} is already sending {max} request bodies at once (limits.{setting}); retry when one has arrived"
        ),
        retry_after: Duration::from_secs(1),
    }
}

/// One body being received: its key's and its address's counts (two fixed
/// slots, no `Vec`), given back when dropped.
pub struct UploadSlot {
    _key: Option<Guard>,
    _ip: Option<Guard>,
}

impl std::fmt::Debug for UploadSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("UploadSlot")
    }
}

impl Uploads {
    pub fn new(per_key: Option<u32>, per_ip: Option<u32>) -> Uploads {
        Uploads {
            per_key,
            per_ip,
            keys: Inflight::new(),
            ips: Inflight::new(),
        }
    }

    /// Counts one more body of `key` from `ip`, or refuses it.
    pub fn enter(&self, key: &str, ip: Option<IpAddr>) -> Result<UploadSlot, Refusal> {
        let mut slot = UploadSlot {
            _key: None,
            _ip: None,
        };
        if let Some(max) = self.per_key {
            let (guard, n) = self.keys.incr(key, 1);
            slot._key = Some(guard);
            if n > max as isize {
                let who = format!("the API key '{key}'");
                return Err(too_many(
                    LimitReason::KeyUploads,
                    &who,
                    max,
                    "max_uploads_per_key",
                ));
            }
        }
        if let (Some(max), Some(ip)) = (self.per_ip, ip) {
            let (guard, n) = self.ips.incr(ip, 1);
            slot._ip = Some(guard);
            if n > max as isize {
                return Err(too_many(
                    LimitReason::IpUploads,
                    "this address",
                    max,
                    "max_uploads_per_ip",
                ));
            }
        }
        Ok(slot)
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
    fn uploads_are_capped_per_key_and_per_ip() {
        let u = Uploads::new(Some(2), Some(2));
        let ip = |s: &str| Some(s.parse::<IpAddr>().unwrap());
        let a1 = u.enter("a", ip("192.0.2.1")).unwrap();
        let _a2 = u.enter("a", ip("192.0.2.2")).unwrap();
        assert_eq!(
            u.enter("a", ip("192.0.2.3")).unwrap_err().reason,
            LimitReason::KeyUploads
        );
        let _b1 = u.enter("b", ip("192.0.2.1")).unwrap();
        assert_eq!(
            u.enter("c", ip("192.0.2.1")).unwrap_err().reason,
            LimitReason::IpUploads
        );
        drop(a1);
        assert!(u.enter("a", ip("192.0.2.9")).is_ok());
        let free = Uploads::new(None, None);
        let _held: Vec<_> = (0..100).map(|_| free.enter("a", None).unwrap()).collect();
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
