//! [`Secret`]: a configured credential (`upstream.api_key`,
//! `upstream.servers[].api_key`, `metrics.bearer_token`) that never shows in
//! `Debug` or `Display`, so a logged or printed config cannot leak it.
//!
//! The value is read only through [`Secret::expose`], at the few places that
//! send or compare it. Plain data: this file imports nothing from the crate.

use std::fmt;

use serde::Deserialize;

/// A secret string; deserialises exactly as a `String` does.
#[derive(Clone, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    /// The value itself: for sending it or comparing it, never for printing.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl From<String> for Secret {
    fn from(value: String) -> Secret {
        Secret(value)
    }
}

impl From<&str> for Secret {
    fn from(value: &str) -> Secret {
        Secret(value.to_string())
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(\"***\")")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}
