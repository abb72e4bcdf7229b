//! Micro-benchmarks of the per-request hot paths (criterion).
//!
//! `cargo bench --bench micro`: key lookup (`KeyTable::authenticate` with 1, 100
//! and 1,000 keys), body inspection and `model` rewrite on 1 KiB and 1 MiB
//! bodies, and the SSE scanner on a realistic llama.cpp stream, fed one event
//! per read (as llama-server writes them) and in 16 KiB reads, and the route
//! table (`RouteTable::classify`, canonical-path check included) on the
//! first and last model routes, a passthrough path and an unknown one, and
//! what a key with token limits adds (reservation, settlement, ledger), and
//! the cache-affinity key (`prefix::derive`: the prefix hashes of a 100 KiB
//! conversation of 40 messages, and a 1 KiB one). Under
//! `cargo test --benches` criterion runs each once as a smoke test.

use std::hint::black_box;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use llm_edge::openai::body::{inspect, rewrite, InsertAs, Rewrite};
use llm_edge::openai::prefix;
use llm_edge::openai::sse::SseScanner;
use llm_edge::policy::auth::{digest, ApiKey, KeyTable};
use llm_edge::policy::routes::RouteTable;

fn key_table(n: usize) -> KeyTable {
    let keys = (0..n)
        .map(|i| {
            ApiKey::new(
                format!("key-{i}"),
                digest(&format!("sk-edge-{i:064}")),
                None,
            )
        })
        .collect();
    KeyTable::new(keys, false)
}

fn bench_auth(c: &mut Criterion) {
    let mut g = c.benchmark_group("auth/authenticate");
    for n in [1usize, 100, 1000] {
        let table = key_table(n);
        // the last key: a lookup that stopped at the first match would be slowest here
        let good = format!("Bearer sk-edge-{:064}", n - 1).into_bytes();
        let bad = format!("Bearer sk-edge-{:064}", n + 7).into_bytes();
        g.bench_with_input(BenchmarkId::new("valid", n), &good, |b, h| {
            b.iter(|| table.authenticate(black_box(Some(h.as_slice()))).is_ok());
        });
        g.bench_with_input(BenchmarkId::new("wrong", n), &bad, |b, h| {
            b.iter(|| table.authenticate(black_box(Some(h.as_slice()))).is_err());
        });
    }
    g.finish();
}

/// A chat request of about `size` bytes: a few messages, the last one padded.
fn chat_body(size: usize) -> Bytes {
    let head = r#"{"model":"qwen3","messages":[{"role":"system","content":"You are a helpful assistant. Answer briefly."},{"role":"user","content":"Summarise the following text:\n"#;
    let tail = r#""}],"stream":true,"temperature":0.7,"top_p":0.95,"max_tokens":512,"stream_options":{"include_usage":true}}"#;
    let filler = "The quick brown fox jumps over the lazy dog, \\\"quoted\\\" and caf\\u00e9. ";
    let mut body = String::with_capacity(size + filler.len());
    body.push_str(head);
    while body.len() + tail.len() < size {
        body.push_str(filler);
    }
    body.push_str(tail);
    Bytes::from(body)
}

fn bench_body(c: &mut Criterion) {
    let mut g = c.benchmark_group("body");
    for (label, size) in [("1KiB", 1024usize), ("1MiB", 1 << 20)] {
        let body = chat_body(size);
        assert!(inspect(&body).is_ok(), "the generated body is valid JSON");
        g.throughput(Throughput::Bytes(body.len() as u64));
        if size > 64 * 1024 {
            g.sample_size(20);
        }
        g.bench_with_input(BenchmarkId::new("inspect", label), &body, |b, body| {
            b.iter(|| inspect(black_box(body)).unwrap());
        });
        let rw = Rewrite {
            upstream_model: "/models/qwen3-30b-a3b-instruct-q4_k_m.gguf",
            max_tokens: Some(256),
            insert_as: InsertAs::MaxTokens,
        };
        g.bench_with_input(
            BenchmarkId::new("inspect+rewrite", label),
            &body,
            |b, body| {
                b.iter(|| {
                    let info = inspect(black_box(body)).unwrap();
                    rewrite(body.clone(), &info, black_box(&rw))
                });
            },
        );
    }
    g.finish();
}

/// A llama.cpp (b11434) chat stream of `tokens` tokens, as the list of SSE frames it writes.
fn llama_stream(tokens: usize) -> Vec<Vec<u8>> {
    let words = [
        " the",
        " model",
        " answered",
        ",",
        " quickly",
        "\\n",
        " \\\"quoted\\\"",
        " caf\\u00e9",
        " 42",
        ".",
    ];
    let base = r#""created":1767225600,"id":"chatcmpl-f3J8xQ2LrU0wz9TnYb7cVdKs","model":"qwen3-30b-a3b-instruct","system_fingerprint":"b11434-5a1e3c9d","object":"chat.completion.chunk""#;
    let mut frames = vec![format!(
        r#"data: {{"choices":[{{"finish_reason":null,"index":0,"delta":{{"role":"assistant","content":null}}}}],{base}}}"#
    )];
    for i in 0..tokens {
        frames.push(format!(
            r#"data: {{"choices":[{{"finish_reason":null,"index":0,"delta":{{"content":"{}"}}}}],{base}}}"#,
            words[i % words.len()]
        ));
    }
    frames.push(format!(
        r#"data: {{"choices":[{{"finish_reason":"stop","index":0,"delta":{{}}}}],{base},"usage":{{"completion_tokens":{tokens},"prompt_tokens":31,"total_tokens":{}}},"timings":{{"cache_n":12,"prompt_n":19,"prompt_ms":41.2,"prompt_per_token_ms":2.17,"prompt_per_second":461.1,"predicted_n":{tokens},"predicted_ms":5012.7,"predicted_per_token_ms":19.6,"predicted_per_second":51.1}}}}"#,
        tokens + 31
    ));
    frames.push("data: [DONE]".to_string());
    frames
        .into_iter()
        .map(|f| format!("{f}\n\n").into_bytes())
        .collect()
}

fn bench_sse(c: &mut Criterion) {
    let frames = llama_stream(256);
    let whole: Vec<u8> = frames.concat();
    let mut g = c.benchmark_group("sse/scanner");
    g.throughput(Throughput::Bytes(whole.len() as u64));
    g.bench_function("one event per read", |b| {
        b.iter(|| {
            let mut s = SseScanner::new();
            let mut n = 0;
            for f in &frames {
                n += s.feed(black_box(f));
            }
            assert_eq!(n, 256);
            s
        });
    });
    g.bench_function("16KiB reads", |b| {
        b.iter(|| {
            let mut s = SseScanner::new();
            let mut n = 0;
            for chunk in whole.chunks(16 * 1024) {
                n += s.feed(black_box(chunk));
            }
            assert_eq!(n, 256);
            s
        });
    });
    g.finish();
}

fn bench_routes(c: &mut Criterion) {
    let mut g = c.benchmark_group("routes/classify");
    let table = RouteTable::new(vec!["/props".into(), "/tokenize".into()]);
    for (name, path) in [
        ("chat", "/v1/chat/completions"),
        ("chat_input_tokens", "/v1/chat/completions/input_tokens"),
        ("passthrough", "/tokenize"),
        ("unknown", "/v1/stream?conv_id=abc"),
    ] {
        g.bench_function(name, |b| {
            b.iter(|| table.classify(black_box("POST"), black_box(path)).is_ok());
        });
    }
    g.finish();
}

/// What a key with token limits adds to each request: the reservation and its
/// settlement, the rate-limit headers' snapshot, and the ledger's record.
fn bench_tokens(c: &mut Criterion) {
    use llm_edge::ledger::{Counts, Ledger};
    use llm_edge::policy::tokens::{now_ms, TokenBudget, TokenLimits};
    use std::sync::Arc;
    let limits = TokenLimits {
        per_minute: Some(u64::MAX / 4),
        per_day: Some(u64::MAX / 4),
        per_month: Some(u64::MAX / 4),
    };
    let budget = Arc::new(TokenBudget::new([("bench".to_string(), limits)], now_ms()));
    let mut g = c.benchmark_group("tokens");
    g.bench_function("reserve+state+settle", |b| {
        b.iter(|| {
            let now = now_ms();
            let r = budget.reserve(black_box("bench"), 1_000, now).unwrap();
            black_box(budget.state("bench", now));
            r.settle(black_box(800), now);
        });
    });
    let ledger = Ledger::open(None, budget.clone()).unwrap();
    let counts = Counts {
        requests: 1,
        prompt_tokens: 300,
        completion_tokens: 500,
        ..Counts::default()
    };
    g.bench_function("ledger record", |b| {
        b.iter(|| ledger.record(black_box("bench"), black_box("qwen3"), now_ms(), &counts));
    });
    g.finish();
}

/// A chat conversation of `messages` messages (a system prompt, then
/// alternating user and assistant turns) of about `size` bytes in all.
fn conversation(size: usize, messages: usize) -> Bytes {
    let per = size / messages;
    let filler = "The quick brown fox jumps over the lazy dog, \"quoted\" and caf\u{e9}. ";
    let list: Vec<serde_json::Value> = (0..messages)
        .map(|i| {
            let role = match i {
                0 => "system",
                i if i % 2 == 1 => "user",
                _ => "assistant",
            };
            let content: String = filler.chars().cycle().take(per).collect();
            serde_json::json!({"role": role, "content": format!("{i}: {content}")})
        })
        .collect();
    let body =
        serde_json::json!({"model": "qwen3", "messages": list, "stream": true, "max_tokens": 512});
    Bytes::from(body.to_string())
}

fn bench_affinity(c: &mut Criterion) {
    let mut g = c.benchmark_group("affinity");
    for (label, size, messages) in [("1KiB", 1024usize, 3usize), ("100KiB", 100 << 10, 40)] {
        let body = conversation(size, messages);
        assert_eq!(
            prefix::derive(&body, "qwen3", None, "bench").blocks.len(),
            messages
        );
        g.throughput(Throughput::Bytes(body.len() as u64));
        g.bench_with_input(BenchmarkId::new("derive", label), &body, |b, body| {
            b.iter(|| prefix::derive(black_box(body), "qwen3", None, "bench"));
        });
    }
    g.finish();
}

criterion_group!(
    benches,
    bench_auth,
    bench_body,
    bench_sse,
    bench_routes,
    bench_tokens,
    bench_affinity
);
criterion_main!(benches);
