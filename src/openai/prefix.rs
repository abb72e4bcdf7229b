//! The affinity key of a model request: what lets the gateway send the turns
//! of one conversation to the llama-server that already holds its prompt in
//! its KV cache (see `upstream/affinity.rs` for the choice).
//!
//! Two kinds, derived from the request body without keeping any of its text:
//!
//! - an explicit key, when the client names its session: `prompt_cache_key`
//!   (OpenAI), the configured header (e.g. `x-session-id`),
//!   `metadata.user_id` (Anthropic), or `user` (OpenAI), in that order;
//! - chained hashes of the prompt's prefix: one block for what comes before
//!   the conversation (Anthropic's `system`, the Responses API's
//!   `instructions`, `tools`), then one block per message (`messages`, or the
//!   Responses `input` items), or per 1 KiB of a `/v1/completions` `prompt`
//!   string. Block `i`'s hash is `hash(hash_{i-1}, block_i)`, so two requests
//!   that share their first `k` blocks share their first `k` hashes, and a
//!   hash names the whole prefix up to its block.
//!
//! Each block's canonical form is its JSON text without the whitespace
//! between tokens (a client that pretty-prints one turn and not the next
//! still matches); keys are hashed in the order sent. The hash is `ahash`
//! with fixed seeds: fast and well distributed, not cryptographic (a
//! collision only misroutes a request, which the closed loop corrects).
//! Every hash is seeded with the model's name, so two models on one server
//! never share entries.
//!
//! Pure logic over the body bytes. Must not import `gateway`, `upstream` or
//! Pingora.

use std::hash::{BuildHasher, Hasher};

use serde::de::{Deserializer, IgnoredAny, MapAccess, Visitor};
use serde_json::value::RawValue;

/// Bytes of prompt text per token, for predicting reuse from block sizes
/// (English text is about 4 bytes per token; the mock counts exactly that).
pub const BYTES_PER_TOKEN: u64 = 4;

/// Bytes per block of a plain-text `prompt` (`/v1/completions`).
pub const TEXT_BLOCK: usize = 1024;

/// Every block up to this many is kept; past it, 32 per doubling of the
/// count (block `i` is kept when it is a multiple of `2^(log2 i - 5)`), and
/// always the last one. The rule depends on `i` alone, so two turns of a
/// conversation keep the same blocks of their common prefix, and a body of
/// many tiny messages costs a server's index a few hundred lookups, not one
/// per message.
pub const DENSE_BLOCKS: usize = 64;

/// Whether block `i` of a prefix is kept (see [`DENSE_BLOCKS`]).
fn kept(i: usize) -> bool {
    i < DENSE_BLOCKS || i.is_multiple_of(1 << (i.ilog2() - 5))
}

/// One prefix block: its chained hash and the estimated prompt tokens of
/// the whole prefix up to and including it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Block {
    pub hash: u64,
    pub tokens: u64,
}

/// A request's affinity key.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Affinity {
    /// The hash of the client's explicit session key, if it sent one.
    pub explicit: Option<u64>,
    /// The prefix blocks, shortest prefix first (empty: nothing to hash).
    pub blocks: Vec<Block>,
}

impl Affinity {
    /// Whether there is anything to route by.
    pub fn is_empty(&self) -> bool {
        self.explicit.is_none() && self.blocks.is_empty()
    }

    /// Estimated prompt tokens of the whole prefix.
    pub fn tokens(&self) -> u64 {
        self.blocks.last().map_or(0, |b| b.tokens)
    }
}

fn hasher() -> ahash::AHasher {
    ahash::RandomState::with_seeds(
        0x6c6c_6d2d_6564_6765,
        0x6166_6669_6e69_7479,
        0x7072_6566_6978_6573,
        0x9e37_79b9_7f4a_7c15,
    )
    .build_hasher()
}

/// Appends `json` to `out` without the whitespace between JSON tokens
/// (string contents are kept as they are); returns the bytes appended.
/// (Hashers are not streaming: two writes differ from one of their
/// concatenation, so the canonical text is gathered first.)
fn canonical_into(out: &mut Vec<u8>, json: &[u8]) -> u64 {
    let before = out.len();
    let mut i = 0;
    while i < json.len() {
        match json[i] {
            b'"' => {
                // A string, copied whole: its end is the next unescaped quote
                // (memchr finds quotes and backslashes fast in long text).
                let start = i;
                i += 1;
                while let Some(at) = memchr::memchr2(b'"', b'\\', &json[i..]) {
                    i += at;
                    if json[i] == b'\\' {
                        i += 2;
                    } else {
                        i += 1;
                        break;
                    }
                }
                let end = i.min(json.len());
                out.extend_from_slice(&json[start..end]);
                i = end;
            }
            b' ' | b'\n' | b'\r' | b'\t' => i += 1,
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    (out.len() - before) as u64
}

/// The top-level members that key or shape the prompt, as raw JSON.
#[derive(Default)]
struct Members<'a> {
    /// `messages`, element by element (not an array: the body gets no key).
    messages: Option<Vec<&'a RawValue>>,
    input: Option<&'a RawValue>,
    prompt: Option<&'a RawValue>,
    system: Option<&'a RawValue>,
    instructions: Option<&'a RawValue>,
    tools: Option<&'a RawValue>,
    prompt_cache_key: Option<&'a RawValue>,
    user: Option<&'a RawValue>,
    metadata: Option<&'a RawValue>,
}

struct MembersVisitor;

impl<'de> Visitor<'de> for MembersVisitor {
    type Value = Members<'de>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Members<'de>, A::Error> {
        let mut m = Members::default();
        while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            let slot = match key.as_ref() {
                "messages" => {
                    m.messages = Some(map.next_value::<Vec<&'de RawValue>>()?);
                    continue;
                }
                "input" => &mut m.input,
                "prompt" => &mut m.prompt,
                "system" => &mut m.system,
                "instructions" => &mut m.instructions,
                "tools" => &mut m.tools,
                "prompt_cache_key" => &mut m.prompt_cache_key,
                "user" => &mut m.user,
                "metadata" => &mut m.metadata,
                _ => {
                    map.next_value::<IgnoredAny>()?;
                    continue;
                }
            };
            // A repeated key: the last one, as serde_json and llama-server read it.
            *slot = Some(map.next_value::<&'de RawValue>()?);
        }
        Ok(m)
    }
}

/// A non-empty JSON string's text (escapes resolved).
fn string_of(raw: Option<&RawValue>) -> Option<String> {
    let s: String = serde_json::from_str(raw?.get()).ok()?;
    (!s.is_empty()).then_some(s)
}

/// The hash of an explicit session key, namespaced by model.
fn explicit_hash(model: &str, owner: &str, key: &str) -> u64 {
    let mut h = hasher();
    h.write(b"explicit\0");
    h.write(model.as_bytes());
    h.write_u8(0);
    h.write(owner.as_bytes());
    h.write_u8(0);
    h.write(key.as_bytes());
    h.finish()
}

/// Chains the blocks of a prefix.
struct Chain {
    prev: u64,
    /// Scratch for one block's canonical text.
    buf: Vec<u8>,
    bytes: u64,
    blocks: Vec<Block>,
}

impl Chain {
    fn new(model: &str) -> Chain {
        let mut h = hasher();
        h.write(b"prefix\0");
        h.write(model.as_bytes());
        Chain {
            prev: h.finish(),
            buf: Vec::new(),
            bytes: 0,
            blocks: Vec::new(),
        }
    }

    /// Adds one block made of JSON values (each canonicalised); `None`s are skipped.
    fn push_json(&mut self, tag: u8, parts: &[Option<&RawValue>]) {
        let mut buf = std::mem::take(&mut self.buf);
        buf.clear();
        buf.push(tag);
        let mut fed = 0;
        for part in parts.iter().flatten() {
            fed += canonical_into(&mut buf, part.get().as_bytes());
            buf.push(0);
        }
        let mut h = hasher();
        h.write_u64(self.prev);
        h.write(&buf);
        self.finish_block(h, fed);
        self.buf = buf;
    }

    fn push_text(&mut self, text: &[u8]) {
        let mut h = hasher();
        h.write_u64(self.prev);
        h.write_u8(b't');
        h.write(text);
        self.finish_block(h, text.len() as u64);
    }

    fn finish_block(&mut self, h: ahash::AHasher, fed: u64) {
        self.prev = h.finish();
        self.bytes += fed;
        self.blocks.push(Block {
            hash: self.prev,
            tokens: self.bytes / BYTES_PER_TOKEN,
        });
    }
}

/// Pushes one block per element of a JSON array, or one block for any
/// other value.
fn push_items(chain: &mut Chain, raw: &RawValue) {
    match serde_json::from_str::<Vec<&RawValue>>(raw.get()) {
        Ok(items) => {
            for item in items {
                chain.push_json(b'm', &[Some(item)]);
            }
        }
        Err(_) => chain.push_json(b'm', &[Some(raw)]),
    }
}

/// Derives the affinity key of a JSON request body for `model` (the
/// public name the request resolved to); `header_key` is the value of the
/// configured session header, if the request has one. A body that is not a
/// JSON object gives an empty key (the caller has checked it already).
/// A session key is the API key `owner`'s own: another key sending the same
/// session value (`"user": "1"`) neither matches nor corrects its entry.
/// Prompt prefixes are shared across keys (a common system prompt is one
/// cache).
pub fn derive(body: &[u8], model: &str, header_key: Option<&str>, owner: &str) -> Affinity {
    let Ok(text) = std::str::from_utf8(body) else {
        return Affinity::default();
    };
    let mut de = serde_json::Deserializer::from_str(text);
    let Ok(m) = de.deserialize_map(MembersVisitor) else {
        return Affinity::default();
    };
    let metadata_user = m.metadata.and_then(|raw| {
        #[derive(serde::Deserialize)]
        struct Metadata<'a> {
            #[serde(borrow)]
            user_id: Option<&'a RawValue>,
        }
        serde_json::from_str::<Metadata>(raw.get())
            .ok()
            .and_then(|md| string_of(md.user_id))
    });
    let explicit = string_of(m.prompt_cache_key)
        .or_else(|| header_key.filter(|k| !k.is_empty()).map(str::to_string))
        .or(metadata_user)
        .or_else(|| string_of(m.user))
        .map(|key| explicit_hash(model, owner, &key));

    let mut chain = Chain::new(model);
    if m.system.is_some() || m.instructions.is_some() || m.tools.is_some() {
        chain.push_json(b's', &[m.system, m.instructions, m.tools]);
    }
    if let Some(messages) = m.messages {
        for item in messages {
            chain.push_json(b'm', &[Some(item)]);
        }
    } else if let Some(input) = m.input {
        match serde_json::from_str::<String>(input.get()) {
            Ok(s) => chain.push_text(s.as_bytes()),
            Err(_) => push_items(&mut chain, input),
        }
    } else if let Some(prompt) = m.prompt {
        match serde_json::from_str::<String>(prompt.get()) {
            Ok(s) => {
                for piece in s.as_bytes().chunks(TEXT_BLOCK) {
                    chain.push_text(piece);
                }
            }
            Err(_) => chain.push_json(b'p', &[Some(prompt)]),
        }
    }
    let last = chain.blocks.len().saturating_sub(1);
    let mut i = 0;
    chain.blocks.retain(|_| {
        i += 1;
        kept(i - 1) || i - 1 == last
    });
    Affinity {
        explicit,
        blocks: chain.blocks,
    }
}

#[cfg(test)]
mod tests;
