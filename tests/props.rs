//! Property tests for the pure parsers: request bodies (`body`), the SSE
//! accounting scanner (`sse`), the configuration (`config`), routes and keys.
//!
//! The properties themselves live in `fuzz/src/lib.rs`, shared with the
//! cargo-fuzz targets (see `scripts/fuzz.sh`); this file generates structured
//! inputs for them with proptest and keeps the regression cases the fuzzers
//! and proptest found. Case counts are bounded so the file runs in seconds in
//! a debug build; `PROPTEST_CASES=10000 cargo test --test props` runs longer.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use bytes::Bytes;
use llm_edge::config;
use llm_edge::openai::body::{self, InsertAs, Rewrite};
use llm_edge::openai::sse::SseScanner;
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::select;
use serde_json::{json, Value};

#[allow(dead_code)]
#[path = "../fuzz/src/lib.rs"]
mod checks;

/// Cases per property, unless PROPTEST_CASES says otherwise.
fn cases(n: u32) -> ProptestConfig {
    let n = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(n);
    ProptestConfig {
        cases: n,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

// ---------------------------------------------------------------------------
// A per-thread allocation counter, to check the scanner's memory bound.

struct Counting;

thread_local! {
    static LIVE: Cell<isize> = const { Cell::new(0) };
}

fn count(delta: isize) {
    let _ = LIVE.try_with(|c| c.set(c.get() + delta));
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc(layout);
        if !p.is_null() {
            count(layout.size() as isize);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc_zeroed(layout);
        if !p.is_null() {
            count(layout.size() as isize);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout);
        count(-(layout.size() as isize));
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = System.realloc(ptr, layout, new_size);
        if !p.is_null() {
            count(new_size as isize - layout.size() as isize);
        }
        p
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Bytes allocated and not yet freed by this thread.
fn live_bytes() -> isize {
    LIVE.with(Cell::get)
}

// ---------------------------------------------------------------------------
// Request bodies

fn ws() -> impl Strategy<Value = String> {
    "[ \t\r\n]{0,2}"
}

fn json_string() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>().prop_map(|s| serde_json::to_string(&s).unwrap()),
        // hand-written escapes, surrogate pairs included
        r#""([a-z]|\\u00[0-7][0-9a-f]|\\ud83e\\udd99|\\[nrt"\\/])*""#,
    ]
}

fn json_leaf() -> impl Strategy<Value = String> {
    prop_oneof![
        select(vec![
            "null", "true", "false", "0", "-0", "1e400", "-1", "5.0"
        ])
        .prop_map(String::from),
        any::<i64>().prop_map(|n| n.to_string()),
        any::<u64>().prop_map(|n| n.to_string()),
        "-?(0|[1-9][0-9]{0,24})(\\.[0-9]{1,4})?([eE][+-]?[0-9]{1,3})?",
        json_string(),
    ]
}

fn json_value() -> impl Strategy<Value = String> {
    json_leaf().prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            vec((ws(), inner.clone()), 0..4).prop_map(|items| {
                let items: Vec<String> = items.into_iter().map(|(w, v)| w + &v).collect();
                format!("[{}]", items.join(","))
            }),
            vec((key(), inner), 0..4).prop_map(|members| {
                let members: Vec<String> = members
                    .into_iter()
                    .map(|(k, v)| format!("{k}:{v}"))
                    .collect();
                format!("{{{}}}", members.join(","))
            }),
        ]
    })
}

/// Keys, as JSON text: the ones `inspect` looks for (some escaped), and others.
fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => select(vec![
            r#""model""#,
            r#""mod\u0065l""#,
            r#""max_tokens""#,
            r#""max_completion_tokens""#,
            r#""max_output_tokens""#,
            r#""n_predict""#,
            r#""n_pre\u0064ict""#,
            r#""n""#,
            r#""\u006e""#,
            r#""n_cmpl""#,
            r#""best_of""#,
            r#""prompt""#,
            r#""stream""#,
            r#""messages""#,
            r#""Model""#,
            r#""model ""#,
            r#""""#,
        ])
        .prop_map(String::from),
        1 => json_string(),
    ]
}

/// A value for a key, biased towards what the key means to the gateway.
fn member_value(key: &str) -> BoxedStrategy<String> {
    match serde_json::from_str::<String>(key).as_deref() {
        Ok("model") => prop_oneof![
            3 => json_string(),
            1 => json_value(),
        ]
        .boxed(),
        Ok("max_tokens" | "max_completion_tokens" | "max_output_tokens" | "n_predict") => prop_oneof![
            2 => (0u64..5000).prop_map(|n| n.to_string()),
            1 => select(vec!["-1", "null", "18446744073709551615", "18446744073709551616", "1e3", "7.5", "\"9\""])
                .prop_map(String::from),
            1 => json_value(),
        ]
        .boxed(),
        Ok("n" | "n_cmpl" | "best_of") => prop_oneof![
            2 => count_value(),
            1 => json_value(),
        ]
        .boxed(),
        Ok("prompt") => prop_oneof![
            2 => prompt_value(),
            1 => json_value(),
        ]
        .boxed(),
        Ok("stream") => prop_oneof![
            select(vec!["true", "false", "\"true\"", "1", "null"]).prop_map(String::from),
            json_value(),
        ]
        .boxed(),
        _ => json_value().boxed(),
    }
}

fn member() -> impl Strategy<Value = String> {
    key().prop_flat_map(|k| {
        let value = member_value(&k);
        (Just(k), ws(), ws(), value, ws())
            .prop_map(|(k, w1, w2, v, w3)| format!("{w1}{k}{w2}:{w3}{v}"))
    })
}

/// A top-level JSON object, mostly well-formed.
fn request_body() -> impl Strategy<Value = Vec<u8>> {
    (ws(), vec(member(), 0..6), ws(), ws()).prop_map(|(w0, members, w1, w2)| {
        format!("{w0}{{{}{w1}}}{w2}", members.join(",")).into_bytes()
    })
}

/// A request body with one byte overwritten, inserted or removed.
fn mutated_body() -> impl Strategy<Value = Vec<u8>> {
    (
        request_body(),
        any::<prop::sample::Index>(),
        any::<u8>(),
        0..3u8,
    )
        .prop_map(|(mut body, at, byte, how)| {
            let i = at.index(body.len() + 1);
            match how {
                0 if i < body.len() => body[i] = byte,
                1 => body.insert(i, byte),
                _ if i < body.len() => {
                    body.remove(i);
                }
                _ => {}
            }
            body
        })
}

/// A value for `n`, `n_cmpl` or `best_of`: counts, and what llama-server
/// might read as one (floats truncate, `true` is 1, integers wrap to int32).
fn count_value() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => (0u64..40).prop_map(|n| n.to_string()),
        2 => select(vec![
            "2.0", "2.9", "1e1", "0.5", "true", "false", "null", "\"8\"", "[8]", "-1", "-0",
            "-4294967294", "4294967298", "3e9", "1e400", "18446744073709551615",
            "18446744073709551616",
        ])
        .prop_map(String::from),
    ]
}

/// A `prompt`: one string, an array of prompts (strings, token arrays,
/// objects), one tokenized prompt (integers), or mixed.
fn prompt_value() -> impl Strategy<Value = String> {
    let element = prop_oneof![
        select(vec![
            "\"a\"",
            "[1,2]",
            "[3,\"b\"]",
            "{\"prompt_string\":\"c\"}",
            "1.5",
            "-0",
            "7",
            "null",
        ])
        .prop_map(String::from),
        json_string(),
    ];
    prop_oneof![
        1 => json_string(),
        3 => vec(element, 0..6).prop_map(|items| format!("[{}]", items.join(","))),
    ]
}

/// A value for a generation-length field.
fn length_value() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => (0u64..70).prop_map(|n| n.to_string()),
        2 => select(vec![
            "-1", "-2", "null", "7.5", "1e3", "\"9\"", "true", "false", "3e9", "1e400",
            "4294967295", "4294967311", "2147483648", "18446744073709551615", "[5]",
        ])
        .prop_map(String::from),
    ]
}

/// A request body built from the fields that set the generation: lengths,
/// multipliers and prompts (keys sometimes escaped, sometimes repeated),
/// among ordinary members.
fn generation_body() -> impl Strategy<Value = Vec<u8>> {
    let member = prop_oneof![
        3 => (
            select(vec![
                "max_tokens",
                "max_completion_tokens",
                "max_output_tokens",
                "n_predict",
                "max_\\u0074okens",
            ]),
            length_value(),
        )
            .prop_map(|(k, v)| format!("\"{k}\":{v}")),
        3 => (select(vec!["n", "n_cmpl", "best_of", "\\u006e"]), count_value())
            .prop_map(|(k, v)| format!("\"{k}\":{v}")),
        2 => prompt_value().prop_map(|v| format!("\"prompt\":{v}")),
        1 => select(vec![
            "\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]",
            "\"input\":\"hi\"",
            "\"stream\":true",
            "\"temperature\":0.7",
            "\"metadata\":{\"n\":64,\"max_tokens\":100000}",
        ])
        .prop_map(String::from),
    ];
    (vec((ws(), member), 0..7), any::<bool>()).prop_map(|(members, with_model)| {
        let mut members: Vec<String> = members.into_iter().map(|(w, m)| w + &m).collect();
        if with_model {
            members.insert(0, "\"model\":\"alias\"".into());
        }
        format!("{{{}}}", members.join(",")).into_bytes()
    })
}

fn ceiling() -> impl Strategy<Value = u64> {
    prop_oneof![
        4 => 1u64..70,
        1 => select(vec![1u64 << 31, (1 << 32) + 3, u64::MAX]),
    ]
}

fn upstream_name() -> impl Strategy<Value = String> {
    prop_oneof![
        select(checks::REWRITE_NAMES.to_vec()).prop_map(String::from),
        any::<String>(),
    ]
}

fn cap() -> impl Strategy<Value = Option<u64>> {
    prop_oneof![
        Just(None),
        (0u64..300).prop_map(Some),
        any::<u64>().prop_map(Some),
    ]
}

proptest! {
    #![proptest_config(cases(256))]

    #[test]
    fn body_rewrite_keeps_every_other_member(
        body in request_body(),
        name in upstream_name(),
        cap in cap(),
    ) {
        checks::check_body(&body, &name, cap);
    }

    #[test]
    fn body_inspect_on_damaged_bodies(body in mutated_body(), name in upstream_name(), cap in cap()) {
        checks::check_body(&body, &name, cap);
    }

    #[test]
    fn body_inspect_on_arbitrary_bytes(body in vec(any::<u8>(), 0..64)) {
        checks::check_body_variants(&body);
    }

    #[test]
    fn token_ceiling_holds_for_every_generation(
        body in generation_body(),
        ceiling in ceiling(),
        reject in any::<bool>(),
        insert_as in select(checks::INSERT_AS.to_vec()),
    ) {
        checks::check_token_ceiling(&body, ceiling, reject, insert_as);
        checks::check_body(&body, "m", Some(ceiling));
    }

    #[test]
    fn duplicate_model_keys_are_always_rejected(
        before in vec(member(), 0..3),
        between in vec(member(), 0..3),
        first in select(vec![r#""model""#, r#""mod\u0065l""#, r#""\u006dodel""#]),
        second in select(vec![r#""model""#, r#""mod\u0065l""#]),
        a in json_string(),
        b in json_value(),
    ) {
        let mut members = before;
        members.push(format!("{first}:{a}"));
        members.extend(between);
        members.push(format!("{second}:{b}"));
        let text = format!("{{{}}}", members.join(","));
        let err = body::inspect(text.as_bytes()).expect_err(&text);
        prop_assert_eq!(err.status(), 400);
        prop_assert_eq!(err.param(), Some("model"));
    }

    #[test]
    fn unchanged_name_without_cap_is_byte_identical(
        name in any::<String>(),
        rest in vec(member(), 0..4),
        w in ws(),
    ) {
        // Members that cannot be "model" keep the body valid.
        let rest: Vec<String> = rest
            .into_iter()
            .filter(|m| !m.contains("\"model\"") && !m.contains("mod\\u0065l"))
            .collect();
        let mut members = vec![format!("\"model\":{w}{}", serde_json::to_string(&name).unwrap())];
        members.extend(rest);
        let text = Bytes::from(format!("{{{}}}", members.join(",")));
        let Ok(info) = body::inspect(&text) else {
            return Ok(()); // e.g. a duplicate model key inside `rest`
        };
        let out = body::rewrite(text.clone(), &info, &Rewrite { upstream_model: &name, max_tokens: None, insert_as: InsertAs::MaxTokens });
        prop_assert_eq!(out.as_ptr(), text.as_ptr(), "the body must not even be copied");
        prop_assert_eq!(out, text);
    }
}

#[test]
fn body_seed_corpus_holds() {
    for body in read_corpus("body_inspect_rewrite") {
        checks::check_body_variants(&body);
    }
}

// ---------------------------------------------------------------------------
// SSE

fn small_number() -> impl Strategy<Value = u64> {
    prop_oneof![0u64..100, 0u64..=u32::MAX as u64]
}

/// One SSE event (or comment) as llama.cpp and OpenAI-style servers send it,
/// with its own line ending.
fn sse_event() -> impl Strategy<Value = String> {
    let content = json_string().boxed();
    let timings = (small_number(), small_number(), small_number()).prop_map(|(c, p, n)| {
        format!(
            r#""timings":{{"cache_n":{c},"prompt_n":{p},"prompt_ms":12.5,"prompt_per_token_ms":0.5,"prompt_per_second":2000.0,"predicted_n":{n},"predicted_ms":30.1,"predicted_per_token_ms":3.0,"predicted_per_second":333.3}}"#
        )
    });
    let usage = (small_number(), small_number(), small_number()).prop_map(|(c, p, k)| {
        format!(
            r#""usage":{{"completion_tokens":{c},"prompt_tokens":{p},"total_tokens":{},"prompt_tokens_details":{{"cached_tokens":{k}}}}}"#,
            c.saturating_add(p)
        )
    });
    prop_oneof![
        4 => content.clone().prop_map(|c| format!(
            r#"data: {{"choices":[{{"finish_reason":null,"index":0,"delta":{{"content":{c}}}}}],"created":1,"id":"chatcmpl-1","model":"q","object":"chat.completion.chunk"}}"#
        )),
        1 => content.prop_map(|c| format!(
            r#"data:{{"choices":[{{"text":{c},"index":0,"logprobs":null,"finish_reason":null}}],"object":"text_completion"}}"#
        )),
        1 => Just(r#"data: {"choices":[{"finish_reason":null,"index":0,"delta":{"role":"assistant","content":null}}],"object":"chat.completion.chunk"}"#.to_string()),
        1 => (select(vec!["stop", "length", "tool_calls"]), timings).prop_map(|(r, t)| format!(
            r#"data: {{"choices":[{{"finish_reason":"{r}","index":0,"delta":{{}}}}],"object":"chat.completion.chunk",{t}}}"#
        )),
        1 => usage.prop_map(|u| format!(r#"data: {{"choices":[],"object":"chat.completion.chunk",{u}}}"#)),
        1 => select(vec![":", ": ping", ":\u{1f999}", "event: error", "id: 7", "retry: 100", ""]).prop_map(String::from),
        1 => Just(r#"data: {"error":{"code":500,"message":"context shift is disabled","type":"server_error"}}"#.to_string()),
        1 => Just("data: [DONE]".to_string()),
        1 => "[^\n]{0,20}".prop_map(|junk| format!("data: {junk}")),
    ]
    .prop_flat_map(|line| {
        (Just(line), select(vec!["\n\n", "\r\n\r\n", "\n", "\r\n"]))
            .prop_map(|(line, end)| line + end)
    })
}

fn sse_stream() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        4 => vec(sse_event(), 0..12).prop_map(|events| events.concat().into_bytes()),
        1 => vec(any::<u8>(), 0..200),
    ]
}

/// Keys of a stream event, as JSON text: the ones the scanner reads (some
/// spelled with escapes, which the fast path leaves to serde), and others.
fn event_key() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => select(vec![
            r#""choices""#,
            r#""delta""#,
            r#""content""#,
            r#""text""#,
            r#""finish_reason""#,
            r#""usage""#,
            r#""timings""#,
            r#""error""#,
            r#""index""#,
            r#""role""#,
            r#""cont\u0065nt""#,
            r#""choice\u0073""#,
            r#""finish_reason ""#,
            r#""""#,
        ])
        .prop_map(String::from),
        1 => json_string(),
    ]
}

/// A value for an event key, biased towards the shapes the scanner handles.
fn event_value(key: &str, inner: BoxedStrategy<String>) -> BoxedStrategy<String> {
    let weird = prop_oneof![
        select(vec![
            "null",
            "\"\"",
            "\"stop\"",
            "[]",
            "{}",
            "[[]]",
            "[null]",
            "01",
            "1.",
            "-",
            "nul",
            "\"\\x\"",
            "\"\\u12\"",
            "\"\u{1}\"",
            "[{},]",
            "{\"a\":1,}",
        ])
        .prop_map(String::from),
        json_leaf(),
        json_value(),
    ];
    match serde_json::from_str::<String>(key).as_deref() {
        Ok("choices") => prop_oneof![
            4 => vec(inner, 0..3).prop_map(|c| format!("[{}]", c.join(","))),
            1 => weird,
        ]
        .boxed(),
        Ok("delta") => prop_oneof![
            3 => inner,
            1 => weird,
        ]
        .boxed(),
        Ok("finish_reason") => prop_oneof![
            3 => Just("null".to_string()),
            1 => weird,
        ]
        .boxed(),
        _ => prop_oneof![
            3 => json_string(),
            1 => weird,
            1 => inner,
        ]
        .boxed(),
    }
}

/// An object of `event_key` members (duplicates possible), `depth` levels deep.
fn event_object(depth: u32) -> BoxedStrategy<String> {
    let inner = if depth == 0 {
        json_leaf().boxed()
    } else {
        event_object(depth - 1)
    };
    vec(
        (event_key(), ws(), ws()).prop_flat_map(move |(k, w1, w2)| {
            let v = event_value(&k, inner.clone());
            (Just(k), Just(w1), Just(w2), v)
        }),
        0..5,
    )
    .prop_map(|members| {
        let members: Vec<String> = members
            .into_iter()
            .map(|(k, w1, w2, v)| format!("{w1}{k}{w2}:{w1}{v}{w2}"))
            .collect();
        format!("{{{}}}", members.join(","))
    })
    .boxed()
}

/// `data:` lines whose JSON is near the common token-delta event: the cases
/// where the scanner's fast path must agree with the full parse (`check_sse`
/// holds it to that on every line), then the same lines with a few bytes replaced.
fn fast_path_events() -> impl Strategy<Value = Vec<u8>> {
    let line = prop_oneof![
        3 => (json_string(), select(vec!["", ",\"index\":0", ",\"role\":\"assistant\""])).prop_map(|(c, extra)| format!(
            r#"{{"choices":[{{"finish_reason":null,"index":0,"delta":{{"content":{c}{extra}}}}}],"created":1,"id":"c","model":"q","object":"chat.completion.chunk"}}"#
        )),
        3 => event_object(3),
    ];
    let edits = vec(
        (
            any::<prop::sample::Index>(),
            select(vec![
                b'"', b'\\', b'{', b'}', b'[', b']', b',', b':', b' ', b'n', b'0', b'-', b'e',
                b'.', b'u', 0x00, 0x1f, 0xff, 0xc3,
            ]),
            any::<bool>(),
        ),
        0..3,
    );
    vec((line, edits), 1..6).prop_map(|lines| {
        let mut out = Vec::new();
        for (line, edits) in lines {
            let mut bytes = line.into_bytes();
            for (at, byte, replace) in edits {
                if bytes.is_empty() {
                    break;
                }
                let i = at.index(bytes.len());
                if replace {
                    bytes[i] = byte;
                } else {
                    bytes.remove(i);
                }
            }
            out.extend_from_slice(b"data: ");
            out.extend(bytes.into_iter().filter(|&b| b != b'\n'));
            out.extend_from_slice(b"\n\n");
        }
        out
    })
}

fn stream_and_cuts() -> impl Strategy<Value = (Vec<u8>, Vec<usize>)> {
    sse_stream().prop_flat_map(|s| {
        let n = s.len();
        (Just(s), vec(0..=n, 0..10))
    })
}

proptest! {
    #![proptest_config(cases(256))]

    #[test]
    fn sse_chunking_does_not_change_the_counts((stream, cuts) in stream_and_cuts()) {
        checks::check_sse(&stream, &cuts);
    }

    #[test]
    fn sse_byte_by_byte_and_around_line_ends(stream in sse_stream()) {
        checks::check_sse_variants(&stream);
    }

    /// Events near and around what the fast path accepts: the fast path and
    /// the full parse must never disagree.
    #[test]
    fn sse_fast_path_agrees_with_the_full_parse(stream in fast_path_events()) {
        let (whole, _) = checks::scan_in_pieces(&stream, &[]);
        checks::check_sse(&stream, &checks::tricky_cuts(&stream));
        prop_assert!(whole.stats.events >= 1);
    }
}

proptest! {
    // Large inputs: a fixed, small number of cases whatever PROPTEST_CASES says.
    #![proptest_config(ProptestConfig { cases: 12, failure_persistence: None, ..ProptestConfig::default() })]

    /// A line that never ends costs at most about twice the 1 MiB carry limit
    /// plus the chunk size, and the stream is read normally after it.
    #[test]
    fn sse_memory_is_bounded(
        line_len in (900usize << 10)..(3usize << 20),
        chunk in 1024usize..=65536,
    ) {
        let mut stream = b"data: {\"choices\":[{\"delta\":{\"content\":\"".to_vec();
        stream.resize(line_len, b'x');
        stream.extend_from_slice(b"\"}}]}\n\ndata: {\"choices\":[{\"delta\":{\"content\":\"y\"}}]}\n\ndata: [DONE]\n\n");
        let mut scanner = SseScanner::new();
        let base = live_bytes();
        let mut peak = 0;
        let mut total = 0;
        for piece in stream.chunks(chunk) {
            total += scanner.feed(piece);
            peak = peak.max(live_bytes() - base);
        }
        let bound = (2 * checks::MAX_CARRY + 2 * chunk + (64 << 10)) as isize;
        prop_assert!(peak <= bound, "scanner holds {peak} bytes (bound {bound})");
        let long_line = stream.iter().position(|&b| b == b'\n').unwrap();
        // Dropped when its unfinished part, at the last chunk boundary before
        // its `\n`, is longer than the limit.
        let long_line_counted = long_line / chunk * chunk <= checks::MAX_CARRY;
        prop_assert_eq!(total, 1 + u64::from(long_line_counted));
        prop_assert!(scanner.stats.saw_done);
    }
}

/// The carry limit is exact: a line whose unfinished part reaches 1 MiB is
/// still read, one byte more and it is dropped (counted as malformed); fed
/// whole, it is read either way.
#[test]
fn sse_carry_limit_boundary() {
    for (len, read_in_pieces) in [
        (checks::MAX_CARRY - 1, true),
        (checks::MAX_CARRY, true),
        (checks::MAX_CARRY + 1, false),
    ] {
        let mut line = b"data: {\"choices\":[{\"delta\":{\"content\":\"".to_vec();
        let tail = b"\"}}]}";
        line.resize(len - tail.len(), b'x');
        line.extend_from_slice(tail);
        assert_eq!(line.len(), len);
        line.extend_from_slice(b"\n\n");
        // Chunks of 64 KiB, and one that ends just before the line's `\n`.
        let mut cuts: Vec<usize> = (1..16).map(|i| i * 65536).collect();
        cuts.push(len);
        let (pieces, n) = checks::scan_in_pieces(&line, &cuts);
        assert_eq!(n, u64::from(read_in_pieces), "{len}");
        assert_eq!(pieces.stats.malformed, u64::from(!read_in_pieces), "{len}");
        let mut whole = SseScanner::new();
        assert_eq!(whole.feed(&line), 1, "{len}");
    }
}

#[test]
fn sse_scanner_does_not_grow_with_the_stream() {
    let event = "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"tok\"}}]}\n\n:\n\n";
    let mut scanner = SseScanner::new();
    for _ in 0..100 {
        scanner.feed(event.as_bytes());
    }
    let base = live_bytes();
    for i in 0..20_000 {
        let bytes = event.as_bytes();
        let cut = i % bytes.len();
        scanner.feed(&bytes[..cut]);
        scanner.feed(&bytes[cut..]);
    }
    let grown = live_bytes() - base;
    assert!(grown < 4096, "scanner grew by {grown} bytes");
    assert_eq!(scanner.stats.content_events, 20_100);
}

#[test]
fn sse_seed_corpus_holds() {
    for stream in read_corpus("sse_scanner") {
        checks::check_sse_variants(&stream);
    }
}

// ---------------------------------------------------------------------------
// Configuration

fn yaml_scalar() -> BoxedStrategy<Value> {
    prop_oneof![
        6 => select(vec![
            "5s", "0s", "10m", "1h", "500ms", "soon", "", " ",
            "127.0.0.1:8080", "0.0.0.0:8000", "[::1]:9000", "nowhere", "127.0.0.1:99999",
            "http://127.0.0.1:8080", "http://[::1]:8080/v1/", "http://127.0.0.1:1/api",
            "https://127.0.0.1:1", "http://localhost:1", "http://", "http://:80",
            "/tmp/llm-edge.pid", "relative.pid", "/metrics", "/v1/metrics", "/health2",
            "qwen", "qwen3", "a b", "tab\there", "x\u{0}y", "default", "anonymous", "invalid",
            "319f30a68bfc6a136b93cd8153d32fe9522908704892171cae65fbc52534c807",
            "319F30A68BFC6A136B93CD8153D32FE9522908704892171CAE65FBC52534C807", "abc",
            "*", "https://chat.example.com", "https://a.example/path", "ftp://x",
            "clamp", "reject", "truncate", "sk-example",
            "0.0.0.0:8443",
            "/dev/null",
        ])
        .prop_map(|s| json!(s)),
        2 => prop_oneof![
            Just(json!(0)), Just(json!(1)), Just(json!(-1)), Just(json!(8192)),
            Just(json!(u64::MAX)), Just(json!(1.5)), Just(json!(4294967296u64)),
        ],
        1 => any::<bool>().prop_map(|b| json!(b)),
        1 => Just(Value::Null),
        1 => any::<String>().prop_map(|s| json!(s)),
    ]
    .boxed()
}

fn yaml_value() -> BoxedStrategy<Value> {
    prop_oneof![
        4 => yaml_scalar(),
        1 => vec(yaml_scalar(), 0..3).prop_map(Value::Array),
    ]
    .boxed()
}

/// A map with some of `keys` (plus, rarely, an unknown or empty key).
fn section(keys: &'static [&'static str], value: BoxedStrategy<Value>) -> BoxedStrategy<Value> {
    let key = prop_oneof![
        12 => select(keys.to_vec()).prop_map(String::from),
        1 => select(vec!["urll", "", "x"]).prop_map(String::from),
    ];
    vec((key, value), 0..keys.len().min(5) + 1)
        .prop_map(|members| Value::Object(members.into_iter().collect()))
        .boxed()
}

fn model_entry() -> BoxedStrategy<Value> {
    section(
        &["name", "aliases", "upstream_name", "owned_by", "upstreams"],
        yaml_value(),
    )
}

fn key_entry() -> BoxedStrategy<Value> {
    let limits = section(
        &[
            "requests_per_minute",
            "max_concurrent",
            "max_tokens",
            "over_max_tokens",
        ],
        yaml_scalar(),
    );
    let value = prop_oneof![4 => yaml_value(), 1 => limits].boxed();
    section(&["id", "sha256", "models", "limits"], value)
}

fn file_config() -> impl Strategy<Value = Value> {
    let upstream = section(
        &[
            "url",
            "api_key",
            "connect_timeout",
            "first_byte_timeout",
            "idle_timeout",
            "total_timeout",
            "pool_idle_timeout",
            "health_timeout",
            "max_in_flight",
            "queue_timeout",
            "max_queued",
            "health_interval",
            "servers",
        ],
        prop_oneof![
            6 => yaml_scalar(),
            1 => vec(
                section(&["name", "url", "api_key", "max_in_flight"], yaml_scalar()),
                0..3
            )
            .prop_map(Value::Array),
        ]
        .boxed(),
    );
    let limits = section(
        &[
            "max_body_bytes",
            "max_buffered_body_bytes",
            "max_concurrent_requests",
        ],
        yaml_scalar(),
    );
    let downstream = section(&["read_timeout", "keepalive_timeout"], yaml_scalar());
    let server = section(
        &[
            "threads",
            "pid_file",
            "upgrade_sock",
            "grace_period_seconds",
            "graceful_shutdown_timeout_seconds",
            "error_log",
        ],
        yaml_scalar(),
    );
    let metrics = section(
        &["listen", "path", "bearer_token", "on_public_listener"],
        yaml_scalar(),
    );
    let cors = section(&["allowed_origins", "max_age"], yaml_value());
    let tls = section(&["listen", "cert", "key", "http2"], yaml_scalar());
    (
        prop::option::of(yaml_scalar()),
        prop::option::of(upstream),
        prop::option::of(yaml_scalar()),
        prop::option::of(vec(model_entry(), 0..3)),
        prop::option::of(vec(key_entry(), 0..3)),
        prop::option::of(any::<bool>()),
        (
            prop::option::of(limits),
            prop::option::of(downstream),
            prop::option::of(server),
            prop::option::of(metrics),
            prop::option::of(cors),
            prop::option::of(tls),
        ),
    )
        .prop_map(
            |(
                listen,
                upstream,
                default_model,
                models,
                keys,
                anon,
                (limits, down, server, metrics, cors, tls),
            )| {
                let mut map = serde_json::Map::new();
                let mut put = |k: &str, v: Option<Value>| {
                    if let Some(v) = v {
                        map.insert(k.to_string(), v);
                    }
                };
                put("listen", listen);
                put("upstream", upstream);
                put("default_model", default_model);
                put("models", models.map(Value::Array));
                put("keys", keys.map(Value::Array));
                put("allow_anonymous", anon.map(Value::Bool));
                put("limits", limits);
                put("downstream", down);
                put("server", server);
                put("metrics", metrics);
                put("cors", cors);
                put("tls", tls);
                Value::Object(map)
            },
        )
}

fn env_lines() -> impl Strategy<Value = String> {
    vec(
        (
            select(vec!["LLAMA_BASE_URL", "DEFAULT_MODEL", "API_KEYS"]),
            select(vec![
                "http://127.0.0.1:18080",
                "http://[::1]:1",
                "ftp://x",
                "qwen3",
                "new-model",
                "a b",
                "sk-a, sk-b,",
                ",,",
                "sk-\u{e9}",
                "",
            ]),
        ),
        0..3,
    )
    .prop_map(|vars| {
        vars.iter()
            .map(|(k, v)| format!("#env {k}={v}\n"))
            .collect()
    })
}

fn config_text() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => (file_config(), env_lines(), any::<bool>()).prop_map(|(v, env, flow)| {
            let body = if flow {
                serde_json::to_string(&v).unwrap() // JSON is YAML too
            } else {
                serde_yaml::to_string(&v).unwrap()
            };
            env + &body
        }),
        1 => any::<String>(),
        1 => (any::<prop::sample::Index>(), "[^\n]{0,3}").prop_map(|(at, junk)| {
            // the shipped file with one line replaced
            let text = include_str!("../conf/llm-edge.yaml");
            let mut lines: Vec<&str> = text.lines().collect();
            let i = at.index(lines.len());
            lines[i] = &junk;
            lines.join("\n")
        }),
    ]
}

proptest! {
    #![proptest_config(cases(256))]

    #[test]
    fn config_errors_always_name_a_path(text in config_text()) {
        checks::check_config(&text);
    }
}

#[test]
fn config_seed_corpus_holds() {
    for text in read_corpus("config_yaml") {
        checks::check_config(std::str::from_utf8(&text).unwrap());
    }
}

// ---------------------------------------------------------------------------
// Routes and keys

fn path() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => vec(
            prop_oneof![
                4 => select(vec!["v1", "models", "chat", "completions", "embeddings", "health", "upstream", "..", ".", "", "%2e%2e", "é"]).prop_map(String::from),
                1 => "[^/?]{0,6}",
            ],
            0..5,
        )
        .prop_flat_map(|segments| {
            (Just(segments), "(\\?[a-z=&/?]{0,8})?", any::<bool>())
        })
        .prop_map(|(segments, query, slash)| {
            let mut p = format!("/{}", segments.join("/"));
            if slash {
                p.push('/');
            }
            p + &query
        }),
        1 => any::<String>(),
    ]
}

proptest! {
    #![proptest_config(cases(512))]

    #[test]
    fn classify_never_panics(
        method in prop_oneof![select(vec!["GET", "HEAD", "POST", "OPTIONS", "get", ""]).prop_map(String::from), any::<String>()],
        path in path(),
    ) {
        checks::check_route(&method, &path);
    }

    #[test]
    fn authenticate_never_panics(header in prop_oneof![
        vec(any::<u8>(), 0..40),
        "[bB][eE][aA][rR][eE][rR][ \t]{1,3}[^\r\n]{0,12}".prop_map(String::into_bytes),
    ]) {
        checks::check_auth(&header);
    }

    #[test]
    fn every_well_formed_secret_authenticates(secret in "[!-~]([ -~]{0,30}[!-~])?|\\PC{1,12}") {
        // check_auth builds a table with this secret and presents it as
        // `Bearer <secret>` in several spellings.
        checks::check_auth(secret.as_bytes());
    }
}

#[test]
fn routes_auth_seed_corpus_holds() {
    for input in read_corpus("routes_auth") {
        let text = String::from_utf8_lossy(&input);
        let (method, path) = text.split_once('\n').unwrap_or(("GET", &text));
        checks::check_route(method, path);
        checks::check_auth(&input);
    }
}

// ---------------------------------------------------------------------------
// Regressions: inputs the fuzzers or proptest found.

/// Found by proptest (`body_inspect_on_damaged_bodies`): invalid UTF-8 in a
/// value `inspect` skips over is accepted, and the gateway forwards a body
/// that is not JSON text.
#[test]
fn regression_invalid_utf8_anywhere_is_400() {
    for body in [
        &b"{\"messages\":\"R\xff\xfe\"}"[..],
        b"{\"a\":{\"\xc3\":1}}",
        b"{\"model\":\"m\",\"messages\":[{\"content\":\"\xed\xa0\x80\"}]}",
    ] {
        let err = body::inspect(body).expect_err(&String::from_utf8_lossy(body));
        assert_eq!(err.status(), 400);
    }
}

/// What finding 1 is not: invalid UTF-8 in keys and in `model` is rejected.
#[test]
fn invalid_utf8_in_keys_and_model_is_400() {
    for body in [&b"{\"\xff\":1}"[..], b"{\"model\":\"\xc3\"}"] {
        assert_eq!(body::inspect(body).unwrap_err().status(), 400);
    }
}

/// Found by the `config_yaml` fuzzer in about 2 s: an empty top-level key.
#[test]
fn regression_empty_top_level_key_has_a_path() {
    for text in [
        "\"\": 1\n",
        "{\"\": 1}",
        "? \"\"\n",
        "{\"\"e:nilts rl\": \"x\"}",
    ] {
        let e = config::parse_yaml(text).unwrap_err();
        assert!(!e.path.is_empty(), "{text:?}: {e:?}");
    }
}

/// Nested empty keys do get a (non-empty) path.
#[test]
fn nested_empty_keys_have_a_path() {
    for (text, path) in [
        ("upstream:\n  \"\": 1\n", "upstream."),
        ("models:\n  - \"\": 1\n", "models[0]."),
    ] {
        let e = config::parse_yaml(text).unwrap_err();
        assert_eq!(e.path, path, "{text:?}");
    }
}

/// Found while writing the SSE properties (`tokens()` is called on every
/// fuzzed stream; the seed `huge_numbers.txt` triggers it): huge `timings`
/// overflow `prompt_n + cache_n`, a panic in debug builds and a wrapped count
/// in release.
#[test]
fn regression_huge_timings_do_not_overflow() {
    let mut sc = SseScanner::new();
    sc.feed(b"data: {\"choices\":[],\"timings\":{\"cache_n\":1,\"prompt_n\":18446744073709551615,\"predicted_n\":1}}\n\n");
    let tokens = sc.stats.tokens();
    assert_eq!(tokens.prompt, u64::MAX);
    assert_eq!(tokens.cached, 1);
    let ratio = sc.stats.cache_hit_ratio().unwrap();
    assert!((0.0..=1.0).contains(&ratio));
}

/// Found while writing the body properties (the "unchanged name gives the
/// same bytes" property fails when it compares names rather than bytes): a
/// `model` spelled with escapes is re-encoded even though it already is the
/// upstream name.
#[test]
fn regression_same_name_spelled_with_escapes_is_left_alone() {
    let input = Bytes::from_static(br#"{"model":"m\u0061","messages":[]}"#);
    let info = body::inspect(&input).unwrap();
    let rw = Rewrite {
        upstream_model: "ma",
        max_tokens: None,
        insert_as: InsertAs::MaxTokens,
    };
    let out = body::rewrite(input.clone(), &info, &rw);
    assert_eq!(out, input);
}

/// Bodies whose rewrite is easy to get wrong: insertion into empty objects,
/// repeated and escaped keys, numbers serde cannot hold, CR/LF whitespace.
#[test]
fn rewrite_edge_cases_hold() {
    for (body, name, cap) in [
        (&br#"  {}"#[..], "m", None),
        (br#"{ }"#, "m", Some(7)),
        (
            br#"{"model":"a","max_tokens":5,"max_tokens":500}"#,
            "a",
            Some(100),
        ),
        (br#"{"n_pre\u0064ict":-1,"mod\u0065l":"x"}"#, "y", Some(3)),
        (
            br#"{"model":"x","max_tokens":1e400,"y":1e400}"#,
            "x",
            Some(0),
        ),
        (b"\r\n\t {\"model\" :\"x\"\r}\n", "\u{2028}\"", None),
    ] {
        checks::check_body(body, name, cap);
    }
}

// ---------------------------------------------------------------------------

fn read_corpus(target: &str) -> Vec<Vec<u8>> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no seed files in {}", dir.display());
    files.iter().map(|f| std::fs::read(f).unwrap()).collect()
}

// ---------------------------------------------------------------------------
// One canonical spelling per route.

/// Model routes and their canonical paths.
const CANONICAL_ROUTES: [&str; 9] = [
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/responses",
    "/v1/messages",
    "/v1/rerank",
    "/v1/messages/count_tokens",
    "/v1/responses/input_tokens",
    "/v1/chat/completions/input_tokens",
];

/// How a client (or an attacker) might spell a path differently.
#[derive(Debug, Clone)]
enum Respell {
    /// `%xx` (either hex case) for the byte at this index.
    Escape(usize, bool),
    /// Upper-case the byte at this index.
    Upper(usize),
    /// Insert `/./`, `/../x`, `//` or a `;param` before the slash at this index.
    Insert(usize, u8),
    TrailingSlash,
    /// A byte from outside the canonical set at this index.
    Foreign(usize, char),
}

fn respell() -> impl Strategy<Value = Respell> {
    prop_oneof![
        (0usize..40, any::<bool>()).prop_map(|(i, upper)| Respell::Escape(i, upper)),
        (0usize..40).prop_map(Respell::Upper),
        (0usize..40, 0u8..4).prop_map(|(i, k)| Respell::Insert(i, k)),
        Just(Respell::TrailingSlash),
        (
            0usize..40,
            select(vec!['%', ';', '\\', ' ', '\t', '#', 'é', '+', ',', '\u{0}'])
        )
            .prop_map(|(i, c)| Respell::Foreign(i, c)),
    ]
}

fn apply(path: &str, edits: &[Respell]) -> String {
    let mut p = path.to_string();
    for edit in edits {
        let n = p.len().max(1);
        match *edit {
            Respell::Escape(i, upper) => {
                let i = i % n;
                if p.is_char_boundary(i) && p.is_char_boundary(i + 1) && i < p.len() {
                    let b = p.as_bytes()[i];
                    let esc = if upper {
                        format!("%{b:02X}")
                    } else {
                        format!("%{b:02x}")
                    };
                    p.replace_range(i..i + 1, &esc);
                }
            }
            Respell::Upper(i) => {
                let i = i % n;
                if p.is_char_boundary(i) && p.is_char_boundary(i + 1) && i < p.len() {
                    let up = p[i..i + 1].to_ascii_uppercase();
                    p.replace_range(i..i + 1, &up);
                }
            }
            Respell::Insert(i, k) => {
                let slashes: Vec<usize> = p.match_indices('/').map(|(j, _)| j).collect();
                let at = slashes[i % slashes.len()];
                let piece = ["/.", "/../x", "/", ";a=b"][k as usize];
                p.insert_str(at, piece);
            }
            Respell::TrailingSlash => p.push('/'),
            Respell::Foreign(i, c) => {
                let i = (i % n).min(p.len());
                if p.is_char_boundary(i) {
                    p.insert(i, c);
                }
            }
        }
    }
    p
}

proptest! {
    #![proptest_config(cases(2048))]

    /// Whatever the spelling, a path is its own canonical route (the same
    /// bytes, or with one trailing slash) or refused: never another route,
    /// never an escape that llama-server would decode into a route.
    #[test]
    fn every_spelling_of_a_route_is_that_route_or_refused(
        which in 0usize..CANONICAL_ROUTES.len(),
        edits in vec(respell(), 1..4),
    ) {
        let canonical = CANONICAL_ROUTES[which];
        let spelled = apply(canonical, &edits);
        let table = llm_edge::policy::routes::RouteTable::new(vec!["/props".into()]);
        match table.classify("POST", &spelled) {
            Ok(route) => {
                let forwarded = route.upstream_path();
                // accepted only when it is plainly a route's canonical path
                // (trailing slash aside) and goes upstream as exactly that
                let trimmed = spelled.strip_suffix('/').unwrap_or(&spelled);
                prop_assert_eq!(forwarded, Some(trimmed), "{} -> {:?}", spelled, route);
                prop_assert!(spelled.bytes().all(llm_edge::policy::routes::is_canonical_byte));
            }
            Err(e) => prop_assert!(matches!(e.status(), 400 | 404 | 405), "{}: {:?}", spelled, e),
        }
    }
}
