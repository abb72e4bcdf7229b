use super::*;

/// A recorded llama.cpp b11434 chat stream (3 tokens, the last with a split emoji).
const STREAM: &str = concat!(
    "data: {\"choices\":[{\"finish_reason\":null,\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":null}}],\"created\":1,\"id\":\"c\",\"model\":\"q\",\"object\":\"chat.completion.chunk\"}\n\n",
    "data: {\"choices\":[{\"finish_reason\":null,\"index\":0,\"delta\":{\"content\":\"Hel\"}}],\"created\":1,\"id\":\"c\",\"model\":\"q\",\"object\":\"chat.completion.chunk\"}\n\n",
    ":\n\n",
    "data: {\"choices\":[{\"finish_reason\":null,\"index\":0,\"delta\":{\"content\":\"lo \"}}],\"created\":1,\"id\":\"c\",\"model\":\"q\",\"object\":\"chat.completion.chunk\"}\n\n",
    "data: {\"choices\":[{\"finish_reason\":null,\"index\":0,\"delta\":{\"content\":\"wörld 🦙\"}}],\"created\":1,\"id\":\"c\",\"model\":\"q\",\"object\":\"chat.completion.chunk\"}\n\n",
    "data: {\"choices\":[{\"finish_reason\":\"stop\",\"index\":0,\"delta\":{}}],\"created\":1,\"id\":\"c\",\"model\":\"q\",\"object\":\"chat.completion.chunk\",\"timings\":{\"cache_n\":4,\"prompt_n\":6,\"prompt_ms\":1.0,\"prompt_per_token_ms\":0.1,\"prompt_per_second\":6000.0,\"predicted_n\":3,\"predicted_ms\":2.0,\"predicted_per_token_ms\":0.6,\"predicted_per_second\":1500.0}}\n\n",
    "data: [DONE]\n\n",
);

fn scan_whole(s: &[u8]) -> (ResponseStats, u64) {
    let mut sc = SseScanner::new();
    let n = sc.feed(s);
    (sc.stats, n)
}

#[test]
fn reads_a_llama_stream() {
    let (stats, content) = scan_whole(STREAM.as_bytes());
    assert_eq!(content, 3);
    assert!(stats.saw_done);
    assert_eq!(stats.finish_reason.as_deref(), Some("stop"));
    assert_eq!(
        stats.tokens(),
        TokenCounts {
            prompt: 10,
            completion: 3,
            cached: 4
        }
    );
    assert_eq!(stats.cache_hit_ratio(), Some(0.4));
    assert_eq!(stats.malformed, 0);
}

#[test]
fn every_split_point_gives_the_same_counts() {
    let bytes = STREAM.as_bytes();
    let (expected, _) = scan_whole(bytes);
    for split in 0..=bytes.len() {
        let mut sc = SseScanner::new();
        let n = sc.feed(&bytes[..split]) + sc.feed(&bytes[split..]);
        assert_eq!(n, 3, "split at {split}");
        assert_eq!(sc.stats, expected, "split at {split}");
    }
}

#[test]
fn byte_by_byte_and_three_way_splits() {
    let bytes = STREAM.as_bytes();
    let (expected, _) = scan_whole(bytes);
    let mut sc = SseScanner::new();
    for b in bytes {
        sc.feed(std::slice::from_ref(b));
    }
    assert_eq!(sc.stats, expected);
    for a in (0..bytes.len()).step_by(7) {
        for b in (a..bytes.len()).step_by(13) {
            let mut sc = SseScanner::new();
            sc.feed(&bytes[..a]);
            sc.feed(&bytes[a..b]);
            sc.feed(&bytes[b..]);
            assert_eq!(sc.stats, expected, "{a} {b}");
        }
    }
}

#[test]
fn usage_wins_over_timings() {
    let s = concat!(
        "data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\n",
        "data: {\"choices\":[],\"usage\":{\"completion_tokens\":1,\"prompt_tokens\":9,\"total_tokens\":10},\"timings\":{\"cache_n\":2,\"prompt_n\":7,\"predicted_n\":1}}\n\n",
        "data: [DONE]\n\n"
    );
    let (stats, _) = scan_whole(s.as_bytes());
    assert_eq!(
        stats.tokens(),
        TokenCounts {
            prompt: 9,
            completion: 1,
            cached: 2
        }
    );
}

#[test]
fn without_usage_or_timings_content_deltas_are_counted() {
    let s = "data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\ndata: {\"choices\":[{\"text\":\"b\"}]}\n\n";
    let (stats, n) = scan_whole(s.as_bytes());
    assert_eq!(n, 2);
    assert_eq!(stats.tokens().completion, 2);
    assert!(!stats.saw_done, "a cut stream");
}

#[test]
fn malformed_lines_do_not_panic() {
    for junk in [
        &b"data: {not json}\n\n"[..],
        b"data: \xff\xfe\n\n",
        b"data:\n\n",
        b"data: {\"choices\":\"x\"}\n",
        b"data: {\"choices\":[{\"delta\":7}]}\n",
        b"\n\n\n\r\n",
        b"event: x\nid: 1\nretry: 5\n",
    ] {
        let (stats, n) = scan_whole(junk);
        assert_eq!(n, 0);
        assert!(stats.tokens().completion == 0);
    }
}

#[test]
fn error_events_are_noticed() {
    let (stats, _) = scan_whole(b"data: {\"error\":{\"message\":\"x\"}}\n\n");
    assert!(stats.saw_error);
}

#[test]
fn an_endless_line_is_bounded() {
    let mut sc = SseScanner::new();
    let big = vec![b'a'; 600 * 1024];
    sc.feed(b"data: ");
    sc.feed(&big);
    sc.feed(&big);
    assert!(sc.carry.len() <= MAX_CARRY);
    sc.feed(b"\n\ndata: {\"choices\":[{\"delta\":{\"content\":\"x\"}}]}\n\n");
    assert_eq!(sc.stats.content_events, 1);
}

#[test]
fn sums_of_huge_timings_saturate() {
    let (stats, _) = scan_whole(
        b"data: {\"choices\":[],\"timings\":{\"cache_n\":18446744073709551615,\"prompt_n\":5}}\n\n",
    );
    assert_eq!(stats.tokens().prompt, u64::MAX);
    assert_eq!(stats.tokens().cached, u64::MAX);
    assert_eq!(stats.cache_hit_ratio(), Some(1.0));
}

/// What the fast path decides itself (`Some`) and what it leaves to serde.
/// Every case also goes through `absorb`, which (in this debug build)
/// checks the fast path against the full parse.
#[test]
fn the_fast_path_decides_only_plain_events() {
    let cases: &[(&str, Option<bool>)] = &[
        (
            r#"{"choices":[{"finish_reason":null,"index":0,"delta":{"content":"Hel"}}],"id":"c"}"#,
            Some(true),
        ),
        (
            r#"{"choices":[{"delta":{"role":"assistant","content":null}}]}"#,
            Some(false),
        ),
        (r#"{"choices":[{"delta":{"content":""}}]}"#, Some(false)),
        (r#"{"choices":[{"delta":{"content":" "}}]}"#, Some(true)),
        (r#"{"choices":[{"delta":{"content":{}}}]}"#, Some(true)),
        (r#"{"choices":[{"delta":{}}]}"#, Some(false)),
        (r#"{"choices":[{"delta":null,"text":"b"}]}"#, Some(true)),
        (
            r#"{"choices":[{"delta":{"content":""},"text":"b"}]}"#,
            Some(false),
        ),
        (r#"{"choices":[{"delta":{},"text":"b"}]}"#, Some(true)),
        (r#"{"choices":[{"text":""},{"text":"x"}]}"#, Some(true)),
        (
            r#" { "choices" : [ { "delta" : { "content" : "a\u00e9\n\"" } } ] } "#,
            Some(true),
        ),
        (r#"{"choices":null}"#, Some(false)),
        (r#"{"choices":[]}"#, Some(false)),
        (r#"{}"#, Some(false)),
        (
            r#"{"x":[1,-2.5e-3,0,true,false,null,{"a":[],"\u0041":"\ud800"}]}"#,
            Some(false),
        ),
        (r#"{"\u0041":1}"#, None),
        (
            r#"{"choices":[{"delta":{"content":"🦙"}}],"big":1e400}"#,
            Some(true),
        ),
        // left to serde: effects other than content, or shapes it reads specially
        (r#"{"choices":[{"finish_reason":"stop","delta":{}}]}"#, None),
        (
            r#"{"choices":[{"finish_reason" : "stop","delta":{}}]}"#,
            None,
        ),
        (r#"{"choices":[],"usage":null}"#, None),
        (r#"{"timings":{}}"#, None),
        (r#"{"error":{"message":"x"}}"#, None),
        (r#"{"choices":[{"delta":{"cont\u0065nt":"x"}}]}"#, None),
        (r#"{"choices":[],"choices":[]}"#, None),
        (
            r#"{"choices":[{"delta":{"content":"a","content":"b"}}]}"#,
            None,
        ),
        (r#"{"choices":[[null,"x"]]}"#, None),
        (r#"{"choices":[{"delta":[]}]}"#, None),
        (r#"{"choices":{}}"#, None),
        (r#"["x"]"#, None),
        // malformed: the full parse counts them
        ("", None),
        ("{", None),
        (r#"{"choices":[{"delta":{"content":"a"}}]} x"#, None),
        (r#"{"choices":[{"delta":{"content":"a"}},]}"#, None),
        (r#"{"a":01}"#, None),
        (r#"{"a":1.}"#, None),
        (r#"{"a":-}"#, None),
        (r#"{"a":"\x"}"#, None),
        (r#"{"a":"\u12"}"#, None),
        ("{\"a\":\"\u{1}\"}", None),
        (r#"{"a":nul}"#, None),
        (r#"{"a":1,}"#, None),
        (r#"{,"a":1}"#, None),
    ];
    for (payload, expected) in cases {
        assert_eq!(quick_content(payload.as_bytes()), *expected, "{payload}");
        let mut stats = ResponseStats::default();
        let content = stats.absorb(Dialect::OpenAi, None, payload.as_bytes());
        if let Some(expected) = expected {
            assert_eq!(content, *expected, "{payload}");
        }
    }
    assert_eq!(quick_content(b"{\"a\":\"\xff\"}"), None);
    let deep = format!("{{\"a\":{}{}}}", "[".repeat(40), "]".repeat(40));
    assert_eq!(quick_content(deep.as_bytes()), None);
    let mut stats = ResponseStats::default();
    assert!(!stats.absorb(Dialect::OpenAi, None, deep.as_bytes()));
    assert_eq!(stats.malformed, 0);
}

#[test]
fn non_streaming_usage() {
    let mut c = JsonCollector::default();
    let body = br#"{"choices":[{"finish_reason":"stop","index":0,"message":{"role":"assistant","content":"hi"}}],"usage":{"completion_tokens":8,"prompt_tokens":5,"total_tokens":13,"prompt_tokens_details":{"cached_tokens":3}},"timings":{"cache_n":3,"prompt_n":2,"predicted_n":8,"prompt_per_second":100.0,"predicted_per_second":50.0}}"#;
    c.feed(&body[..10]);
    c.feed(&body[10..]);
    let stats = c.finish();
    assert_eq!(
        stats.tokens(),
        TokenCounts {
            prompt: 5,
            completion: 8,
            cached: 3
        }
    );
    assert_eq!(stats.timings.unwrap().predicted_per_second, Some(50.0));
}

// -----------------------------------------------------------------------
// The three dialects

// One generation recorded from llama-server b11434 (the tiny test model,
// `max_tokens` 4, its 11-token prompt cached but for 1 token) through
// each route, with `"stream": true` and without; ids, `created` and
// `system_fingerprint` shortened, a `:` ping added to the streams.

/// `/v1/chat/completions`: no usage without `stream_options`, `timings` on the last chunk.
const OPENAI_STREAM: &str = concat!(
    "data: {\"choices\":[{\"finish_reason\":null,\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":null}}],\"created\":1,\"id\":\"chatcmpl_1\",\"model\":\"tiny-upstream\",\"object\":\"chat.completion.chunk\"}\n\n",
    "data: {\"choices\":[{\"finish_reason\":null,\"index\":0,\"delta\":{\"content\":\"The\"}}],\"created\":1,\"id\":\"chatcmpl_1\",\"model\":\"tiny-upstream\",\"object\":\"chat.completion.chunk\"}\n\n",
    "data: {\"choices\":[{\"finish_reason\":null,\"index\":0,\"delta\":{\"content\":\" quick\"}}],\"created\":1,\"id\":\"chatcmpl_1\",\"model\":\"tiny-upstream\",\"object\":\"chat.completion.chunk\"}\n\n",
    ":\n\n",
    "data: {\"choices\":[{\"finish_reason\":null,\"index\":0,\"delta\":{\"content\":\" brown\"}}],\"created\":1,\"id\":\"chatcmpl_1\",\"model\":\"tiny-upstream\",\"object\":\"chat.completion.chunk\"}\n\n",
    "data: {\"choices\":[{\"finish_reason\":null,\"index\":0,\"delta\":{\"content\":\" fo\"}}],\"created\":1,\"id\":\"chatcmpl_1\",\"model\":\"tiny-upstream\",\"object\":\"chat.completion.chunk\"}\n\n",
    "data: {\"choices\":[{\"finish_reason\":\"length\",\"index\":0,\"delta\":{}}],\"created\":1,\"id\":\"chatcmpl_1\",\"model\":\"tiny-upstream\",\"object\":\"chat.completion.chunk\",\"timings\":{\"cache_n\":10,\"prompt_n\":1,\"prompt_ms\":0.856,\"prompt_per_token_ms\":0.856,\"prompt_per_second\":1168.2242990654206,\"predicted_n\":4,\"predicted_ms\":2.026,\"predicted_per_token_ms\":0.6753333333333332,\"predicted_per_second\":1480.750246791708}}\n\n",
    "data: [DONE]\n\n",
);

/// `/v1/responses`: usage and `timings` in `response.completed`, no `[DONE]`.
const RESPONSES_STREAM: &str = concat!(
    "event: response.created\ndata: {\"type\":\"response.created\",\"response\":{\"id\":\"resp_1\",\"object\":\"response\",\"status\":\"in_progress\"}}\n\n",
    "event: response.in_progress\ndata: {\"type\":\"response.in_progress\",\"response\":{\"id\":\"resp_1\",\"object\":\"response\",\"status\":\"in_progress\"}}\n\n",
    "event: response.output_item.added\ndata: {\"type\":\"response.output_item.added\",\"item\":{\"content\":[],\"id\":\"msg_1\",\"role\":\"assistant\",\"status\":\"in_progress\",\"type\":\"message\"}}\n\n",
    "event: response.content_part.added\ndata: {\"type\":\"response.content_part.added\",\"item_id\":\"msg_1\",\"part\":{\"type\":\"output_text\",\"text\":\"\"}}\n\n",
    "event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"item_id\":\"msg_1\",\"delta\":\"The\"}\n\n",
    "event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"item_id\":\"msg_1\",\"delta\":\" quick\"}\n\n",
    ":\n\n",
    "event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"item_id\":\"msg_1\",\"delta\":\" brown\"}\n\n",
    "event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"item_id\":\"msg_1\",\"delta\":\" fo\"}\n\n",
    "event: response.output_text.done\ndata: {\"type\":\"response.output_text.done\",\"item_id\":\"msg_1\",\"text\":\"The quick brown fo\"}\n\n",
    "event: response.content_part.done\ndata: {\"type\":\"response.content_part.done\",\"item_id\":\"msg_1\",\"part\":{\"type\":\"output_text\",\"annotations\":[],\"logprobs\":[],\"text\":\"The quick brown fo\"}}\n\n",
    "event: response.output_item.done\ndata: {\"type\":\"response.output_item.done\",\"item\":{\"type\":\"message\",\"status\":\"completed\",\"id\":\"msg_1\",\"content\":[{\"type\":\"output_text\",\"annotations\":[],\"logprobs\":[],\"text\":\"The quick brown fo\"}],\"role\":\"assistant\"}}\n\n",
    "event: response.completed\ndata: {\"type\":\"response.completed\",\"response\":{\"id\":\"resp_1\",\"object\":\"response\",\"created_at\":1,\"status\":\"completed\",\"model\":\"tiny-upstream\",\"output\":[{\"type\":\"message\",\"status\":\"completed\",\"id\":\"msg_1\",\"content\":[{\"type\":\"output_text\",\"annotations\":[],\"logprobs\":[],\"text\":\"The quick brown fo\"}],\"role\":\"assistant\"}],\"usage\":{\"input_tokens\":11,\"output_tokens\":4,\"total_tokens\":15,\"input_tokens_details\":{\"cached_tokens\":10}}},\"timings\":{\"cache_n\":10,\"prompt_n\":1,\"prompt_ms\":0.714,\"prompt_per_token_ms\":0.714,\"prompt_per_second\":1400.560224089636,\"predicted_n\":4,\"predicted_ms\":1.609,\"predicted_per_token_ms\":0.5363333333333333,\"predicted_per_second\":1864.5121193287755}}\n\n",
);

/// `/v1/messages`: prompt usage (without its cached part) in
/// `message_start`, output in `message_delta`, no `timings`, no `[DONE]`.
const ANTHROPIC_STREAM: &str = concat!(
    "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"chatcmpl_1\",\"type\":\"message\",\"role\":\"assistant\",\"content\":[],\"model\":\"tiny-upstream\",\"stop_reason\":null,\"stop_sequence\":null,\"usage\":{\"cache_read_input_tokens\":10,\"input_tokens\":1,\"output_tokens\":0}}}\n\n",
    "event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n",
    "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"The\"}}\n\n",
    "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\" quick\"}}\n\n",
    ":\n\n",
    "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\" brown\"}}\n\n",
    "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\" fo\"}}\n\n",
    "event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":0}\n\n",
    "event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"max_tokens\",\"stop_sequence\":null},\"usage\":{\"output_tokens\":4}}\n\n",
    "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
);

const RESPONSES_BODY: &str = "{\"completed_at\":1,\"created_at\":1,\"id\":\"resp_1\",\"model\":\"tiny-upstream\",\"object\":\"response\",\"output\":[{\"content\":[{\"type\":\"output_text\",\"annotations\":[],\"logprobs\":[],\"text\":\"The quick brown fo\"}],\"id\":\"msg_1\",\"role\":\"assistant\",\"status\":\"completed\",\"type\":\"message\"}],\"status\":\"completed\",\"usage\":{\"input_tokens\":11,\"output_tokens\":4,\"total_tokens\":15,\"input_tokens_details\":{\"cached_tokens\":10}}}";

const ANTHROPIC_BODY: &str = "{\"id\":\"chatcmpl_1\",\"type\":\"message\",\"role\":\"assistant\",\"content\":[{\"type\":\"text\",\"text\":\"The quick brown fo\"}],\"model\":\"tiny-upstream\",\"stop_reason\":\"max_tokens\",\"stop_sequence\":null,\"usage\":{\"cache_read_input_tokens\":10,\"input_tokens\":1,\"output_tokens\":4}}";

/// The recorded generation's counts, whatever the dialect.
const GENERATION: TokenCounts = TokenCounts {
    prompt: 11,
    completion: 4,
    cached: 10,
};

const DIALECT_STREAMS: [(Dialect, &str); 3] = [
    (Dialect::OpenAi, OPENAI_STREAM),
    (Dialect::Responses, RESPONSES_STREAM),
    (Dialect::Anthropic, ANTHROPIC_STREAM),
];

fn scan_as(dialect: Dialect, s: &[u8]) -> (ResponseStats, u64) {
    let mut sc = SseScanner::for_dialect(dialect);
    let n = sc.feed(s);
    (sc.stats, n)
}

#[test]
fn the_same_generation_reads_the_same_in_every_dialect() {
    for (dialect, stream) in DIALECT_STREAMS {
        let (stats, content) = scan_as(dialect, stream.as_bytes());
        let d = dialect.as_str();
        assert_eq!(stats.tokens(), GENERATION, "{d}");
        assert_eq!(content, 4, "{d}: one content event per text delta");
        assert_eq!(stats.content_events, 4, "{d}");
        assert!(stats.saw_done, "{d}");
        assert!(!stats.saw_error, "{d}");
        assert_eq!(stats.malformed, 0, "{d}");
        assert_eq!(stats.cache_hit_ratio(), Some(10.0 / 11.0), "{d}");
    }
}

#[test]
fn dialect_streams_read_the_same_in_any_chunking() {
    for (dialect, stream) in DIALECT_STREAMS {
        let bytes = stream.as_bytes();
        let (expected, total) = scan_as(dialect, bytes);
        let d = dialect.as_str();
        for split in 0..=bytes.len() {
            let mut sc = SseScanner::for_dialect(dialect);
            let n = sc.feed(&bytes[..split]) + sc.feed(&bytes[split..]);
            assert_eq!(n, total, "{d}: split at {split}");
            assert_eq!(sc.stats, expected, "{d}: split at {split}");
        }
        let mut sc = SseScanner::for_dialect(dialect);
        let n: u64 = bytes.iter().map(|b| sc.feed(std::slice::from_ref(b))).sum();
        assert_eq!(n, total, "{d}: byte by byte");
        assert_eq!(sc.stats, expected, "{d}: byte by byte");
    }
}

#[test]
fn responses_stream_usage_timings_and_end() {
    let (stats, _) = scan_as(Dialect::Responses, RESPONSES_STREAM.as_bytes());
    assert_eq!(
        stats.usage,
        Some(Usage {
            prompt_tokens: 11,
            completion_tokens: 4,
            prompt_tokens_details: Some(PromptDetails { cached_tokens: 10 }),
        })
    );
    let t = stats.timings.expect("timings in response.completed");
    assert_eq!((t.prompt_n, t.cache_n, t.predicted_n), (1, 10, 4));
    assert_eq!(stats.finish_reason.as_deref(), Some("completed"));
    assert_eq!(stats.events, 12);
}

#[test]
fn anthropic_stream_usage_comes_in_two_parts() {
    let (stats, _) = scan_as(Dialect::Anthropic, ANTHROPIC_STREAM.as_bytes());
    assert_eq!(
        stats.usage,
        Some(Usage {
            prompt_tokens: 11,
            completion_tokens: 4,
            prompt_tokens_details: Some(PromptDetails { cached_tokens: 10 }),
        })
    );
    assert_eq!(stats.timings, None, "llama.cpp sends none in this dialect");
    assert_eq!(stats.finish_reason.as_deref(), Some("max_tokens"));
    // A later count wins; cache writes are prompt tokens too.
    let s = concat!(
        "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":5,\"cache_read_input_tokens\":2,\"output_tokens\":1}}}\n\n",
        "event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"input_tokens\":6,\"cache_creation_input_tokens\":3,\"output_tokens\":9}}\n\n",
    );
    let (stats, _) = scan_as(Dialect::Anthropic, s.as_bytes());
    assert_eq!(
        stats.tokens(),
        TokenCounts {
            prompt: 11,
            completion: 9,
            cached: 2
        }
    );
}

#[test]
fn a_cut_stream_reports_what_it_saw() {
    for (dialect, stream) in DIALECT_STREAMS {
        // Cut after the last text delta (and its blank line).
        let cut = stream.find(" fo\"").unwrap();
        let cut = cut + stream[cut..].find("\n\n").unwrap() + 2;
        let (stats, content) = scan_as(dialect, &stream.as_bytes()[..cut]);
        let d = dialect.as_str();
        assert!(!stats.saw_done, "{d}");
        assert!(!stats.saw_error, "{d}");
        assert_eq!(content, 4, "{d}");
        let tokens = stats.tokens();
        assert_eq!(tokens.completion, 4, "{d}: counted deltas");
        // Only Anthropic tells the prompt before the end.
        let prompt = if dialect == Dialect::Anthropic {
            (11, 10)
        } else {
            (0, 0)
        };
        assert_eq!((tokens.prompt, tokens.cached), prompt, "{d}");
    }
}

#[test]
fn dialect_error_events_are_noticed() {
    let cases: &[(Dialect, &str)] = &[
        // llama.cpp b11434's mid-stream errors (server-context.cpp, format_error)
        (
            Dialect::Responses,
            "data: {\"error\":{\"code\":500,\"message\":\"x\",\"type\":\"server_error\"}}\n\n",
        ),
        (
            Dialect::Anthropic,
            "event: error\ndata: {\"code\":500,\"message\":\"x\",\"type\":\"server_error\"}\n\n",
        ),
        // the APIs' own spellings
        (
            Dialect::Responses,
            "event: error\ndata: {\"type\":\"error\",\"code\":\"server_error\",\"message\":\"x\"}\n\n",
        ),
        (
            Dialect::Responses,
            "event: response.failed\ndata: {\"type\":\"response.failed\",\"response\":{\"status\":\"failed\",\"error\":{\"code\":\"server_error\"}}}\n\n",
        ),
        (
            Dialect::Anthropic,
            "data: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\",\"message\":\"x\"}}\n\n",
        ),
        // an `event: error` whose data cannot be read still ends the stream
        (Dialect::Anthropic, "event: error\ndata: {oops\n\n"),
    ];
    for (i, (dialect, s)) in cases.iter().enumerate() {
        let (stats, n) = scan_as(*dialect, s.as_bytes());
        assert!(stats.saw_error, "{s}");
        assert_eq!(stats.malformed, u64::from(i == cases.len() - 1), "{s}");
        assert!(!stats.saw_done, "{s}");
        assert_eq!(n, 0, "{s}");
    }
    // after a token or two
    let mut s = ANTHROPIC_STREAM[..ANTHROPIC_STREAM.find(":\n\n").unwrap()].to_string();
    s.push_str(
        "event: error\ndata: {\"code\":500,\"message\":\"x\",\"type\":\"server_error\"}\n\n",
    );
    let (stats, n) = scan_as(Dialect::Anthropic, s.as_bytes());
    assert!(stats.saw_error && !stats.saw_done);
    assert_eq!(n, 2);
    // an error's `event:` line ends with its event: what follows is read as usual
    let s = "event: error\ndata: {}\n\ndata: {\"type\":\"content_block_delta\",\"delta\":{\"text\":\"a\"}}\n\n";
    let (stats, n) = scan_as(Dialect::Anthropic, s.as_bytes());
    assert!(stats.saw_error);
    assert_eq!(n, 1);
}

#[test]
fn every_generated_delta_is_content() {
    let cases: &[(Dialect, &str, bool)] = &[
        // Anthropic: text, thinking and tool arguments; not signatures, block starts or empty text
        (
            Dialect::Anthropic,
            r#"{"type":"content_block_delta","index":0,"delta":{"type":"thinking_delta","thinking":"hm"}}"#,
            true,
        ),
        (
            Dialect::Anthropic,
            r#"{"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":"{\"a\":"}}"#,
            true,
        ),
        (
            Dialect::Anthropic,
            r#"{"type":"content_block_delta","index":0,"delta":{"type":"signature_delta","signature":""}}"#,
            false,
        ),
        (
            Dialect::Anthropic,
            r#"{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":""}}"#,
            false,
        ),
        (
            Dialect::Anthropic,
            r#"{"type":"content_block_start","index":1,"content_block":{"type":"tool_use","id":"t","name":"f"}}"#,
            false,
        ),
        (Dialect::Anthropic, r#"{"type":"ping"}"#, false),
        // Responses: any response.*.delta with text
        (
            Dialect::Responses,
            r#"{"type":"response.reasoning_text.delta","delta":"hm","item_id":"rs_1"}"#,
            true,
        ),
        (
            Dialect::Responses,
            r#"{"type":"response.function_call_arguments.delta","delta":"{\"a\":","item_id":"fc_1"}"#,
            true,
        ),
        (
            Dialect::Responses,
            r#"{"type":"response.output_text.delta","delta":""}"#,
            false,
        ),
        (
            Dialect::Responses,
            r#"{"type":"response.output_item.added","item":{"type":"function_call","name":"f"}}"#,
            false,
        ),
        (
            Dialect::Responses,
            r#"{"type":"response.output_text.done","text":"abc"}"#,
            false,
        ),
        // OpenAI: reasoning and tool-call arguments too; not a tool call's name alone
        (
            Dialect::OpenAi,
            r#"{"choices":[{"finish_reason":null,"index":0,"delta":{"reasoning_content":"hm"}}]}"#,
            true,
        ),
        (
            Dialect::OpenAi,
            r#"{"choices":[{"delta":{"reasoning_content":"","content":null}}]}"#,
            false,
        ),
        (
            Dialect::OpenAi,
            r#"{"choices":[{"delta":{"tool_calls":[{"index":0,"id":"t","type":"function","function":{"name":"f","arguments":"{\""}}]}}]}"#,
            true,
        ),
        (
            Dialect::OpenAi,
            r#"{"choices":[{"delta":{"tool_calls":[{"index":0,"id":"t","type":"function","function":{"name":"f"}}]}}]}"#,
            false,
        ),
        (
            Dialect::OpenAi,
            r#"{"choices":[{"delta":{"tool_calls":"odd","content":"a"}}]}"#,
            true,
        ),
        (
            Dialect::OpenAi,
            r#"{"choices":[{"delta":{"tool_calls":null}}]}"#,
            false,
        ),
    ];
    for (dialect, payload, expected) in cases {
        let line = format!("data: {payload}\n\n");
        let (stats, n) = scan_as(*dialect, line.as_bytes());
        assert_eq!(n, u64::from(*expected), "{payload}");
        assert_eq!(stats.malformed, 0, "{payload}");
        if *dialect == Dialect::OpenAi {
            assert!(fast_path_agrees(payload.as_bytes()), "{payload}");
        }
    }
    // The `event:` line names the type when the payload does not.
    let s = "event: content_block_delta\ndata: {\"delta\":{\"text\":\"a\"}}\n\nevent: response.output_text.delta\ndata: {\"delta\":\"b\"}\n\n";
    assert_eq!(scan_as(Dialect::Anthropic, s.as_bytes()).1, 1);
    assert_eq!(scan_as(Dialect::Responses, s.as_bytes()).1, 1);
    // A stream read in the wrong dialect finds no content.
    assert_eq!(scan_as(Dialect::OpenAi, ANTHROPIC_STREAM.as_bytes()).1, 0);
    assert_eq!(scan_as(Dialect::Anthropic, OPENAI_STREAM.as_bytes()).1, 0);
}

/// Every single-byte edit of OpenAI events with reasoning and tool-call
/// deltas: the fast path never disagrees with the full parse.
#[test]
fn the_fast_path_agrees_on_reasoning_and_tool_calls() {
    let seeds = [
        r#"{"choices":[{"delta":{"reasoning_content":"a","content":null,"tool_calls":null}}]}"#,
        r#"{"choices":[{"delta":{"content":"","reasoning_content":""},"text":"b"}]}"#,
        r#"{"choices":[{"delta":{"tool_calls":[{"function":{"arguments":"x"}}]}}]}"#,
    ];
    assert_eq!(quick_content(seeds[0].as_bytes()), Some(true));
    assert_eq!(quick_content(seeds[1].as_bytes()), Some(false));
    assert_eq!(quick_content(seeds[2].as_bytes()), None);
    let bytes = [
        b'"', b'\\', b'{', b'}', b'[', b']', b',', b':', b' ', b'n', b'0', b'a', 0x1f, 0xff,
    ];
    for seed in seeds {
        let seed = seed.as_bytes();
        for i in 0..seed.len() {
            let mut cut = seed.to_vec();
            cut.remove(i);
            assert!(fast_path_agrees(&cut), "{}", String::from_utf8_lossy(&cut));
            for b in bytes {
                let mut edited = seed.to_vec();
                edited[i] = b;
                assert!(
                    fast_path_agrees(&edited),
                    "{}",
                    String::from_utf8_lossy(&edited)
                );
            }
        }
    }
    let dup = r#"{"choices":[{"delta":{"reasoning_content":"a","reasoning_content":"b"}}]}"#;
    assert_eq!(quick_content(dup.as_bytes()), None);
    let dup = r#"{"choices":[{"delta":{"tool_calls":null,"tool_calls":null}}]}"#;
    assert_eq!(quick_content(dup.as_bytes()), None);
}

#[test]
fn non_streamed_bodies_of_every_dialect() {
    let openai = "{\"choices\":[{\"finish_reason\":\"length\",\"index\":0,\"message\":{\"role\":\"assistant\",\"content\":\"The quick brown fo\"}}],\"created\":1,\"model\":\"tiny-upstream\",\"object\":\"chat.completion\",\"usage\":{\"completion_tokens\":4,\"prompt_tokens\":11,\"total_tokens\":15,\"prompt_tokens_details\":{\"cached_tokens\":10}},\"id\":\"chatcmpl_1\",\"timings\":{\"cache_n\":10,\"prompt_n\":1,\"predicted_n\":4}}";
    for (dialect, body, reason) in [
        (Dialect::OpenAi, openai, "length"),
        (Dialect::Responses, RESPONSES_BODY, "completed"),
        (Dialect::Anthropic, ANTHROPIC_BODY, "max_tokens"),
    ] {
        let mut acc = Accounting::for_dialect(dialect, false, "application/json; charset=utf-8");
        assert_eq!(acc.feed(&body.as_bytes()[..20]), 0);
        assert_eq!(acc.feed(&body.as_bytes()[20..]), 0);
        let stats = acc.finish().unwrap();
        let d = dialect.as_str();
        assert_eq!(stats.tokens(), GENERATION, "{d}");
        assert_eq!(stats.cache_hit_ratio(), Some(10.0 / 11.0), "{d}");
        assert_eq!(stats.finish_reason.as_deref(), Some(reason), "{d}");
        assert_eq!(
            (stats.events, stats.content_events, stats.malformed),
            (1, 0, 0),
            "{d}"
        );
        assert!(!stats.saw_error, "{d}");
        // llama-server's error body (also for a stream that fails before its first token)
        let mut c = JsonCollector::for_dialect(dialect);
        c.feed(br#"{"error":{"code":400,"message":"request (9011 tokens) exceeds the available context size (4096 tokens), try increasing it","type":"exceed_context_size_error","n_prompt_tokens":9011,"n_ctx":4096}}"#);
        let stats = c.finish();
        assert!(stats.saw_error, "{d}");
        assert_eq!(stats.tokens(), TokenCounts::default(), "{d}");
    }
}

#[test]
fn accounting_follows_the_dialect() {
    for dialect in [Dialect::OpenAi, Dialect::Responses, Dialect::Anthropic] {
        assert!(matches!(
            Accounting::for_dialect(dialect, true, "text/event-stream"),
            Accounting::Sse(SseScanner { dialect: d, .. }) if d == dialect
        ));
        assert!(matches!(
            Accounting::for_dialect(dialect, false, "Application/JSON"),
            Accounting::Json(JsonCollector { dialect: d, .. }) if d == dialect
        ));
        assert!(matches!(
            Accounting::for_dialect(dialect, false, "text/plain"),
            Accounting::Off
        ));
    }
    assert!(matches!(
        Accounting::for_dialect(Dialect::OpenAi, true, ""),
        Accounting::Sse(SseScanner {
            dialect: Dialect::OpenAi,
            ..
        })
    ));
    let mut acc = Accounting::for_dialect(Dialect::Anthropic, true, "text/event-stream");
    let n: u64 = ANTHROPIC_STREAM
        .as_bytes()
        .chunks(64)
        .map(|c| acc.feed(c))
        .sum();
    assert_eq!(n, 4);
    let stats = acc.finish().unwrap();
    assert!(stats.saw_done);
    assert_eq!(stats.tokens(), GENERATION);
}
