//! API keys: stored as SHA-256 digests, checked in constant time.
//!
//! The config never holds a usable secret: each key is the hex SHA-256 of the
//! bearer token. A presented token is hashed once and compared against every
//! stored digest with `subtle`, without stopping at the first match, so the
//! time taken does not depend on which key (if any) matched. The key's `id` is
//! what logs and metrics show; the secret never leaves this module.

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::errors::ApiError;

/// A configured key: its public id, the digest of the secret, and the public
/// model names it may use (`None`: every model).
#[derive(Clone)]
pub struct ApiKey {
    pub id: String,
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
            id,
            digest,
            allowed_models,
        }
    }

    /// The identity used when the operator explicitly allows unauthenticated access.
    pub fn anonymous() -> ApiKey {
        ApiKey::new("anonymous".into(), [0; 32], None)
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

/// A new random key: `sk-edge-` and 256 bits from the OS, hex-encoded.
pub fn generate_key() -> Result<String, getrandom::Error> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes)?;
    Ok(format!("sk-edge-{}", hex::encode(bytes)))
}

#[derive(Debug, Clone)]
pub struct KeyTable {
    keys: Vec<ApiKey>,
    anonymous: Option<ApiKey>,
}

impl KeyTable {
    pub fn new(keys: Vec<ApiKey>, allow_anonymous: bool) -> KeyTable {
        KeyTable {
            keys,
            anonymous: allow_anonymous.then(ApiKey::anonymous),
        }
    }

    pub fn allows_anonymous(&self) -> bool {
        self.anonymous.is_some()
    }

    /// Configured key ids (the only values the `key` metric label takes besides
    /// `anonymous` and `invalid`).
    pub fn ids(&self) -> impl Iterator<Item = &str> {
        self.keys.iter().map(|k| k.id.as_str())
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Authenticates the value of an `Authorization` header.
    pub fn authenticate(&self, authorization: Option<&[u8]>) -> Result<&ApiKey, ApiError> {
        let token = match authorization.map(bearer_token) {
            Some(Some(token)) => token,
            Some(None) | None => {
                if let Some(anon) = &self.anonymous {
                    return Ok(anon);
                }
                return Err(ApiError::MissingKey(
                    "missing API key: send it as 'Authorization: Bearer <key>' (OpenAI clients do this with api_key=...)"
                        .into(),
                ));
            }
        };
        let presented: [u8; 32] = Sha256::digest(token).into();
        let mut found: Option<&ApiKey> = None;
        for key in &self.keys {
            if bool::from(key.digest.ct_eq(&presented)) {
                found = Some(key);
            }
        }
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

/// The token of `Bearer <token>` (scheme case-insensitive), if well-formed.
fn bearer_token(header: &[u8]) -> Option<&[u8]> {
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
            t.authenticate(Some(b"Bearer sk-alice")).unwrap().id,
            "alice"
        );
        assert_eq!(t.authenticate(Some(b"bearer  sk-bob ")).unwrap().id, "bob");
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
        assert_eq!(open.authenticate(None).unwrap().id, "anonymous");
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
    }
}
