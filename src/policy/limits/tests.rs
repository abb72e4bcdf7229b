use super::*;

fn limiter(limits: KeyLimits, global: Option<usize>, now: Instant) -> Limiter {
    Limiter::new([("alice".to_string(), limits)], global, now)
}

#[test]
fn requests_per_minute_refill_over_time() {
    let t0 = Instant::now();
    let l = limiter(
        KeyLimits {
            requests_per_minute: Some(2),
            ..Default::default()
        },
        None,
        t0,
    );
    assert!(l.admit("alice", t0).is_ok());
    assert!(l.admit("alice", t0).is_ok());
    let refused = l.admit("alice", t0).unwrap_err();
    assert_eq!(refused.reason, LimitReason::KeyRate);
    assert!(
        (29..=30).contains(&refused.retry_after.as_secs()),
        "{refused:?}"
    );
    assert!(l.admit("alice", t0 + Duration::from_secs(29)).is_err());
    assert!(l.admit("alice", t0 + Duration::from_secs(31)).is_ok());
    // other keys are not limited
    assert!(l.admit("bob", t0).is_ok());
}

#[test]
fn concurrency_is_released_by_the_guard() {
    let t0 = Instant::now();
    let l = limiter(
        KeyLimits {
            max_concurrent: Some(2),
            ..Default::default()
        },
        None,
        t0,
    );
    let a = l.admit("alice", t0).unwrap();
    let _b = l.admit("alice", t0).unwrap();
    assert_eq!(
        l.admit("alice", t0).unwrap_err().reason,
        LimitReason::KeyConcurrency
    );
    drop(a);
    assert!(l.admit("alice", t0).is_ok());
}

#[test]
fn global_cap_covers_every_key() {
    let t0 = Instant::now();
    let l = limiter(KeyLimits::default(), Some(2), t0);
    let _a = l.admit("alice", t0).unwrap();
    let _b = l.admit("bob", t0).unwrap();
    let refused = l.admit("carol", t0).unwrap_err();
    assert_eq!(refused.reason, LimitReason::GlobalConcurrency);
    assert_eq!(refused.retry_after, Duration::from_secs(1));
}

fn body(json: &str) -> RequestBody {
    crate::openai::body::inspect(json.as_bytes()).unwrap()
}

fn ceiling(n: u64, mode: OverMaxTokens) -> KeyLimits {
    KeyLimits {
        max_tokens: Some(n),
        over_max_tokens: mode,
        ..Default::default()
    }
}

fn send(limits: &KeyLimits, json: &str) -> Result<Option<u64>, ApiError> {
    max_tokens_to_send(limits, &body(json))
}

/// `(status, param, message)` of a refusal.
fn refused(limits: &KeyLimits, json: &str) -> (u16, String, String) {
    let err = send(limits, json).expect_err(json);
    (
        err.status(),
        err.param().unwrap().to_string(),
        err.to_string(),
    )
}

#[test]
fn max_tokens_ceiling() {
    let clamp = ceiling(100, OverMaxTokens::Clamp);
    let reject = ceiling(100, OverMaxTokens::Reject);
    assert_eq!(
        send(&KeyLimits::default(), r#"{"max_tokens":10000,"n":64}"#),
        Ok(None),
        "no ceiling: no checks at all"
    );
    // the cap is always returned: rewrite leaves smaller values as sent
    assert_eq!(send(&clamp, r#"{"max_tokens":50}"#), Ok(Some(100)));
    assert_eq!(send(&clamp, r#"{"max_tokens":500}"#), Ok(Some(100)));
    assert_eq!(
        send(&clamp, "{}"),
        Ok(Some(100)),
        "unlimited requests get the ceiling"
    );
    assert_eq!(send(&reject, "{}"), Ok(Some(100)));
    assert_eq!(send(&reject, r#"{"n_predict":-1}"#), Ok(Some(100)));
    assert_eq!(send(&reject, r#"{"max_tokens":100}"#), Ok(Some(100)));
    let (status, param, message) = refused(&reject, r#"{"max_tokens":500}"#);
    assert_eq!((status, param.as_str()), (400, "max_tokens"));
    assert_eq!(
        message,
        "max_tokens is 500, above this API key's limit of 100"
    );
}

#[test]
fn every_length_field_is_held_to_the_ceiling() {
    let reject = ceiling(100, OverMaxTokens::Reject);
    let clamp = ceiling(100, OverMaxTokens::Clamp);
    for name in [
        "max_tokens",
        "max_completion_tokens",
        "max_output_tokens",
        "n_predict",
    ] {
        let over = format!(r#"{{"{name}":101}}"#);
        assert_eq!(send(&clamp, &over), Ok(Some(100)), "{name}");
        let (status, param, message) = refused(&reject, &over);
        assert_eq!((status, param.as_str()), (400, name));
        assert!(message.starts_with(&format!("{name} is 101")), "{message}");
        let within = format!(r#"{{"{name}":100}}"#);
        assert_eq!(send(&reject, &within), Ok(Some(100)), "{name}");
    }
    // the largest of several is the one named
    let (_, param, _) = refused(&reject, r#"{"max_tokens":5,"n_predict":300}"#);
    assert_eq!(param, "n_predict");
    // a stated length over the ceiling is refused even beside an unlimited one
    let (_, param, _) = refused(&reject, r#"{"max_tokens":500,"n_predict":-1}"#);
    assert_eq!(param, "max_tokens");
}

#[test]
fn clamp_shares_the_ceiling_between_generations() {
    let clamp = ceiling(16, OverMaxTokens::Clamp);
    assert_eq!(send(&clamp, r#"{"n":8}"#), Ok(Some(2)));
    assert_eq!(send(&clamp, r#"{"n":3,"max_tokens":100}"#), Ok(Some(5)));
    assert_eq!(send(&clamp, r#"{"n_cmpl":4}"#), Ok(Some(4)));
    assert_eq!(send(&clamp, r#"{"best_of":5}"#), Ok(Some(3)));
    assert_eq!(send(&clamp, r#"{"n":2.0}"#), Ok(Some(8)));
    assert_eq!(send(&clamp, r#"{"prompt":["a","b","c","d"]}"#), Ok(Some(4)));
    assert_eq!(send(&clamp, r#"{"prompt":[1,2,3,4]}"#), Ok(Some(16)));
    assert_eq!(send(&clamp, r#"{"prompt":["a","b"],"n":4}"#), Ok(Some(2)));
    assert_eq!(send(&clamp, r#"{"n":16}"#), Ok(Some(1)));
    // values llama-server refuses on its own count once
    assert_eq!(send(&clamp, r#"{"n":"8"}"#), Ok(Some(16)));
    // more generations than tokens: refused, naming the parameter
    let (status, param, message) = refused(&clamp, r#"{"n":17}"#);
    assert_eq!((status, param.as_str()), (400, "n"));
    assert_eq!(
        message,
        "n is 17: 17 generations, more than this API key's limit of 16 tokens allows at 1 token each; ask for at most 16"
    );
    let (_, param, message) = refused(&clamp, r#"{"n":3,"prompt":["a","b","c","d","e","f"]}"#);
    assert_eq!(param, "prompt");
    assert!(
        message.starts_with("n is 3 and \"prompt\" holds 6 prompts: 18 generations"),
        "{message}"
    );
    let (_, param, _) = refused(&clamp, r#"{"best_of":20,"n":2}"#);
    assert_eq!(param, "best_of");
    // a count that could mean anything to llama-server
    for (json, name) in [
        (r#"{"n":-4294967294}"#, "n"),
        (r#"{"n_cmpl":1e400}"#, "n_cmpl"),
        (r#"{"best_of":-1}"#, "best_of"),
    ] {
        let (status, param, message) = refused(&clamp, json);
        assert_eq!((status, param.as_str()), (400, name), "{json}");
        assert!(
            message.contains("must be a positive whole number"),
            "{message}"
        );
    }
}

#[test]
fn reject_refuses_generations_over_the_ceiling() {
    let reject = ceiling(16, OverMaxTokens::Reject);
    assert_eq!(send(&reject, r#"{"n":4,"max_tokens":4}"#), Ok(Some(4)));
    assert_eq!(send(&reject, r#"{"n":3,"max_tokens":5}"#), Ok(Some(5)));
    assert_eq!(
        send(&reject, r#"{"prompt":["a","b"],"max_tokens":8}"#),
        Ok(Some(8))
    );
    let (status, param, message) = refused(&reject, r#"{"n":4,"max_tokens":5}"#);
    assert_eq!((status, param.as_str()), (400, "max_tokens"));
    assert_eq!(
        message,
        "max_tokens is 5 and n is 4: 20 tokens in all, above this API key's limit of 16; ask for at most 4 tokens per generation, or fewer generations"
    );
    let (_, param, message) = refused(&reject, r#"{"max_output_tokens":9,"best_of":2}"#);
    assert_eq!(param, "max_output_tokens");
    assert!(message.contains("18 tokens in all"), "{message}");
    let (_, param, _) = refused(&reject, r#"{"prompt":[[1],[2],[3]],"n_predict":6}"#);
    assert_eq!(param, "n_predict");
    // several generations without a limit (absent, null, -1, not a whole number)
    for json in [
        r#"{"n":2}"#,
        r#"{"n":2,"max_tokens":null}"#,
        r#"{"n":2,"n_predict":-1}"#,
        r#"{"n":2,"max_tokens":7.5}"#,
        r#"{"n":2,"max_tokens":4,"max_completion_tokens":-1}"#,
    ] {
        let (status, param, message) = refused(&reject, json);
        assert_eq!((status, param.as_str()), (400, "n"), "{json}");
        assert!(message.contains("without a token limit"), "{message}");
        assert!(message.contains("at most 8"), "{message}");
    }
    let (_, param, _) = refused(&reject, r#"{"n":17,"max_tokens":1}"#);
    assert_eq!(param, "n");
    // products that overflow u64 are over any ceiling
    let huge = ceiling(u64::MAX, OverMaxTokens::Reject);
    let (_, param, _) = refused(&huge, r#"{"max_tokens":2,"n":18446744073709551615}"#);
    assert_eq!(param, "n");
    let (_, param, _) = refused(&huge, r#"{"max_tokens":2,"n":9223372036854775808}"#);
    assert_eq!(param, "max_tokens");
    let clamp = ceiling(u64::MAX, OverMaxTokens::Clamp);
    let (_, param, _) = refused(&clamp, r#"{"n":9223372036854775808,"prompt":["a","b"]}"#);
    assert_eq!(param, "n");
    // an overflowing product is still refused
    let (_, param, message) = refused(&reject, r#"{"n":2,"max_tokens":18446744073709551615}"#);
    assert_eq!(param, "max_tokens");
    assert!(
        message.contains("36893488147419103230 tokens in all"),
        "{message}"
    );
}

#[test]
fn the_written_cap_fits_llama_servers_int32() {
    for mode in [OverMaxTokens::Clamp, OverMaxTokens::Reject] {
        let huge = ceiling(u64::MAX, mode);
        assert_eq!(send(&huge, "{}"), Ok(Some(MAX_WRITTEN_TOKENS)));
        assert_eq!(
            send(&huge, r#"{"n":2}"#).ok(),
            if mode == OverMaxTokens::Clamp {
                Some(Some(MAX_WRITTEN_TOKENS))
            } else {
                None
            }
        );
    }
}

/// The bypasses this ceiling had, end to end through `body::rewrite`.
#[test]
fn known_bypasses_are_closed() {
    use crate::openai::body::{self, InsertAs, Rewrite};
    let clamp = ceiling(16, OverMaxTokens::Clamp);
    for (json, insert_as, expected) in [
        (
            r#"{"model":"m","input":"hi","max_output_tokens":100000}"#,
            InsertAs::MaxOutputTokens,
            r#"{"model":"m","input":"hi","max_output_tokens":16}"#,
        ),
        (
            r#"{"model":"m","messages":[],"n":8}"#,
            InsertAs::MaxTokens,
            r#"{"max_tokens":2,"model":"m","messages":[],"n":8}"#,
        ),
        (
            r#"{"model":"m","messages":[],"best_of":8,"max_tokens":16}"#,
            InsertAs::MaxTokens,
            r#"{"model":"m","messages":[],"best_of":8,"max_tokens":2}"#,
        ),
        (
            r#"{"model":"m","prompt":["a","b","c","d"],"max_tokens":16}"#,
            InsertAs::MaxTokens,
            r#"{"model":"m","prompt":["a","b","c","d"],"max_tokens":4}"#,
        ),
        (
            r#"{"model":"m","messages":[],"n_predict":5}"#,
            InsertAs::AnthropicMaxTokens,
            r#"{"max_tokens":16,"model":"m","messages":[],"n_predict":5}"#,
        ),
    ] {
        let info = body(json);
        let cap = max_tokens_to_send(&clamp, &info).unwrap();
        let rw = Rewrite {
            upstream_model: "m",
            max_tokens: cap,
            insert_as,
        };
        let out = body::rewrite(bytes::Bytes::from(json.to_string()), &info, &rw);
        assert_eq!(std::str::from_utf8(&out).unwrap(), expected);
    }
}

#[test]
fn a_refusal_does_not_leak_slots() {
    let t0 = Instant::now();
    let l = limiter(
        KeyLimits {
            max_concurrent: Some(1),
            requests_per_minute: Some(1),
            ..Default::default()
        },
        Some(10),
        t0,
    );
    let first = l.admit("alice", t0).unwrap();
    drop(first);
    // rate-limited now: the concurrency and global counters must come back
    for _ in 0..5 {
        assert_eq!(
            l.admit("alice", t0).unwrap_err().reason,
            LimitReason::KeyRate
        );
    }
    assert_eq!(l.global_in_flight.load(Ordering::SeqCst), 0);
}
