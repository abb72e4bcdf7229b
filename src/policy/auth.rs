//! API keys: stored as SHA-256 digests, found by digest, confirmed in constant time.
//!
//! The config never holds a usable secret: each key is the hex SHA-256 of the
//! bearer token. A presented token is hashed once and its digest is looked up
//! in a `HashMap` keyed by the stored digests, then confirmed with `subtle`'s
//! constant-time comparison, so a lookup costs about the same with 1 or
//! 10,000 keys.
//!
//! Why the lookup is safe although a hash map is not constant-time: where it
//! probes depends on the SipHash of the *presented* digest under a key that
//! std's `RandomState` draws at random per process, i.e. on the caller's own
//! token and a value the caller never sees; the stored digests only decide,
//! through that same unknown key, which slots are occupied. Only when a probe
//! meets a stored entry with the same 7-bit tag are the two digests compared
//! with `==`, which may stop at the first differing byte; at most that could
//! hint how many leading bytes of the caller's own SHA-256 output match some
//! stored digest. A digest is not a usable secret:
//! the config holds nothing else, and the stored digests are SHA-256 of keys
//! with 256 bits of entropy, so even a whole one would not help anyone find a
//! token that hashes to it. The key's `id` is what logs and metrics show; the
//! secret never leaves this module.

use std::collections::HashMap;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::errors::ApiError;

/// A configured key: its public id, the digest of the secret, and the public
/// model names it may use (`None`: every model).
#[derive(Clone)]
pub struct ApiKey {
    pub id: std::sync::Arc<str>,
    digest: [u8; 32],
    allowed_models: Option<Vec<String>>,
}

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiKey")
            .field("id", &self.id)
            .field("allowed_models", &self.allowed_models)
            .finish_non_exhaustive()
    }
}

impl ApiKey {
    pub fn new(id: String, digest: [u8; 32], allowed_models: Option<Vec<String>>) -> ApiKey {
        ApiKey {
            id: id.into(),
            digest,
            allowed_models,
        }
    }

    /// The identity used when the operator explicitly allows unauthenticated access.
    pub fn anonymous() -> ApiKey {
        ApiKey::new("anonymous".into(), [0; 32], None)
    }

    /// The public models it may use; `None`: all.
    pub fn allowed_models(&self) -> Option<&[String]> {
        self.allowed_models.as_deref()
    }

    pub fn allows(&self, public_model: &str) -> bool {
        match &self.allowed_models {
            None => true,
            Some(list) => list.iter().any(|m| m == public_model),
        }
    }
}

/// SHA-256 of a secret, as stored in the config.
pub fn digest(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

pub fn digest_hex(secret: &str) -> String {
    hex::encode(digest(secret))
}

/// Keys printed in llm-edge's own documentation and example config: anyone
/// can read them, so a configured key with one of these digests is refused.
pub const EXAMPLE_KEYS: &[&str] = &[
    "sk-example-change-me",
    "sk-change-me",
    "sk-your-secret",
    "change-me",
];

/// The documented example key whose digest this is, if any.
pub fn example_key_for(digest: &[u8; 32]) -> Option<&'static str> {
    EXAMPLE_KEYS
        .iter()
        .copied()
        .find(|k| self::digest(k) == *digest)
}

/// Why a secret looks like a placeholder rather than a real key, if it does.
/// Keys from `gen-key` are 72 characters of which 64 are random hex.
pub fn placeholder_reason(secret: &str) -> Option<&'static str> {
    const MIN_LEN: usize = 24;
    let lower = secret.to_ascii_lowercase();
    if ["change-me", "changeme", "example", "placeholder", "secret"]
        .iter()
        .any(|w| lower.contains(w))
    {
        Some("it contains a placeholder word")
    } else if secret.len() < MIN_LEN {
        Some("it is shorter than 24 characters")
    } else {
        None
    }
}

/// A new random key: `sk-edge-` and 256 bits from the OS, hex-encoded.
pub fn generate_key() -> Result<String, getrandom::Error> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes)?;
    Ok(format!("sk-edge-{}", hex::encode(bytes)))
}

#[derive(Clone)]
pub struct KeyTable {
    keys: Vec<ApiKey>,
    /// Index into `keys` by digest. Should two keys share a digest (validation
    /// rejects that), the later one wins, as it did in the linear scan this
    /// replaces.
    by_digest: HashMap<[u8; 32], usize>,
    anonymous: Option<ApiKey>,
}

impl std::fmt::Debug for KeyTable {
    // Not derived: `by_digest` would print the digests.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyTable")
            .field("keys", &self.keys)
            .field("anonymous", &self.anonymous)
            .finish_non_exhaustive()
    }
}

impl KeyTable {
    pub fn new(keys: Vec<ApiKey>, allow_anonymous: bool) -> KeyTable {
        let by_digest = keys
            .iter()
            .enumerate()
            .map(|(i, k)| (k.digest, i))
            .collect();
        KeyTable {
            keys,
            by_digest,
            anonymous: allow_anonymous.then(ApiKey::anonymous),
        }
    }

    pub fn allows_anonymous(&self) -> bool {
        self.anonymous.is_some()
    }

    /// Configured key ids (the only values the `key` metric label takes besides
    /// `anonymous` and `invalid`).
    pub fn ids(&self) -> impl Iterator<Item = &str> {
        self.keys.iter().map(|k| &*k.id)
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Authenticates the value of an `Authorization` header.
    pub fn authenticate(&self, authorization: Option<&[u8]>) -> Result<&ApiKey, ApiError> {
        self.authenticate_token(authorization.and_then(bearer_token))
    }

    /// Authenticates a presented key (see [`presented_token`]).
    pub fn authenticate_token(&self, token: Option<&[u8]>) -> Result<&ApiKey, ApiError> {
        let Some(token) = token else {
            if let Some(anon) = &self.anonymous {
                return Ok(anon);
            }
            return Err(ApiError::MissingKey(
                "missing API key: send it as 'Authorization: Bearer <key>' (OpenAI clients do this with api_key=...) or as 'x-api-key: <key>' (Anthropic clients)"
                    .into(),
            ));
        };
        let presented: [u8; 32] = Sha256::digest(token).into();
        // The map finds the candidate; the constant-time comparison confirms
        // it (see the module comment for why the lookup leaks nothing).
        let found = self
            .by_digest
            .get(&presented)
            .map(|&i| &self.keys[i])
            .filter(|key| bool::from(key.digest.ct_eq(&presented)));
        match found {
            Some(key) => Ok(key),
            None if self.keys.is_empty() => Err(ApiError::InvalidKey(
                "invalid API key: this gateway has no API keys configured yet (set API_KEYS or add keys to the config)"
                    .into(),
            )),
            None => Err(ApiError::InvalidKey(
                "invalid API key: check the key you were given for this gateway".into(),
            )),
        }
    }
}

/// The key a request presents: `Authorization: Bearer <key>` (OpenAI
/// clients) or `x-api-key: <key>` (Anthropic clients), given all values of
/// each header. More than one of a header, or both headers carrying
/// different keys, is ambiguous (a proxy on the way may read another one
/// than we do) and refused with 400.
pub fn presented_token<'a>(
    authorization: impl IntoIterator<Item = &'a [u8]>,
    x_api_key: impl IntoIterator<Item = &'a [u8]>,
) -> Result<Option<&'a [u8]>, ApiError> {
    let bearer = only_one(authorization)?.and_then(bearer_token);
    let x_key = only_one(x_api_key)?
        .map(<[u8]>::trim_ascii)
        .filter(|v| !v.is_empty());
    match (bearer, x_key) {
        (Some(a), Some(b)) if a != b => Err(ApiError::InvalidRequest(
            "the Authorization and x-api-key headers carry different keys; send one".into(),
        )),
        (a, b) => Ok(a.or(b)),
    }
}

/// The single value of a header, if any (no allocation: this runs per request).
fn only_one<'a>(values: impl IntoIterator<Item = &'a [u8]>) -> Result<Option<&'a [u8]>, ApiError> {
    let mut values = values.into_iter();
    let first = values.next();
    if values.next().is_some() {
        return Err(ApiError::InvalidRequest(
            "the request carries more than one Authorization or x-api-key header; send the key exactly once".into(),
        ));
    }
    Ok(first)
}

/// The token of `Bearer <token>` (scheme case-insensitive), if well-formed.
pub fn bearer_token(header: &[u8]) -> Option<&[u8]> {
    let header = header.trim_ascii();
    if header.len() < 7 || !header[..7].eq_ignore_ascii_case(b"bearer ") {
        return None;
    }
    let token = header[7..].trim_ascii();
    (!token.is_empty()).then_some(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_credential_only() {
        let presented_token = |a: &[&'static [u8]], x: &[&'static [u8]]| {
            super::presented_token(a.iter().copied(), x.iter().copied())
        };
        let (a, b): (&[u8], &[u8]) = (b"Bearer sk-a", b"Bearer sk-b");
        assert_eq!(presented_token(&[a], &[]).unwrap(), Some(&b"sk-a"[..]));
        assert_eq!(
            presented_token(&[], &[b"sk-x"]).unwrap(),
            Some(&b"sk-x"[..])
        );
        assert_eq!(
            presented_token(&[a], &[b"sk-a"]).unwrap(),
            Some(&b"sk-a"[..])
        );
        assert_eq!(presented_token(&[], &[]).unwrap(), None);
        for (auth, x) in [
            (&[a, b][..], &[][..]),
            (&[a, a], &[]),
            (&[], &[&b"k"[..], b"k"]),
            (&[a], &[&b"sk-b"[..]]),
        ] {
            assert_eq!(presented_token(auth, x).unwrap_err().status(), 400);
        }
    }

    fn table() -> KeyTable {
        KeyTable::new(
            vec![
                ApiKey::new("alice".into(), digest("sk-alice"), None),
                ApiKey::new("bob".into(), digest("sk-bob"), Some(vec!["small".into()])),
            ],
            false,
        )
    }

    #[test]
    fn digest_hex_is_sha256() {
        assert_eq!(
            digest_hex("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn generated_keys_are_random_and_long() {
        let (a, b) = (generate_key().unwrap(), generate_key().unwrap());
        assert_ne!(a, b);
        assert!(a.starts_with("sk-edge-") && a.len() == 8 + 64);
    }

    #[test]
    fn finds_the_right_key() {
        let t = table();
        assert_eq!(
            t.authenticate(Some(b"Bearer sk-alice"))
                .unwrap()
                .id
                .as_ref(),
            "alice"
        );
        assert_eq!(
            t.authenticate(Some(b"bearer  sk-bob "))
                .unwrap()
                .id
                .as_ref(),
            "bob"
        );
    }

    #[test]
    fn missing_and_wrong_keys() {
        let t = table();
        assert_eq!(t.authenticate(None).unwrap_err().code(), "missing_api_key");
        assert_eq!(
            t.authenticate(Some(b"Basic abc")).unwrap_err().code(),
            "missing_api_key"
        );
        assert_eq!(
            t.authenticate(Some(b"Bearer ")).unwrap_err().code(),
            "missing_api_key"
        );
        let wrong = t.authenticate(Some(b"Bearer sk-mallory")).unwrap_err();
        assert_eq!(wrong.code(), "invalid_api_key");
        assert_eq!(wrong.status(), 401);
        assert!(!wrong.to_string().contains("sk-mallory"));
        // the digest itself is not a key
        let hex = digest_hex("sk-alice");
        assert!(t
            .authenticate(Some(format!("Bearer {hex}").as_bytes()))
            .is_err());
    }

    #[test]
    fn model_allow_lists() {
        let t = table();
        let bob = t.authenticate(Some(b"Bearer sk-bob")).unwrap();
        assert!(bob.allows("small"));
        assert!(!bob.allows("large"));
        let alice = t.authenticate(Some(b"Bearer sk-alice")).unwrap();
        assert!(alice.allows("large"));
    }

    #[test]
    fn anonymous_only_when_allowed() {
        let open = KeyTable::new(vec![], true);
        assert_eq!(open.authenticate(None).unwrap().id.as_ref(), "anonymous");
        let closed = KeyTable::new(vec![], false);
        let err = closed.authenticate(Some(b"Bearer x")).unwrap_err();
        assert!(err.to_string().contains("no API keys configured"));
    }

    #[test]
    fn debug_never_shows_the_digest() {
        let key = ApiKey::new("alice".into(), digest("sk-alice"), None);
        let shown = format!("{key:?}");
        assert!(!shown.contains(&digest_hex("sk-alice")));
        assert!(shown.contains("alice"));
        let shown = format!("{:?}", table());
        assert!(shown.contains("alice") && shown.contains("bob"));
        for secret in ["sk-alice", "sk-bob"] {
            let d = digest(secret);
            assert!(!shown.contains(&digest_hex(secret)));
            assert!(!shown.contains(&format!("{}, {}, {}", d[0], d[1], d[2])));
        }
    }

    #[test]
    fn the_last_of_two_keys_with_one_digest_wins() {
        // Validation rejects this; the table still behaves like the old scan.
        let t = KeyTable::new(
            vec![
                ApiKey::new("first".into(), digest("sk-same"), None),
                ApiKey::new("other".into(), digest("sk-other"), None),
                ApiKey::new("second".into(), digest("sk-same"), None),
            ],
            false,
        );
        assert_eq!(
            t.authenticate(Some(b"Bearer sk-same")).unwrap().id.as_ref(),
            "second"
        );
        assert_eq!(
            t.authenticate(Some(b"Bearer sk-other"))
                .unwrap()
                .id
                .as_ref(),
            "other"
        );
        assert_eq!(t.ids().collect::<Vec<_>>(), ["first", "other", "second"]);
    }

    #[test]
    fn many_keys_each_find_their_own() {
        let keys = (0..500)
            .map(|i| ApiKey::new(format!("k{i}"), digest(&format!("sk-{i}")), None))
            .collect();
        let t = KeyTable::new(keys, false);
        for i in (0..500).step_by(37) {
            let header = format!("Bearer sk-{i}");
            assert_eq!(
                t.authenticate(Some(header.as_bytes())).unwrap().id.as_ref(),
                format!("k{i}")
            );
        }
        assert!(t.authenticate(Some(b"Bearer sk-500")).is_err());
    }
}
