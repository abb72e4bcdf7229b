//! Validation: the file schema (after the environment) turned into the
//! runtime [`Config`], or a [`ConfigError`] naming the path of the bad field.
//!
//! This file checks the listeners, limits, the downstream side, the server
//! section, metrics, passthrough routes, TLS and CORS; the upstream servers
//! are checked in [`upstream`], models and keys in [`catalogue`]. It reads
//! the schema and builds the runtime types; it must not read the environment
//! (that is `env`) nor import the gateway, upstream or metrics modules.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use super::runtime::{Config, Downstream, Limits, MetricsConfig, SharedConfig, TlsConfig};
use super::schema::{
    CorsSection, FileConfig, MetricsSection, RoutesSection, StateSection, TlsSection,
};
use super::{err, ConfigError, Secret};
use crate::policy::clients::{ClientPolicy, IpNet};
use crate::policy::cors::CorsPolicy;
use crate::policy::routes::RouteTable;

mod catalogue;
mod upstream;

use catalogue::{validate_key_limits, validate_keys, validate_models};
use upstream::validate_upstream;

impl FileConfig {
    pub fn validate(self) -> Result<Config, ConfigError> {
        let listen = validate_listen(&self.listen)?;
        let upstream = validate_upstream(self.upstream)?;
        let catalogue = validate_models(self.models, self.default_model, &upstream.servers)?;
        let key_limits = validate_key_limits(&self.keys)?;
        let keys = validate_keys(self.keys, &catalogue, self.allow_anonymous)?;

        let limits = Limits {
            max_header_bytes: self.limits.max_header_bytes,
            max_body_bytes: self.limits.max_body_bytes,
            max_buffered_body_bytes: self.limits.max_buffered_body_bytes,
            max_concurrent_requests: self.limits.max_concurrent_requests,
            max_uploads_per_key: self.limits.max_uploads_per_key,
            max_uploads_per_ip: self.limits.max_uploads_per_ip,
        };
        for (field, value) in [
            ("max_uploads_per_key", limits.max_uploads_per_key),
            ("max_uploads_per_ip", limits.max_uploads_per_ip),
        ] {
            if value == Some(0) {
                return Err(err(
                    format!("limits.{field}"),
                    "must be at least 1 (null turns it off)",
                ));
            }
        }
        if limits.max_concurrent_requests == Some(0) {
            return Err(err(
                "limits.max_concurrent_requests",
                "must be at least 1 (leave it out for no cap)",
            ));
        }
        if limits.max_body_bytes == 0 {
            return Err(err("limits.max_body_bytes", "must be greater than 0"));
        }
        if limits.max_buffered_body_bytes < limits.max_body_bytes {
            return Err(err(
                "limits.max_buffered_body_bytes",
                "must be at least limits.max_body_bytes, or no large request could ever be served",
            ));
        }
        let d = self.downstream;
        let mut trusted_proxies = Vec::with_capacity(d.trusted_proxies.len());
        for (i, p) in d.trusted_proxies.iter().enumerate() {
            let net: IpNet = p
                .parse()
                .map_err(|e: String| err(format!("downstream.trusted_proxies[{i}]"), e))?;
            trusted_proxies.push(net);
        }
        for (field, value) in [
            (
                "max_auth_failures_per_minute",
                d.max_auth_failures_per_minute,
            ),
            ("max_concurrent_per_ip", d.max_concurrent_per_ip),
        ] {
            if value == Some(0) {
                return Err(err(
                    format!("downstream.{field}"),
                    "must be at least 1 (null turns it off)",
                ));
            }
        }
        let downstream = Downstream {
            read_timeout: nonzero("downstream.read_timeout", d.read_timeout)?,
            keepalive_timeout: d.keepalive_timeout,
            body_timeout: nonzero("downstream.body_timeout", d.body_timeout)?,
            clients: ClientPolicy {
                trusted_proxies,
                max_auth_failures_per_minute: d.max_auth_failures_per_minute,
                max_concurrent_per_ip: d.max_concurrent_per_ip,
            },
        };
        let server = self.server;
        if server.drain_delay > Duration::from_secs(300) {
            return Err(err(
                "server.drain_delay",
                "must be at most 5m: the edge stops only after it",
            ));
        }
        if server.threads == 0 {
            return Err(err("server.threads", "must be at least 1"));
        }
        for (path, value) in [
            ("server.pid_file", &server.pid_file),
            ("server.upgrade_sock", &server.upgrade_sock),
        ] {
            if !Path::new(value).is_absolute() {
                return Err(err(
                    path,
                    format!("must be an absolute path, got '{value}'"),
                ));
            }
        }
        if let Some(log) = &server.error_log {
            if !Path::new(log).is_absolute() {
                return Err(err(
                    "server.error_log",
                    format!("must be an absolute path, got '{log}'"),
                ));
            }
        }
        let metrics = validate_metrics(self.metrics, &listen)?;
        let routes = validate_routes(self.routes, &metrics)?;
        let cors = validate_cors(self.cors)?;
        let tls = match self.tls {
            None => None,
            Some(t) => Some(validate_tls(t, &listen, metrics.listen.as_deref())?),
        };
        let state_dir = match self.state_dir {
            Some(dir) if !dir.is_absolute() => {
                return Err(err(
                    "state_dir",
                    format!("'{}' must be an absolute path", dir.display()),
                ))
            }
            other => other,
        };
        let ledger_flush_interval = self.ledger.flush_interval;
        if ledger_flush_interval < Duration::from_millis(100)
            || ledger_flush_interval > Duration::from_secs(300)
        {
            return Err(err(
                "ledger.flush_interval",
                "must be between 100ms and 5m: it is how much usage a crash may lose",
            ));
        }
        let shared = validate_state(self.state)?;
        Ok(Config {
            listen,
            upstream,
            catalogue,
            keys,
            key_limits,
            limits,
            downstream,
            server,
            metrics,
            cors,
            tls,
            routes,
            warnings: Vec::new(),
            state_dir,
            ledger_flush_interval,
            logging: self.logging,
            shared,
        })
    }
}

fn validate_state(s: StateSection) -> Result<Option<SharedConfig>, ConfigError> {
    let Some(url) = s.redis else {
        return Ok(None);
    };
    let scheme = url.expose().split("://").next().unwrap_or_default();
    if !matches!(scheme, "redis" | "rediss") || !url.expose().contains("://") {
        return Err(err(
            "state.redis",
            "must be a redis:// or rediss:// URL (redis://[user:password@]host:port/db)",
        ));
    }
    if redis::Client::open(url.expose()).is_err() {
        return Err(err(
            "state.redis",
            "is not a valid Redis URL (redis://[user:password@]host:port/db)",
        ));
    }
    if s.expected_edges == 0 || s.expected_edges > 1000 {
        return Err(err("state.expected_edges", "must be between 1 and 1000"));
    }
    if s.timeout < Duration::from_millis(5) || s.timeout > Duration::from_secs(5) {
        return Err(err(
            "state.timeout",
            "must be between 5ms and 5s: requests wait this long on a store that does not answer",
        ));
    }
    if s.lease_ttl < Duration::from_secs(1) || s.lease_ttl > Duration::from_secs(600) {
        return Err(err(
            "state.lease_ttl",
            "must be between 1s and 10m: it is how long a crashed edge's leases hold slots",
        ));
    }
    if s.prefix.is_empty() || s.prefix.contains(char::is_whitespace) {
        return Err(err(
            "state.prefix",
            "must be a non-empty word without spaces",
        ));
    }
    Ok(Some(SharedConfig {
        url,
        on_error: s.on_error,
        expected_edges: s.expected_edges,
        timeout: s.timeout,
        lease_ttl: s.lease_ttl,
        prefix: s.prefix,
    }))
}

fn validate_routes(r: RoutesSection, metrics: &MetricsConfig) -> Result<RouteTable, ConfigError> {
    let mut paths: Vec<String> = Vec::with_capacity(r.passthrough.len());
    for (i, path) in r.passthrough.into_iter().enumerate() {
        let at = format!("routes.passthrough[{i}]");
        if path.contains('?') {
            return Err(err(at, format!("'{path}' has a query; list the path only")));
        }
        crate::policy::routes::check_canonical(&path)
            .map_err(|e| err(&at, format!("'{path}': {e}")))?;
        let path = match path.strip_suffix('/') {
            Some(p) if !p.is_empty() => p.to_string(),
            _ => path,
        };
        let builtin = crate::policy::routes::classify("POST", &path).is_ok()
            || crate::policy::routes::classify("GET", &path).is_ok()
            || path.starts_with("/v1/models");
        if builtin || (metrics.on_public_listener && path == metrics.path) {
            return Err(err(
                at,
                format!("'{path}' is one of the gateway's own routes; passthrough is for other llama-server paths"),
            ));
        }
        if paths.contains(&path) {
            return Err(err(at, format!("'{path}' is listed twice")));
        }
        paths.push(path);
    }
    Ok(RouteTable::new(paths))
}

fn validate_metrics(m: MetricsSection, public_listen: &str) -> Result<MetricsConfig, ConfigError> {
    let listen = match m
        .listen
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
    {
        None => None,
        Some(l) => {
            l.parse::<SocketAddr>()
                .map_err(|_| err("metrics.listen", format!("'{l}' is not an IP:PORT address")))?;
            if l == public_listen {
                return Err(err(
                    "metrics.listen",
                    "is the public listen address; set metrics.on_public_listener instead",
                ));
            }
            Some(l)
        }
    };
    if !m.path.starts_with('/') || m.path.starts_with("/v1/") || m.path.starts_with("/health") {
        return Err(err(
            "metrics.path",
            format!(
                "'{}' must start with '/' and not be under /v1/ or /health",
                m.path
            ),
        ));
    }
    if let Some(token) = m.bearer_token.as_ref().map(Secret::expose) {
        if token.is_empty() || token.bytes().any(|b| b.is_ascii_control() || b == b' ') {
            return Err(err(
                "metrics.bearer_token",
                "must be non-empty, without spaces or control characters",
            ));
        }
    }
    Ok(MetricsConfig {
        listen,
        path: m.path,
        bearer_token: m.bearer_token,
        on_public_listener: m.on_public_listener,
    })
}

fn validate_tls(
    t: TlsSection,
    listen: &str,
    metrics: Option<&str>,
) -> Result<TlsConfig, ConfigError> {
    t.listen.parse::<SocketAddr>().map_err(|_| {
        err(
            "tls.listen",
            format!("'{}' is not an IP:PORT address", t.listen),
        )
    })?;
    if t.listen == listen || Some(t.listen.as_str()) == metrics {
        return Err(err(
            "tls.listen",
            "must differ from listen and metrics.listen",
        ));
    }
    // Read now, so a reload with a missing or wrong file fails validation
    // instead of the new process.
    for (path, file, marker) in [
        ("tls.cert", &t.cert, "CERTIFICATE"),
        ("tls.key", &t.key, "PRIVATE KEY"),
    ] {
        // Only a regular file: a FIFO or a device would block or never end.
        let meta =
            std::fs::metadata(file).map_err(|e| err(path, format!("cannot read '{file}': {e}")))?;
        if !meta.is_file() {
            return Err(err(path, format!("'{file}' is not a regular file")));
        }
        if meta.len() > 1024 * 1024 {
            return Err(err(
                path,
                format!("'{file}' is larger than 1 MiB: not a PEM certificate or key"),
            ));
        }
        let text = std::fs::read_to_string(file)
            .map_err(|e| err(path, format!("cannot read '{file}': {e}")))?;
        if !text.contains("-----BEGIN") || !text.contains(marker) {
            return Err(err(
                path,
                format!("'{file}' is not a PEM file with a {marker}"),
            ));
        }
    }
    Ok(TlsConfig {
        listen: t.listen,
        cert: t.cert,
        key: t.key,
        http2: t.http2,
    })
}

fn validate_cors(c: CorsSection) -> Result<CorsPolicy, ConfigError> {
    for (i, origin) in c.allowed_origins.iter().enumerate() {
        let valid = origin == "*"
            || origin.split_once("://").is_some_and(|(scheme, host)| {
                matches!(scheme, "http" | "https")
                    && !host.is_empty()
                    && !host.contains('/')
                    && host.parse::<http::uri::Authority>().is_ok()
            });
        if !valid {
            return Err(err(
                format!("cors.allowed_origins[{i}]"),
                format!("'{origin}' must be an origin like https://chat.example.com (scheme, host, optional port; no path) or '*'"),
            ));
        }
    }
    Ok(CorsPolicy {
        allowed_origins: c.allowed_origins,
        max_age: c.max_age,
    })
}

pub(super) fn nonzero(path: &str, d: Duration) -> Result<Duration, ConfigError> {
    if d.is_zero() {
        Err(err(path, "must be greater than 0"))
    } else {
        Ok(d)
    }
}

pub(super) fn validate_listen(listen: &str) -> Result<String, ConfigError> {
    listen.parse::<SocketAddr>().map_err(|_| {
        err(
            "listen",
            format!("'{listen}' is not an IP:PORT address (for example 0.0.0.0:8000 or [::]:8000)"),
        )
    })?;
    Ok(listen.to_string())
}
