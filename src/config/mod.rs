//! Configuration: the YAML file, the seed's environment variables, and the
//! validated, immutable [`Config`] the gateway runs on.
//!
//! Parsing is strict (`deny_unknown_fields`): a typo in a production config
//! must stop the start or the reload, not silently fall back to a default.
//! Every error names the path of the offending field (`upstream.url`,
//! `models[1].aliases[0]`, ...).
//!
//! The parts, each in its own file:
//! - [`schema`]: the file as the operator writes it (serde structs, their
//!   defaults) and its parsing;
//! - [`env`]: the seed's environment variables laid over the file;
//! - [`validate`]: the file turned into the runtime types, or an error naming
//!   the path;
//! - [`runtime`]: the validated types the rest of the gateway reads.
//! - [`secret`]: [`Secret`], the credentials' wrapper that never prints.
//!
//! This module only assembles them ([`Config::load`]) and re-exports them, so
//! the rest of the crate says `crate::config::Config`,
//! `crate::config::UpstreamServer`, ... It must not import the gateway,
//! upstream or metrics modules: configuration is read by them, never the
//! other way round.

use std::path::Path;

use validate::validate_listen;

mod env;
mod runtime;
mod schema;
mod secret;
mod validate;

#[cfg(test)]
mod tests;

pub use env::{apply_env, env_warnings, process_env, Env};
pub use runtime::{
    Config, Downstream, Limits, MetricsConfig, Routing, SharedConfig, TlsConfig, Upstream,
    UpstreamServer,
};
pub use schema::{
    parse_yaml, CorsSection, DownstreamSection, FileConfig, KeyLimitsSection, KeySection,
    LedgerSection, LimitsSection, LoggingSection, MetricsSection, ModelSection, RoutesSection,
    ServerSection, TlsSection, UpstreamSection, UpstreamServerSection,
};
pub use secret::Secret;

/// Loopback: a first run is not on the internet until the operator says so
/// (`listen`, `LISTEN` or `--listen`).
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8000";
pub const DEFAULT_UPSTREAM: &str = "http://127.0.0.1:8080";
pub const DEFAULT_MODEL: &str = "local";
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:9464";

/// A configuration problem, with the path of the field it concerns.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {message}")]
pub struct ConfigError {
    pub path: String,
    pub message: String,
}

fn err(path: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError {
        path: path.into(),
        message: message.into(),
    }
}

impl Config {
    /// Loads `path` (or the built-in defaults), applies the environment, validates.
    pub fn load(path: Option<&Path>, env: Env) -> Result<Config, ConfigError> {
        let file = match path {
            None => FileConfig::default(),
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .map_err(|e| err(p.display().to_string(), format!("cannot read: {e}")))?;
                parse_yaml(&text)?
            }
        };
        let mut cfg = apply_env(file, env).validate()?;
        cfg.warnings = env_warnings(env);
        Ok(cfg)
    }

    /// What the operator should hear about at start-up: placeholder keys, no
    /// keys at all, anonymous access on a listener other hosts can reach.
    pub fn startup_warnings(&self) -> Vec<String> {
        let mut out = self.warnings.clone();
        if self.keys.is_empty() && !self.keys.allows_anonymous() {
            out.push("no API keys are configured: every /v1 request will be refused with 401; set API_KEYS or add keys to the config".into());
        }
        if self.keys.allows_anonymous() {
            let listeners = std::iter::once(("listen", &self.listen))
                .chain(self.tls.as_ref().map(|t| ("tls.listen", &t.listen)));
            for (what, addr) in listeners {
                if !is_loopback(addr) {
                    out.push(format!("allow_anonymous is on and {what} {addr} is not a loopback address: anyone who can reach it may use the models without a key"));
                }
            }
        }
        out
    }
}

fn is_loopback(addr: &str) -> bool {
    addr.parse::<std::net::SocketAddr>()
        .is_ok_and(|a| a.ip().is_loopback())
}

impl Config {
    /// Applies `--listen HOST:PORT`.
    pub fn set_listen(&mut self, listen: &str) -> Result<(), ConfigError> {
        self.listen = validate_listen(listen)?;
        Ok(())
    }
}
