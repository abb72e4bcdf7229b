//! The properties checked by the fuzz targets (`fuzz/fuzz_targets/*.rs`) and by
//! the proptest suite (`tests/props.rs`, which includes this file with
//! `#[path]`). Every `check_*` function panics when a property does not hold,
//! so a panic here is a finding.
//!
//! The body checks compare `llm_edge::openai::body` against an independent oracle: a
//! small serde visitor that lists the top-level members of a JSON object with
//! the byte span of each raw value.

use std::borrow::Cow;
use std::fmt;
use std::net::IpAddr;
use std::ops::Range;

use bytes::Bytes;
use llm_edge::config;
use llm_edge::openai::body::{self, InsertAs, Rewrite};
use llm_edge::openai::sse::{self, JsonCollector, SseScanner};
use llm_edge::policy::auth::{self, ApiKey, KeyTable};
use llm_edge::policy::limits::{self, KeyLimits, OverMaxTokens};
use llm_edge::policy::routes;
use serde::de::{Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;

// ---------------------------------------------------------------------------
// Request bodies

/// The generation-length fields `body::inspect` reports (and `rewrite` caps).
pub const TOKEN_FIELDS: [&str; 4] = [
    "max_tokens",
    "max_completion_tokens",
    "max_output_tokens",
    "n_predict",
];

/// The fields `body::inspect` reports as multipliers.
pub const MULTIPLIER_FIELDS: [&str; 4] = ["n", "n_cmpl", "best_of", "prompt"];

/// Every dialect `rewrite` inserts a length for.
pub const INSERT_AS: [InsertAs; 3] = [
    InsertAs::MaxTokens,
    InsertAs::AnthropicMaxTokens,
    InsertAs::MaxOutputTokens,
];

/// The inserted name, and the names llama-server b11434 takes the length
/// from on that dialect's routes (when the body has one, nothing is inserted).
fn dialect_lengths(insert_as: InsertAs) -> (&'static str, &'static [&'static str]) {
    match insert_as {
        InsertAs::MaxTokens => (
            "max_tokens",
            &["max_tokens", "max_completion_tokens", "n_predict"],
        ),
        InsertAs::AnthropicMaxTokens => ("max_tokens", &["max_tokens"]),
        InsertAs::MaxOutputTokens => ("max_output_tokens", &TOKEN_FIELDS),
    }
}

/// One top-level member of a JSON object: its unescaped key and the span of
/// its raw value in the body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub key: String,
    pub span: Range<usize>,
}

/// The top-level members of `body` in order (duplicates kept), or `None` when
/// `body` is not exactly one JSON object (surrounding whitespace allowed).
pub fn top_level_members(body: &[u8]) -> Option<Vec<Member>> {
    let mut de = serde_json::Deserializer::from_slice(body);
    let members = de
        .deserialize_map(MembersVisitor {
            base: body.as_ptr() as usize,
        })
        .ok()?;
    de.end().ok()?;
    Some(members)
}

struct MembersVisitor {
    base: usize,
}

impl<'de> Visitor<'de> for MembersVisitor {
    type Value = Vec<Member>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Vec<Member>, A::Error> {
        let mut members = Vec::new();
        while let Some(key) = map.next_key::<Cow<'de, str>>()? {
            let raw: &'de RawValue = map.next_value()?;
            let start = raw.get().as_ptr() as usize - self.base;
            members.push(Member {
                key: key.into_owned(),
                span: start..start + raw.get().len(),
            });
        }
        Ok(members)
    }
}

fn is_token_field(key: &str) -> bool {
    TOKEN_FIELDS.contains(&key)
}

/// `(key, raw value bytes)` of the members that a rewrite must leave alone.
fn untouched<'a>(body: &'a [u8], members: &[Member]) -> Vec<(String, &'a [u8])> {
    members
        .iter()
        .filter(|m| m.key != "model" && !is_token_field(&m.key))
        .map(|m| (m.key.clone(), &body[m.span.clone()]))
        .collect()
}

/// Checks `body::inspect` on `body`, then `body::rewrite` to `new_name` with
/// the optional `cap`, against the oracle:
/// - `inspect` accepts exactly the single JSON objects whose one optional
///   top-level `model` is a string (duplicate `model` keys are rejected);
/// - what it reports (model name and span, stream, members, token limits)
///   matches the oracle;
/// - the rewritten body is one JSON object with exactly one top-level
///   `model`, equal to `new_name`; its generation-length fields are at most
///   `cap` (or unchanged without a cap); every other top-level member has the
///   same key, the same raw bytes and the same order;
/// - with the same model bytes and no cap, the output is the input.
pub fn check_body(body: &[u8], new_name: &str, cap: Option<u64>) {
    let result = body::inspect(body);
    if std::str::from_utf8(body).is_err() {
        // JSON text is UTF-8: invalid UTF-8 anywhere is a 400 (finding 1).
        match result {
            Err(e) => assert_eq!(e.status(), 400),
            Ok(_) => panic!(
                "inspect accepted a body that is not UTF-8: {:?}",
                String::from_utf8_lossy(body)
            ),
        }
        return;
    }
    let oracle = top_level_members(body);
    let Some(members) = oracle else {
        let Err(err) = result else {
            panic!(
                "inspect accepted a body that is not one JSON object: {:?}",
                String::from_utf8_lossy(body)
            )
        };
        assert_eq!(err.status(), 400);
        return;
    };
    let models: Vec<&Member> = members.iter().filter(|m| m.key == "model").collect();
    if models.len() > 1 {
        let err = result.expect_err("inspect accepted duplicate top-level model keys");
        assert_eq!(err.status(), 400);
        assert_eq!(err.param(), Some("model"));
        return;
    }
    let model_name = match models.first() {
        None => None,
        Some(m) => match serde_json::from_slice::<String>(&body[m.span.clone()]) {
            Ok(name) => Some((name, m.span.clone())),
            Err(_) => {
                let err = result.expect_err("inspect accepted a non-string model");
                assert_eq!(err.status(), 400);
                assert_eq!(err.param(), Some("model"));
                return;
            }
        },
    };
    let info = match result {
        Ok(info) => info,
        Err(e) => panic!("inspect rejected a valid object: {e}"),
    };
    assert_eq!(
        info.model
            .as_ref()
            .map(|m| (m.name.clone(), m.span.clone())),
        model_name
    );
    let stream = members
        .iter()
        .rev()
        .find(|m| m.key == "stream")
        .is_some_and(|m| &body[m.span.clone()] == b"true");
    assert_eq!(info.stream, stream, "stream flag");
    assert_eq!(info.has_members, !members.is_empty());
    let limits: Vec<(&str, Option<u64>, Range<usize>)> = members
        .iter()
        .filter(|m| is_token_field(&m.key))
        .map(|m| {
            (
                m.key.as_str(),
                serde_json::from_slice::<u64>(&body[m.span.clone()]).ok(),
                m.span.clone(),
            )
        })
        .collect();
    let reported: Vec<(&str, Option<u64>, Range<usize>)> = info
        .token_limits
        .iter()
        .map(|f| (f.name, f.value, f.span.clone()))
        .collect();
    assert_eq!(reported, limits, "token limit fields");

    let multipliers: Vec<&str> = members
        .iter()
        .filter(|m| MULTIPLIER_FIELDS.contains(&m.key.as_str()))
        .map(|m| m.key.as_str())
        .collect();
    let reported: Vec<&str> = info.multipliers.iter().map(|m| m.name).collect();
    assert_eq!(reported, multipliers, "multiplier fields");
    assert!(info.choices >= 1);

    for insert_as in INSERT_AS {
        check_rewrite(body, &members, &info, new_name, cap, insert_as);
    }
}

/// The rewrite half of [`check_body`], for one dialect.
fn check_rewrite(
    body: &[u8],
    members: &[Member],
    info: &body::RequestBody,
    new_name: &str,
    cap: Option<u64>,
    insert_as: InsertAs,
) {
    let input = Bytes::copy_from_slice(body);
    let out = body::rewrite(
        input.clone(),
        info,
        &Rewrite {
            upstream_model: new_name,
            max_tokens: cap,
            insert_as,
        },
    );
    // Names are compared decoded: `"m\u0061"` already is `ma` (finding 4).
    let unchanged = info.model.as_ref().is_some_and(|m| m.name == new_name);
    if unchanged && cap.is_none() {
        assert_eq!(out, input, "an unchanged name must leave the body as it is");
    }

    let out_members = top_level_members(&out).unwrap_or_else(|| {
        panic!(
            "the rewritten body is not one JSON object: {:?}",
            String::from_utf8_lossy(&out)
        )
    });
    assert_eq!(
        untouched(&out, &out_members),
        untouched(body, members),
        "members other than model and token limits must be unchanged"
    );
    let out_models: Vec<&Member> = out_members.iter().filter(|m| m.key == "model").collect();
    assert_eq!(out_models.len(), 1, "exactly one model after the rewrite");
    let out_name: String = serde_json::from_slice(&out[out_models[0].span.clone()]).unwrap();
    assert_eq!(out_name, new_name);

    let before: Vec<(&str, &[u8])> = members
        .iter()
        .filter(|m| is_token_field(&m.key))
        .map(|m| (m.key.as_str(), &body[m.span.clone()]))
        .collect();
    let after: Vec<(&str, &[u8])> = out_members
        .iter()
        .filter(|m| is_token_field(&m.key))
        .map(|m| (m.key.as_str(), &out[m.span.clone()]))
        .collect();
    match cap {
        None => assert_eq!(
            after, before,
            "token limits must be unchanged without a cap"
        ),
        Some(cap) => {
            let cap_text = cap.to_string();
            let (inserted, read) = dialect_lengths(insert_as);
            let mut expected: Vec<(&str, &[u8])> = Vec::new();
            if !before.iter().any(|(key, _)| read.contains(key)) {
                expected.push((inserted, cap_text.as_bytes()));
            }
            expected.extend(before.iter().map(|&(key, raw)| {
                match serde_json::from_slice::<u64>(raw) {
                    Ok(v) if v <= cap => (key, raw),
                    _ => (key, cap_text.as_bytes()),
                }
            }));
            assert_eq!(
                after, expected,
                "token limits must be capped at {cap} ({insert_as:?})"
            );
        }
    }

    // The rewritten body is itself a valid request naming the new model.
    let again = body::inspect(&out).expect("the rewritten body must be accepted again");
    assert_eq!(
        again.model.as_ref().map(|m| m.name.as_str()),
        Some(new_name)
    );
    assert_eq!(again.stream, info.stream);
    assert_eq!(again.multipliers, info.multipliers);
    if let Some(cap) = cap {
        let requested = again.requested_max_tokens();
        assert!(
            requested.is_some_and(|r| r <= cap),
            "requested {requested:?} above the cap {cap}"
        );
    }
}

// ---------------------------------------------------------------------------
// The per-key token ceiling, against a model of llama-server b11434

/// A number as llama-server reads it into an `int32_t` (nlohmann's `get`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LlamaInt {
    /// After the conversion: integers wrap, floats truncate, `true` is 1.
    Value(i64),
    /// Not a number: "type must be number", the request fails.
    TypeError,
    /// A float outside `int32_t`: the conversion is undefined.
    Undefined,
}

/// Whether nlohmann parses `raw` (a JSON number) as an integer.
fn nlohmann_integer(raw: &str) -> bool {
    let digits = raw.strip_prefix('-').unwrap_or(raw);
    !digits.is_empty()
        && digits.bytes().all(|b| b.is_ascii_digit())
        && if raw.starts_with('-') {
            raw.parse::<i64>().is_ok()
        } else {
            raw.parse::<u64>().is_ok()
        }
}

fn llama_int(raw: &str) -> LlamaInt {
    match raw.as_bytes()[0] {
        b't' => LlamaInt::Value(1),
        b'f' => LlamaInt::Value(0),
        b'"' | b'[' | b'{' | b'n' => LlamaInt::TypeError,
        _ if nlohmann_integer(raw) => LlamaInt::Value(if raw.starts_with('-') {
            i64::from(raw.parse::<i64>().unwrap() as i32)
        } else {
            i64::from(raw.parse::<u64>().unwrap() as i32)
        }),
        _ => match raw.parse::<f64>() {
            Ok(f) if f > -2_147_483_649.0 && f < 2_147_483_648.0 => LlamaInt::Value(f as i64),
            _ => LlamaInt::Undefined,
        },
    }
}

/// The raw value of the last top-level `key` (nlohmann keeps the last), if
/// present and not null (llama-server reads null as absent).
fn last_value<'a>(body: &'a [u8], members: &[Member], key: &str) -> Option<&'a str> {
    let m = members.iter().rev().find(|m| m.key == key)?;
    let raw = std::str::from_utf8(&body[m.span.clone()]).unwrap();
    (raw != "null").then_some(raw)
}

/// What llama-server b11434 would generate for `body` on a route of
/// `insert_as`'s dialect: `None` when it refuses the request, otherwise
/// (generations, tokens per generation or `None` for unlimited). Refusals
/// are only modelled where certain (type errors, hard limits).
fn llama_generation(body: &[u8], insert_as: InsertAs) -> Option<(u64, Option<u64>)> {
    let members = top_level_members(body).expect("a JSON object");
    let value = |key: &str| last_value(body, &members, key);
    let read = |raw: &str, what: &str| match llama_int(raw) {
        LlamaInt::Value(v) => Some(v),
        LlamaInt::TypeError => None,
        LlamaInt::Undefined => panic!(
            "{what} {raw} reaches llama-server, which may read it as any number: {:?}",
            String::from_utf8_lossy(body)
        ),
    };
    let length_raw = match insert_as {
        // Anthropic: the converter keeps max_tokens, 4096 when the key is absent.
        InsertAs::AnthropicMaxTokens => {
            if !members.iter().any(|m| m.key == "max_tokens") {
                return Some((1, Some(4096)));
            }
            value("max_tokens")
        }
        _ => {
            // Responses: max_output_tokens (even null) replaces max_tokens.
            let max_tokens = if insert_as == InsertAs::MaxOutputTokens
                && members.iter().any(|m| m.key == "max_output_tokens")
            {
                value("max_output_tokens")
            } else {
                value("max_tokens")
            };
            value("n_predict")
                .or_else(|| value("max_completion_tokens"))
                .or(max_tokens)
        }
    };
    let tokens = match length_raw {
        None => None, // the server default: unlimited
        Some(raw) => match read(raw, "a token limit")? {
            -1 => None,
            v if v < -1 => return None, // hard limit
            v => Some((v as u64).max(1)),
        },
    };
    if insert_as == InsertAs::AnthropicMaxTokens {
        return Some((1, tokens));
    }
    let per_prompt = match value("n_cmpl").or_else(|| value("n")) {
        None => 1,
        Some(raw) => match read(raw, "a generation count")? {
            v if v < 1 => return None, // hard limit
            v => v as u64,
        },
    };
    // Chat-style routes replace `prompt`; /v1/completions splits an array
    // without integers into prompts. Counted on both (the larger).
    let prompts = match value("prompt") {
        Some(raw) if raw.starts_with('[') && insert_as == InsertAs::MaxTokens => {
            let items: Vec<&RawValue> = serde_json::from_str(raw).unwrap();
            if items.iter().any(|i| nlohmann_integer(i.get())) {
                1
            } else {
                (items.len() as u64).max(1)
            }
        }
        _ => 1,
    };
    Some((prompts.saturating_mul(per_prompt), tokens))
}

/// Checks the per-key token ceiling end to end: `limits::max_tokens_to_send`
/// then `body::rewrite` for a route of `insert_as`'s dialect. Either the
/// request is refused with 400 naming a parameter, or in the rewritten body
/// - every generation-length field is a whole number, and times the
///   request's generations (prompts × the largest of `n`, `n_cmpl`,
///   `best_of`, read as llama-server reads them) within the ceiling;
/// - what llama-server would generate (its reading of the length, the
///   dialect's default when absent, its `n_cmpl`/`n` and prompt split) is
///   within the ceiling;
/// - in `reject` mode, every length the client stated as a whole number is
///   as sent.
pub fn check_token_ceiling(body: &[u8], ceiling: u64, reject: bool, insert_as: InsertAs) {
    let Ok(info) = body::inspect(body) else {
        return; // check_body covers what inspect refuses
    };
    let key = KeyLimits {
        max_tokens: Some(ceiling),
        over_max_tokens: if reject {
            OverMaxTokens::Reject
        } else {
            OverMaxTokens::Clamp
        },
        ..KeyLimits::default()
    };
    let cap = match limits::max_tokens_to_send(&key, &info) {
        Ok(cap) => cap.expect("a key with a ceiling always gets a cap"),
        Err(e) => {
            assert_eq!(e.status(), 400, "{e:?}");
            let param = e.param().expect("a refusal names the parameter");
            assert!(
                TOKEN_FIELDS.contains(&param) || MULTIPLIER_FIELDS.contains(&param),
                "{e:?}"
            );
            if !reject {
                assert!(MULTIPLIER_FIELDS.contains(&param), "clamp refused {e:?}");
            }
            return;
        }
    };
    assert!(
        cap >= 1 && cap <= ceiling && cap <= i32::MAX as u64,
        "cap {cap}"
    );
    let out = body::rewrite(
        Bytes::copy_from_slice(body),
        &info,
        &Rewrite {
            upstream_model: "m",
            max_tokens: Some(cap),
            insert_as,
        },
    );
    let text = String::from_utf8_lossy(&out);
    let members = top_level_members(&out).expect("the rewrite is one JSON object");

    // Every length field times the generations, best_of included.
    let mut prompts = 1u64;
    let mut per_prompt = 1u64;
    for m in &members {
        let raw = std::str::from_utf8(&out[m.span.clone()]).unwrap();
        match m.key.as_str() {
            "n" | "n_cmpl" | "best_of" if raw != "null" => match llama_int(raw) {
                LlamaInt::Value(v) => per_prompt = per_prompt.max(v.max(1) as u64),
                LlamaInt::TypeError => {}
                LlamaInt::Undefined => panic!("{} {raw} was let through: {text:?}", m.key),
            },
            "prompt" if raw.starts_with('[') => {
                let items: Vec<&RawValue> = serde_json::from_str(raw).unwrap();
                if !items.iter().any(|i| nlohmann_integer(i.get())) {
                    prompts = prompts.max(items.len() as u64);
                }
            }
            _ => {}
        }
    }
    let generations = prompts.saturating_mul(per_prompt);
    for m in members.iter().filter(|m| is_token_field(&m.key)) {
        let raw = &out[m.span.clone()];
        let v: u64 = serde_json::from_slice(raw).unwrap_or_else(|_| {
            panic!(
                "{} is {:?} after the rewrite: {text:?}",
                m.key,
                String::from_utf8_lossy(raw)
            )
        });
        assert!(
            u128::from(v) * u128::from(generations) <= u128::from(ceiling),
            "{} = {v} × {generations} generations is above the ceiling {ceiling}: {text:?}",
            m.key
        );
    }

    // What llama-server would do with it.
    if let Some((generations, tokens)) = llama_generation(&out, insert_as) {
        let tokens = tokens.unwrap_or_else(|| {
            panic!("llama-server would generate without a limit ({insert_as:?}): {text:?}")
        });
        assert!(
            u128::from(tokens) * u128::from(generations) <= u128::from(ceiling),
            "llama-server would generate {generations} × {tokens} tokens, above {ceiling} ({insert_as:?}): {text:?}"
        );
    }

    if reject {
        let stated = |b: &[u8], ms: &[Member]| -> Vec<(String, Vec<u8>)> {
            ms.iter()
                .filter(|m| is_token_field(&m.key))
                .map(|m| (m.key.clone(), b[m.span.clone()].to_vec()))
                .collect()
        };
        let before = stated(body, &top_level_members(body).unwrap());
        let after = stated(&out, &members);
        let after = &after[after.len() - before.len()..];
        for ((key, raw), (_, now)) in before.iter().zip(after) {
            if serde_json::from_slice::<u64>(raw).is_ok_and(|v| v <= i32::MAX as u64) {
                assert_eq!(
                    raw,
                    now,
                    "reject mode changed a stated {key} (ceiling {ceiling}, input {:?}): {text:?}",
                    String::from_utf8_lossy(body)
                );
            }
        }
    }
}

/// Names used by the fuzz target's rewrites: plain, escaped, non-ASCII, empty.
pub const REWRITE_NAMES: [&str; 5] = [
    "qwen3-30b-a3b-instruct",
    "/models/q.gguf",
    "ñ\"q\\\u{0}\u{1f999}",
    "",
    "a\u{2028}b\n",
];

/// Runs [`check_body`] for several rewrites of one body: to the body's own
/// model name (the no-op case, then with a cap), to one of [`REWRITE_NAMES`]
/// with one of several caps (both picked from the input's bytes), and to a
/// plain name without a cap.
pub fn check_body_variants(body: &[u8]) {
    let own = body::inspect(body)
        .ok()
        .and_then(|i| i.model)
        .map(|m| m.name);
    if let Some(own) = &own {
        check_body(body, own, None);
        check_body(body, own, Some(1));
    }
    // A cheap, input-dependent pick so every name and cap gets used.
    let pick = body.iter().fold(body.len(), |h, &b| {
        h.wrapping_mul(31).wrapping_add(b as usize)
    });
    let name = REWRITE_NAMES[pick % REWRITE_NAMES.len()];
    let caps = [None, Some(0), Some(100), Some(u64::MAX)];
    check_body(body, name, caps[(pick / 7) % caps.len()]);
    check_body(body, REWRITE_NAMES[0], None);
}

// ---------------------------------------------------------------------------
// SSE

/// `sse.rs`'s `MAX_CARRY`: a partial line longer than this is dropped, so the
/// split-invariance below only holds for lines up to this length.
pub const MAX_CARRY: usize = 1 << 20;

/// Whether no line of `input` (bytes between two `\n`) is longer than [`MAX_CARRY`].
pub fn lines_fit(input: &[u8]) -> bool {
    input.split(|&b| b == b'\n').all(|l| l.len() <= MAX_CARRY)
}

/// Feeds `input` to a new scanner in the pieces given by `cuts` (offsets, in
/// any order, clamped to the input; repeated offsets feed empty chunks).
pub fn scan_in_pieces(input: &[u8], cuts: &[usize]) -> (SseScanner, u64) {
    let mut cuts: Vec<usize> = cuts.iter().map(|&c| c.min(input.len())).collect();
    cuts.sort_unstable();
    let mut scanner = SseScanner::new();
    let mut total = 0;
    let mut pos = 0;
    for cut in cuts {
        total += scanner.feed(&input[pos..cut]);
        pos = cut;
    }
    total += scanner.feed(&input[pos..]);
    (scanner, total)
}

/// Checks that the SSE scanner never panics, that its counts are consistent,
/// and that feeding `input` in the pieces given by `cuts` gives the same
/// stats and the same total of `feed` results as feeding it whole. Also runs
/// the non-streaming `JsonCollector` over the same pieces, and holds the
/// scanner's serde-free fast path to the full parse on every `data:` line.
pub fn check_sse(input: &[u8], cuts: &[usize]) {
    for line in input.split(|&b| b == b'\n') {
        if let Some(payload) = line.strip_prefix(b"data:") {
            let payload = payload.strip_prefix(b" ").unwrap_or(payload);
            let payload = payload.strip_suffix(b"\r").unwrap_or(payload);
            assert!(
                sse::fast_path_agrees(payload),
                "SSE fast path disagrees with the full parse on {:?}",
                String::from_utf8_lossy(payload)
            );
        }
    }
    let mut whole = SseScanner::new();
    let total = whole.feed(input);
    let stats = &whole.stats;
    assert_eq!(total, stats.content_events, "feed() counts content events");
    assert!(stats.content_events <= stats.events);
    // Sums of upstream numbers saturate instead of overflowing (finding 3).
    let tokens = stats.tokens();
    assert!(tokens.cached <= tokens.prompt || stats.usage.is_some());
    if let Some(ratio) = stats.cache_hit_ratio() {
        assert!((0.0..=1.0).contains(&ratio), "cache hit ratio {ratio}");
    }
    if !lines_fit(input) {
        return;
    }
    assert!(stats.malformed <= stats.events);
    let (pieces, pieces_total) = scan_in_pieces(input, cuts);
    assert_eq!(pieces.stats, whole.stats, "stats depend on the chunking");
    assert_eq!(pieces_total, total, "feed() totals depend on the chunking");

    let mut collector = JsonCollector::default();
    let mut sorted: Vec<usize> = cuts.iter().map(|&c| c.min(input.len())).collect();
    sorted.sort_unstable();
    let mut pos = 0;
    for cut in sorted {
        collector.feed(&input[pos..cut]);
        pos = cut;
    }
    collector.feed(&input[pos..]);
    let json = collector.finish();
    assert_eq!(json.content_events, 0);
    let tokens = json.tokens();
    assert!(tokens.cached <= tokens.prompt || json.usage.is_some());
    if let Some(ratio) = json.cache_hit_ratio() {
        assert!((0.0..=1.0).contains(&ratio), "cache hit ratio {ratio}");
    }
}

/// Cut points for one input, chosen without extra fuzzer bytes: around every
/// `\r` and `\n`, and at pseudo-random offsets derived from the input.
pub fn tricky_cuts(input: &[u8]) -> Vec<usize> {
    let mut cuts = Vec::new();
    let mut h = input.len() as u64 ^ 0x9e37_79b9_7f4a_7c15;
    for (i, &b) in input.iter().enumerate() {
        h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
        if b == b'\r' || b == b'\n' {
            cuts.push(i);
            cuts.push(i + 1);
        } else if h.is_multiple_of(11) {
            cuts.push(i);
        }
    }
    cuts
}

/// The split strategies the fuzz target tries on every input.
pub fn check_sse_variants(input: &[u8]) {
    check_sse(input, &[]);
    check_sse(input, &tricky_cuts(input));
    if input.len() <= 1024 {
        let every: Vec<usize> = (1..input.len()).collect();
        check_sse(input, &every);
    }
    let sevens: Vec<usize> = (0..input.len()).step_by(7).collect();
    check_sse(input, &sevens);
}

// ---------------------------------------------------------------------------
// Configuration

/// Environment variables written into a YAML text as comment lines
/// `#env NAME=VALUE`, so a seed file stays a valid config.
pub fn env_from_comments(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|l| l.strip_prefix("#env "))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.to_string()))
        .collect()
}

/// Whether validating `url` as `upstream.url` could reach a DNS lookup (the
/// host is neither absent nor an IP literal). Conservative: mirrors the
/// checks `config::validate_upstream` makes before it resolves.
pub fn needs_dns(url: &str) -> bool {
    let Some(rest) = url.trim().strip_prefix("http://") else {
        return false;
    };
    let authority = rest.split('/').next().unwrap_or("");
    let Ok(auth) = authority.parse::<http::uri::Authority>() else {
        return false;
    };
    let host = auth.host().trim_start_matches('[').trim_end_matches(']');
    !host.is_empty() && host.parse::<IpAddr>().is_err()
}

/// Checks that parsing, the environment and validation never panic, and that
/// every error names a non-empty path. Upstream URLs that would need DNS are
/// replaced by an IP literal first (validation resolves host names), and TLS
/// file paths by a missing file or /dev/null (validation reads them).
pub fn check_config(text: &str) {
    let vars = env_from_comments(text);
    let env = |name: &str| {
        vars.iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
            .filter(|v| !v.trim().is_empty())
    };
    let file = match config::parse_yaml(text) {
        Ok(file) => file,
        Err(e) => {
            // An empty top-level key included (finding 2).
            assert!(!e.path.is_empty(), "parse error without a path: {e:?}");
            return;
        }
    };
    let mut file = config::apply_env(file, &env);
    // No DNS lookups of generated names (slow, and not what is fuzzed).
    if file.upstream.url.as_deref().is_some_and(needs_dns) {
        file.upstream.url = Some("http://127.0.0.1:8080".into());
    }
    for server in &mut file.upstream.servers {
        if needs_dns(&server.url) {
            server.url = "http://127.0.0.1:8080".into();
        }
    }
    // Validation reads tls.cert and tls.key: keep generated paths away from
    // devices and FIFOs (/dev/zero would exhaust memory, a FIFO would block).
    if let Some(tls) = &mut file.tls {
        for path in [&mut tls.cert, &mut tls.key] {
            if path != "/dev/null" {
                *path = "/nonexistent/llm-edge-fuzz.pem".into();
            }
        }
    }
    match file.validate() {
        Ok(cfg) => {
            // What the gateway relies on after a successful validation.
            let default = cfg.catalogue.default_route();
            assert!(cfg.catalogue.resolve(Some(&default.name)).is_some());
            assert!(cfg.listen.parse::<std::net::SocketAddr>().is_ok());
            assert!(cfg.server.threads > 0);
            assert!(cfg.limits.max_body_bytes > 0);
        }
        Err(e) => assert!(!e.path.is_empty(), "validation error without a path: {e:?}"),
    }
}

// ---------------------------------------------------------------------------
// Routes and keys

/// `routes::classify` never panics, labels are bounded, and errors are
/// 400/404/405.
pub fn check_route(method: &str, path: &str) {
    match routes::classify(method, path) {
        Ok(route) => {
            assert!(routes::LABELS.contains(&route.label()));
            if route.has_model_body() {
                assert_eq!(method, "POST");
            }
            assert!(path.starts_with('/'));
            // One canonical spelling: whatever routes holds only bytes no server decodes.
            let p = path.split('?').next().unwrap_or("");
            assert!(p.bytes().all(routes::is_canonical_byte), "{path}");
        }
        Err(e) => assert!(
            matches!(e.status(), 400 | 404 | 405),
            "{method} {path}: {e:?}"
        ),
    }
}

/// Secrets of the key table used by [`check_auth`].
pub const SECRETS: [(&str, &str); 3] = [
    ("alice", "sk-alice"),
    ("bob", "sk-bob-\u{e9}"),
    ("carol", "Bearer sk-carol"),
];

pub fn key_table(extra_secret: Option<&str>, allow_anonymous: bool) -> KeyTable {
    let mut keys: Vec<ApiKey> = SECRETS
        .iter()
        .map(|(id, s)| ApiKey::new(id.to_string(), auth::digest(s), None))
        .collect();
    if let Some(s) = extra_secret {
        keys.push(ApiKey::new("extra".into(), auth::digest(s), None));
    }
    KeyTable::new(keys, allow_anonymous)
}

/// `KeyTable::authenticate` never panics on any header; a match means the
/// header carried that key's secret; errors never echo the token; and a
/// well-formed secret always authenticates as `Bearer <secret>`.
pub fn check_auth(header: &[u8]) {
    let secret = std::str::from_utf8(header)
        .ok()
        .filter(|s| !s.is_empty() && s.trim_ascii() == *s);
    for anonymous in [false, true] {
        let table = key_table(secret, anonymous);
        match table.authenticate(Some(header)) {
            Ok(key) if &*key.id == "anonymous" => {
                assert!(anonymous);
            }
            Ok(key) => {
                let secret_of = SECRETS
                    .iter()
                    .find(|(id, _)| *id == &*key.id)
                    .map(|(_, s)| *s)
                    .or(secret)
                    .unwrap();
                let token = header.trim_ascii()[7..].trim_ascii();
                assert_eq!(token, secret_of.as_bytes());
            }
            Err(e) => {
                // One of two fixed messages: nothing of the header is echoed.
                let fixed = key_table(None, false);
                let missing = fixed.authenticate(None).unwrap_err();
                let invalid = fixed.authenticate(Some(b"Bearer \x01")).unwrap_err();
                assert!(e == missing || e == invalid, "{e:?}");
            }
        }
        if let Some(s) = secret {
            for prefix in ["Bearer ", "bearer ", "BEARER  ", " \tBearer \t"] {
                let presented = format!("{prefix}{s}\t ");
                let key = table
                    .authenticate(Some(presented.as_bytes()))
                    .expect("a configured secret must authenticate");
                assert!(&*key.id == "extra" || SECRETS.iter().any(|(_, x)| *x == s));
            }
        }
    }
}
