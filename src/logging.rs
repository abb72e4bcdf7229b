//! The process logger: `env_logger`, behind a filter that keeps secrets out.
//!
//! At debug and trace level, Pingora logs whole request and response
//! headers ("Sending header to upstream", "Request header: ..."), which
//! carry the client's key and the upstream's `--api-key`. No log level may
//! print a secret, so any debug or trace line that mentions a credential
//! header or parameter is replaced by a note saying it was withheld. Info
//! and above are written by llm-edge itself and never hold one.

use std::io::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};

use log::{Level, Log, Metadata, Record};
use serde::Deserialize;

/// The target of the one-line-per-request access log.
pub const ACCESS_TARGET: &str = "llm_edge::access";

/// How access-log lines are written (`logging.access_log_format`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AccessLogFormat {
    /// `client "METHOD path" status key=value ...` after env_logger's prefix.
    #[default]
    Text,
    /// One JSON object per line and nothing else on it (no prefix), so a log
    /// pipeline can parse every line that starts with `{`.
    Json,
}

/// Set once from the configuration at start; read for every access line.
static ACCESS_JSON: AtomicBool = AtomicBool::new(false);

pub fn set_access_log_format(format: AccessLogFormat) {
    ACCESS_JSON.store(format == AccessLogFormat::Json, Ordering::Relaxed);
}

/// Words that mark a line as carrying credentials (compared lower-cased).
const SECRET_MARKERS: &[&str] = &[
    "authorization",
    "x-api-key",
    "bearer ",
    "api_key",
    "api-key",
    "access_token",
    "cookie",
];

/// Whether a log line may carry a credential.
pub fn carries_secret(line: &str) -> bool {
    let lower = line.to_ascii_lowercase();
    SECRET_MARKERS.iter().any(|m| lower.contains(m))
}

struct Redacting {
    inner: env_logger::Logger,
}

impl Log for Redacting {
    fn enabled(&self, metadata: &Metadata) -> bool {
        self.inner.enabled(metadata)
    }

    fn log(&self, record: &Record) {
        if !self.inner.matches(record) {
            return;
        }
        if record.level() >= Level::Debug && carries_secret(&record.args().to_string()) {
            self.inner.log(
                &Record::builder()
                    .args(format_args!(
                        "(a {} line of {} was withheld: it carries headers that may hold keys)",
                        record.level().as_str().to_ascii_lowercase(),
                        record.target()
                    ))
                    .level(record.level())
                    .target(record.target())
                    .module_path(record.module_path())
                    .file(record.file())
                    .line(record.line())
                    .build(),
            );
            return;
        }
        if record.target() == ACCESS_TARGET && ACCESS_JSON.load(Ordering::Relaxed) {
            // The line is already a whole JSON object: env_logger's
            // `[time LEVEL target]` prefix would make it unparseable.
            // One write per line, so lines of parallel requests never interleave.
            let line = format!("{}\n", record.args());
            let _ = std::io::stderr().lock().write_all(line.as_bytes());
            return;
        }
        self.inner.log(record);
    }

    fn flush(&self) {
        self.inner.flush();
    }
}

/// Installs the logger (`RUST_LOG`, default `info`).
pub fn init() {
    let inner =
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).build();
    let max = inner.filter();
    if log::set_boxed_logger(Box::new(Redacting { inner })).is_ok() {
        log::set_max_level(max);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_dumps_are_recognised() {
        assert!(carries_secret(
            "Sending header to upstream RequestHeader { ... \"authorization\": \"Bearer sk-x\" }"
        ));
        assert!(carries_secret("GET /v1/models?API_KEY=sk"));
        assert!(carries_secret("x-api-key: sk"));
        assert!(!carries_secret(
            "pooled upstream connection was stale (connection closed)"
        ));
    }
}
