//! Cache-affinity routing, as pure logic: which server most likely holds a
//! request's prompt prefix in its KV cache, and whether it may take it.
//!
//! Each server has an [`Index`]: a bounded LRU set of the prefix hashes
//! (from `openai/prefix.rs`) of the prompts it processed, each with the
//! prompt tokens it stands for. Its budget is in tokens, from the server's
//! context (`upstream.servers[].context`, all slots together) times
//! [`CACHE_FACTOR`]: llama-server keeps the prompts of its slots and, in
//! host RAM (`--cache-ram`), those it evicted, so it remembers more than one
//! context. What it forgot anyway is corrected by the closed loop
//! ([`Index::correct`]): a response that reports less reuse than predicted
//! removes the entries past what was reused.
//!
//! [`choose`]: the server with the longest matching prefix (an explicit
//! session key counts as a match of the whole prefix), unless taking one
//! more request would put it above `(1 + ε)` times the mean load (bounded
//! load, as in consistent hashing with bounded loads) while it has no free
//! slot; then the least-loaded server (the fall-back). Equal candidates
//! (same match, same load) take turns.
//!
//! Pure: no Pingora, no sockets, no clock; must not import `gateway`.

use std::collections::{BTreeMap, HashMap};

use crate::openai::prefix::Affinity;

/// The index remembers this many times the server's context in tokens.
pub const CACHE_FACTOR: u64 = 4;

/// How a server was chosen for a request, for metrics and the closed loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The server with the longest matching prefix (or the session key).
    Hit,
    /// No server knew the prefix: the least-loaded one.
    Miss,
    /// The server with the prefix was too loaded: the least-loaded one.
    Fallback,
}

impl Outcome {
    pub fn label(self) -> crate::labels::RoutingOutcome {
        match self {
            Outcome::Hit => crate::labels::RoutingOutcome::Hit,
            Outcome::Miss => crate::labels::RoutingOutcome::Miss,
            Outcome::Fallback => crate::labels::RoutingOutcome::Fallback,
        }
    }
}

/// The choice made for one attempt: the outcome and the prompt tokens the
/// chosen server is predicted to reuse.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Choice {
    pub outcome: Outcome,
    pub predicted: u64,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    /// When it was last recorded (the index's own counter).
    last: u64,
    /// Tokens its block adds to the prefix before it (at least 1).
    tokens: u64,
}

/// One server's prefix hashes, least recently used evicted first.
#[derive(Debug)]
pub struct Index {
    budget: u64,
    used: u64,
    tick: u64,
    entries: HashMap<u64, Entry>,
    /// `last` → hash, oldest first.
    order: BTreeMap<u64, u64>,
}

impl Index {
    /// An index holding prefixes worth up to `budget` tokens (at least 1).
    pub fn new(budget: u64) -> Index {
        Index {
            budget: budget.max(1),
            used: 0,
            tick: 0,
            entries: HashMap::new(),
            order: BTreeMap::new(),
        }
    }

    /// The budget for a server with `context` tokens of context (`-c`).
    pub fn budget_for(context: u64) -> u64 {
        context.saturating_mul(CACHE_FACTOR)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Tokens of the prefixes held.
    pub fn used(&self) -> u64 {
        self.used
    }

    /// The prompt tokens of `key` this server is predicted to hold: the
    /// whole prefix for a known session key, else the longest prefix whose
    /// hash is held.
    pub fn matched(&self, key: &Affinity) -> u64 {
        if key.explicit.is_some_and(|k| self.entries.contains_key(&k)) {
            return key.tokens().max(1);
        }
        key.blocks
            .iter()
            .rev()
            .find(|b| self.entries.contains_key(&b.hash))
            .map_or(0, |b| b.tokens)
    }

    /// Records that this server processed the prompt of `key` (all of it:
    /// after a response, the server holds the prompt it just read).
    pub fn record(&mut self, key: &Affinity) {
        let mut before = 0;
        for b in &key.blocks {
            self.touch(b.hash, b.tokens.saturating_sub(before));
            before = b.tokens;
        }
        if let Some(k) = key.explicit {
            self.touch(k, 0);
        }
        while self.used > self.budget && self.evict_oldest() {}
    }

    fn touch(&mut self, hash: u64, tokens: u64) {
        self.tick += 1;
        let last = self.tick;
        match self.entries.get_mut(&hash) {
            Some(e) => {
                self.order.remove(&e.last);
                e.last = last;
            }
            None => {
                // Every entry costs at least one token of the budget: a
                // session key (which adds no tokens) or a tiny block still
                // takes memory, and a client sending a new session per
                // request must not grow the index without bound.
                let tokens = tokens.max(1);
                self.entries.insert(hash, Entry { last, tokens });
                self.used += tokens;
            }
        }
        self.order.insert(last, hash);
    }

    fn evict_oldest(&mut self) -> bool {
        let Some((_, hash)) = self.order.pop_first() else {
            return false;
        };
        if let Some(e) = self.entries.remove(&hash) {
            self.used -= e.tokens;
        }
        true
    }

    fn remove(&mut self, hash: u64) {
        if let Some(e) = self.entries.remove(&hash) {
            self.order.remove(&e.last);
            self.used -= e.tokens;
        }
    }

    /// The closed loop: the server reported reusing `actual` prompt tokens
    /// where `predicted` were expected. When it reused less than half, the
    /// entries of `key` past what it reused are gone from it (evicted,
    /// restarted, or another slot took them), and so is the session key.
    /// Returns whether anything was forgotten.
    pub fn correct(&mut self, key: &Affinity, predicted: u64, actual: u64) -> bool {
        if predicted == 0 || actual.saturating_mul(2) >= predicted {
            return false;
        }
        for b in key.blocks.iter().filter(|b| b.tokens > actual) {
            self.remove(b.hash);
        }
        if let Some(k) = key.explicit {
            self.remove(k);
        }
        true
    }

    /// Forgets everything (the server went down: its cache is gone).
    pub fn clear(&mut self) {
        self.entries.clear();
        self.order.clear();
        self.used = 0;
    }
}

/// A server as [`choose`] sees it (routable ones only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate {
    pub index: usize,
    /// Requests assigned to it, queued ones included.
    pub assigned: usize,
    /// Its slots; 0 (no limit) counts as 1.
    pub slots: usize,
    /// Prompt tokens it is predicted to hold ([`Index::matched`]).
    pub matched: u64,
}

impl Candidate {
    fn slots(&self) -> usize {
        self.slots.max(1)
    }

    /// Load per slot, comparable across servers without floats.
    fn load(&self) -> u64 {
        (self.assigned as u64 * 1024) / self.slots() as u64
    }
}

/// Whether `c` may take one more request under bounded load: it has a free
/// slot, or one more would keep it within `(1 + epsilon)` times its share of
/// all requests (the new one included), rounded up.
pub fn within_bound(c: &Candidate, all: &[Candidate], epsilon: f64) -> bool {
    if c.assigned < c.slots() {
        return true;
    }
    let total: usize = all.iter().map(|c| c.assigned).sum::<usize>() + 1;
    let slots: usize = all.iter().map(Candidate::slots).sum();
    let share = total as f64 * c.slots() as f64 / slots.max(1) as f64;
    let cap = ((1.0 + epsilon) * share).ceil();
    (c.assigned + 1) as f64 <= cap
}

/// Out of `of` servers, the one for a request whose candidates (routable,
/// not yet tried) are `all`, rotating among equals from `start`; `None`
/// when there is none.
pub fn choose(all: &[Candidate], epsilon: f64, start: usize, of: usize) -> Option<(usize, Choice)> {
    let of = of.max(1);
    let turn = |c: &Candidate| (c.index + of - start % of) % of;
    let least_load = |cands: &mut dyn Iterator<Item = &Candidate>| {
        cands.min_by_key(|c| (c.load(), turn(c))).copied()
    };
    let best = all.iter().map(|c| c.matched).max()?;
    if best == 0 {
        let c = least_load(&mut all.iter())?;
        let choice = Choice {
            outcome: Outcome::Miss,
            predicted: 0,
        };
        return Some((c.index, choice));
    }
    let holders = all
        .iter()
        .filter(|c| c.matched == best && within_bound(c, all, epsilon));
    if let Some(c) = least_load(&mut { holders }) {
        let choice = Choice {
            outcome: Outcome::Hit,
            predicted: best,
        };
        return Some((c.index, choice));
    }
    let c = least_load(&mut all.iter())?;
    let choice = Choice {
        outcome: Outcome::Fallback,
        predicted: c.matched,
    };
    Some((c.index, choice))
}

#[cfg(test)]
mod tests;
