use super::*;
use crate::openai::prefix::{Affinity, Block};

/// A key of `n` blocks of 100 tokens each, from hashes `base..base+n`.
fn key(base: u64, n: u64) -> Affinity {
    Affinity {
        explicit: None,
        blocks: (0..n)
            .map(|i| Block {
                hash: base + i,
                tokens: (i + 1) * 100,
            })
            .collect(),
    }
}

fn cand(index: usize, assigned: usize, slots: usize, matched: u64) -> Candidate {
    Candidate {
        index,
        assigned,
        slots,
        matched,
    }
}

#[test]
fn the_longest_held_prefix_is_matched() {
    let mut idx = Index::new(10_000);
    idx.record(&key(0, 3));
    assert_eq!(idx.matched(&key(0, 5)), 300);
    assert_eq!(idx.matched(&key(0, 2)), 200);
    assert_eq!(idx.matched(&key(50, 2)), 0);
    assert_eq!(idx.used(), 300);
    assert_eq!(idx.len(), 3);
}

#[test]
fn the_budget_evicts_the_least_recently_used() {
    let mut idx = Index::new(500);
    idx.record(&key(0, 3)); // 300 tokens
    idx.record(&key(100, 2)); // 200 more: full
    idx.record(&key(0, 1)); // refreshes the first block only
    idx.record(&key(200, 1)); // 100 more: the oldest (block 1 of the first) goes
    assert_eq!(idx.matched(&key(0, 2)), 100);
    assert_eq!(idx.matched(&key(100, 2)), 200);
    assert_eq!(idx.matched(&key(200, 1)), 100);
    assert!(idx.used() <= 500);
}

#[test]
fn new_sessions_without_new_tokens_cannot_grow_the_index_past_its_budget() {
    let mut idx = Index::new(500);
    for session in 0..10_000 {
        // The same prompt, a new session key each time.
        let mut k = key(0, 1);
        k.explicit = Some(1_000_000 + session);
        idx.record(&k);
    }
    assert!(idx.used() <= 500, "{}", idx.used());
    assert!(idx.len() <= 500, "{} entries", idx.len());
}

#[test]
fn an_explicit_key_matches_the_whole_prefix() {
    let mut idx = Index::new(10_000);
    let mut k = key(0, 2);
    k.explicit = Some(99);
    idx.record(&k);
    let mut next = key(500, 4); // the prefix changed, the session did not
    next.explicit = Some(99);
    assert_eq!(idx.matched(&next), 400);
    next.explicit = Some(98);
    assert_eq!(idx.matched(&next), 0);
}

#[test]
fn less_reuse_than_predicted_forgets_the_entries_past_it() {
    let mut idx = Index::new(10_000);
    let mut k = key(0, 4);
    k.explicit = Some(7);
    idx.record(&k);
    // Reused about what was predicted: nothing changes.
    assert!(!idx.correct(&k, 400, 390));
    assert_eq!(idx.len(), 5);
    // Reused 150 of 400: blocks past 150 tokens and the session key go.
    assert!(idx.correct(&k, 400, 150));
    assert_eq!(idx.matched(&key(0, 4)), 100);
    assert_eq!(idx.matched(&k), 100);
    // Nothing predicted: nothing to correct.
    assert!(!idx.correct(&k, 0, 0));
    idx.clear();
    assert!(idx.is_empty());
    assert_eq!(idx.used(), 0);
}

#[test]
fn no_match_is_least_load_taking_turns() {
    let all = [cand(0, 1, 2, 0), cand(1, 0, 2, 0), cand(2, 0, 2, 0)];
    let (i, c) = choose(&all, 0.25, 0, 3).unwrap();
    assert_eq!((i, c.outcome, c.predicted), (1, Outcome::Miss, 0));
    assert_eq!(choose(&all, 0.25, 2, 3).unwrap().0, 2);
    assert!(choose(&[], 0.25, 0, 3).is_none());
}

#[test]
fn the_longest_match_wins_within_the_bound() {
    let all = [cand(0, 0, 2, 100), cand(1, 1, 2, 300), cand(2, 0, 2, 0)];
    let (i, c) = choose(&all, 0.25, 0, 3).unwrap();
    assert_eq!((i, c.outcome, c.predicted), (1, Outcome::Hit, 300));
}

#[test]
fn equal_matches_go_to_the_least_loaded_then_take_turns() {
    let all = [cand(0, 1, 2, 100), cand(1, 0, 2, 100), cand(2, 0, 2, 100)];
    assert_eq!(choose(&all, 0.25, 0, 3).unwrap().0, 1);
    assert_eq!(choose(&all, 0.25, 2, 3).unwrap().0, 2);
}

#[test]
fn an_overloaded_holder_falls_back_to_the_least_loaded() {
    // 3 servers of 2 slots; the holder has 4 (2 queued), the others 1 each:
    // one more would be 5 > ceil(1.25 * 7 / 3) = 3.
    let all = [cand(0, 4, 2, 500), cand(1, 1, 2, 0), cand(2, 1, 2, 100)];
    let (i, c) = choose(&all, 0.25, 0, 3).unwrap();
    assert_eq!(i, 1);
    assert_eq!(c.outcome, Outcome::Fallback);
    assert_eq!(c.predicted, 0);
    // With a larger epsilon the holder keeps it.
    assert_eq!(choose(&all, 2.0, 0, 3).unwrap().1.outcome, Outcome::Hit);
}

#[test]
fn a_free_slot_is_always_within_the_bound() {
    let all = [cand(0, 1, 2, 0), cand(1, 0, 2, 0)];
    assert!(within_bound(&all[0], &all, 0.0));
    let busy = [cand(0, 2, 2, 0), cand(1, 0, 2, 0)];
    assert!(!within_bound(&busy[0], &busy, 0.25));
    // Everyone equally busy: the share grows with the new request.
    let even = [cand(0, 2, 2, 0), cand(1, 2, 2, 0)];
    assert!(within_bound(&even[0], &even, 0.25));
}
