//! Configuration: the YAML file, the seed's environment variables, and the
//! validated, immutable [`Config`] the gateway runs on.
//!
//! Parsing is strict (`deny_unknown_fields`): a typo in a production config
//! must stop the start or the reload, not silently fall back to a default.
//! Every error names the path of the offending field (`upstream.url`,
//! `models[1].aliases[0]`, ...).

use std::collections::HashSet;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

use crate::openai::models::{Catalogue, ModelRoute};
use crate::policy::auth::{self, ApiKey, KeyTable};
use crate::policy::clients::{ClientPolicy, IpNet};
use crate::policy::cors::CorsPolicy;
use crate::policy::limits::{KeyLimits, OverMaxTokens};
use crate::policy::routes::RouteTable;

pub const DEFAULT_LISTEN: &str = "0.0.0.0:8000";
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

// ---------------------------------------------------------------------------
// The file, as written by the operator.

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FileConfig {
    pub listen: String,
    pub upstream: UpstreamSection,
    pub default_model: Option<String>,
    pub models: Vec<ModelSection>,
    pub keys: Vec<KeySection>,
    pub allow_anonymous: bool,
    pub limits: LimitsSection,
    pub downstream: DownstreamSection,
    pub server: ServerSection,
    pub metrics: MetricsSection,
    pub cors: CorsSection,
    pub tls: Option<TlsSection>,
    pub routes: RoutesSection,
}

/// Paths beyond the built-in route table that the operator opens on purpose.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RoutesSection {
    /// Exact paths (e.g. `/props`) forwarded to llama-server as they are,
    /// after the key and the key's request limits; the body is not inspected.
    pub passthrough: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    pub listen: String,
    pub cert: String,
    pub key: String,
    #[serde(default = "default_true")]
    pub http2: bool,
}

fn default_true() -> bool {
    true
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CorsSection {
    pub allowed_origins: Vec<String>,
    #[serde(with = "humantime_serde")]
    pub max_age: Duration,
}

impl Default for CorsSection {
    fn default() -> Self {
        CorsSection {
            allowed_origins: Vec::new(),
            max_age: Duration::from_secs(600),
        }
    }
}

impl Default for FileConfig {
    fn default() -> Self {
        FileConfig {
            listen: DEFAULT_LISTEN.into(),
            upstream: UpstreamSection::default(),
            default_model: None,
            models: Vec::new(),
            keys: Vec::new(),
            allow_anonymous: false,
            limits: LimitsSection::default(),
            downstream: DownstreamSection::default(),
            server: ServerSection::default(),
            metrics: MetricsSection::default(),
            cors: CorsSection::default(),
            tls: None,
            routes: RoutesSection::default(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamSection {
    /// One llama-server (the default, `http://127.0.0.1:8080`); or `servers`.
    pub url: Option<String>,
    pub api_key: Option<String>,
    /// Several llama-servers (GPU machines, each behind its own tunnel port).
    pub servers: Vec<UpstreamServerSection>,
    #[serde(with = "humantime_serde")]
    pub health_interval: Duration,
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub first_byte_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub total_timeout: Option<Duration>,
    #[serde(with = "humantime_serde")]
    pub pool_idle_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub health_timeout: Duration,
    pub max_in_flight: usize,
    #[serde(with = "humantime_serde")]
    pub queue_timeout: Duration,
    pub max_queued: usize,
}

impl Default for UpstreamSection {
    fn default() -> Self {
        UpstreamSection {
            url: None,
            api_key: None,
            servers: Vec::new(),
            health_interval: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(5),
            first_byte_timeout: Duration::from_secs(10 * 60),
            idle_timeout: Duration::from_secs(5 * 60),
            total_timeout: None,
            pool_idle_timeout: Duration::from_secs(4),
            health_timeout: Duration::from_secs(3),
            max_in_flight: 0,
            queue_timeout: Duration::from_secs(30),
            max_queued: 1024,
        }
    }
}

/// One of several upstreams (`upstream.servers[i]`); unset fields inherit
/// from `upstream`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamServerSection {
    pub name: Option<String>,
    pub url: String,
    pub api_key: Option<String>,
    pub max_in_flight: Option<usize>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    pub name: String,
    #[serde(default)]
    pub aliases: Vec<String>,
    pub upstream_name: Option<String>,
    pub owned_by: Option<String>,
    /// Names of the `upstream.servers` that serve this model (default: all).
    #[serde(default)]
    pub upstreams: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeySection {
    pub id: String,
    pub sha256: String,
    pub models: Option<Vec<String>>,
    #[serde(default)]
    pub limits: KeyLimitsSection,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KeyLimitsSection {
    pub requests_per_minute: Option<u32>,
    pub max_concurrent: Option<u32>,
    pub max_tokens: Option<u64>,
    pub over_max_tokens: OverMaxTokens,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsSection {
    pub max_header_bytes: usize,
    pub max_body_bytes: usize,
    pub max_buffered_body_bytes: usize,
    pub max_concurrent_requests: Option<usize>,
    /// Request bodies one key may be sending at once.
    pub max_uploads_per_key: Option<u32>,
    /// Request bodies one client IP may be sending at once.
    pub max_uploads_per_ip: Option<u32>,
}

impl Default for LimitsSection {
    fn default() -> Self {
        LimitsSection {
            max_header_bytes: 64 << 10,
            max_body_bytes: 32 << 20,
            max_buffered_body_bytes: 512 << 20,
            max_concurrent_requests: None,
            max_uploads_per_key: Some(32),
            max_uploads_per_ip: Some(16),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DownstreamSection {
    #[serde(with = "humantime_serde")]
    pub read_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub keepalive_timeout: Duration,
    /// The longest a whole request body may take to arrive.
    #[serde(with = "humantime_serde")]
    pub body_timeout: Duration,
    pub trusted_proxies: Vec<String>,
    pub max_auth_failures_per_minute: Option<u32>,
    pub max_concurrent_per_ip: Option<u32>,
}

impl Default for DownstreamSection {
    fn default() -> Self {
        DownstreamSection {
            read_timeout: Duration::from_secs(60),
            keepalive_timeout: Duration::from_secs(60),
            body_timeout: Duration::from_secs(60),
            trusted_proxies: Vec::new(),
            max_auth_failures_per_minute: Some(60),
            max_concurrent_per_ip: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsSection {
    pub listen: Option<String>,
    pub path: String,
    pub bearer_token: Option<String>,
    pub on_public_listener: bool,
}

impl Default for MetricsSection {
    fn default() -> Self {
        MetricsSection {
            listen: Some(DEFAULT_METRICS_LISTEN.into()),
            path: "/metrics".into(),
            bearer_token: None,
            on_public_listener: false,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerSection {
    pub threads: usize,
    pub pid_file: String,
    pub upgrade_sock: String,
    pub grace_period_seconds: u64,
    pub graceful_shutdown_timeout_seconds: u64,
    pub error_log: Option<String>,
}

impl Default for ServerSection {
    fn default() -> Self {
        ServerSection {
            threads: std::thread::available_parallelism().map_or(2, |n| n.get()),
            pid_file: "/tmp/llm-edge.pid".into(),
            upgrade_sock: "/tmp/llm-edge-upgrade.sock".into(),
            grace_period_seconds: 120,
            graceful_shutdown_timeout_seconds: 5,
            error_log: None,
        }
    }
}

// ---------------------------------------------------------------------------
// The validated configuration the gateway runs on.

/// One llama-server.
#[derive(Debug, Clone)]
pub struct UpstreamServer {
    /// Its name in metrics and messages: `upstream.servers[i].name`, or
    /// `host:port` when there is only `upstream.url`.
    pub name: String,
    /// `host:port` as configured, for messages and the `Host` header.
    pub authority: String,
    pub addr: SocketAddr,
    pub api_key: Option<String>,
    /// Requests allowed at this server at once (its slots); 0: no limit.
    pub max_in_flight: usize,
}

/// The upstream servers and what applies to all of them.
#[derive(Debug, Clone)]
pub struct Upstream {
    pub servers: Vec<UpstreamServer>,
    pub connect_timeout: Duration,
    pub first_byte_timeout: Duration,
    pub idle_timeout: Duration,
    pub total_timeout: Option<Duration>,
    pub pool_idle_timeout: Duration,
    pub health_timeout: Duration,
    /// How often each server's `/health` is probed when there are several.
    pub health_interval: Duration,
    pub queue_timeout: Duration,
    pub max_queued: usize,
}

#[derive(Debug, Clone)]
pub struct Limits {
    pub max_header_bytes: usize,
    pub max_body_bytes: usize,
    pub max_buffered_body_bytes: usize,
    pub max_concurrent_requests: Option<usize>,
    pub max_uploads_per_key: Option<u32>,
    pub max_uploads_per_ip: Option<u32>,
}

#[derive(Debug, Clone)]
pub struct Downstream {
    pub read_timeout: Duration,
    pub keepalive_timeout: Duration,
    pub body_timeout: Duration,
    pub clients: ClientPolicy,
}

/// Where and how `/metrics` is served.
#[derive(Debug, Clone)]
pub struct MetricsConfig {
    /// Its own listener (`None`: none).
    pub listen: Option<String>,
    pub path: String,
    pub bearer_token: Option<String>,
    /// Also served on the public listener (still behind the token, if any).
    pub on_public_listener: bool,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub listen: String,
    pub upstream: Upstream,
    pub catalogue: Catalogue,
    pub keys: KeyTable,
    /// Per-key limits, by key id (keys without limits are absent).
    pub key_limits: Vec<(String, KeyLimits)>,
    pub limits: Limits,
    pub downstream: Downstream,
    pub server: ServerSection,
    pub metrics: MetricsConfig,
    pub cors: CorsPolicy,
    pub tls: Option<TlsConfig>,
    pub routes: RouteTable,
}

/// The optional TLS listener (rustls; HTTP/2 over ALPN when `http2`).
#[derive(Debug, Clone)]
pub struct TlsConfig {
    pub listen: String,
    pub cert: String,
    pub key: String,
    pub http2: bool,
}

/// Reads the environment; a parameter so tests can pass their own.
pub type Env<'a> = &'a dyn Fn(&str) -> Option<String>;

pub fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
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
        apply_env(file, env).validate()
    }
}

impl Config {
    /// Applies `--listen HOST:PORT`.
    pub fn set_listen(&mut self, listen: &str) -> Result<(), ConfigError> {
        self.listen = validate_listen(listen)?;
        Ok(())
    }
}

pub fn parse_yaml(text: &str) -> Result<FileConfig, ConfigError> {
    if text.trim().is_empty() {
        return Ok(FileConfig::default());
    }
    let de = serde_yaml::Deserializer::from_str(text);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        // A top-level key that is itself empty (`"": 1`) yields an empty path.
        let path = if path == "." || path.is_empty() {
            "(top level)".into()
        } else {
            path
        };
        err(path, e.into_inner().to_string())
    })
}

/// The seed's variables: `LLAMA_BASE_URL`, `DEFAULT_MODEL`, `API_KEYS`.
pub fn apply_env(mut file: FileConfig, env: Env) -> FileConfig {
    if let Some(url) = env("LLAMA_BASE_URL") {
        file.upstream.url = Some(url.trim().to_string());
    }
    if let Some(model) = env("DEFAULT_MODEL") {
        let model = model.trim().to_string();
        let known = file
            .models
            .iter()
            .any(|m| m.name == model || m.aliases.contains(&model));
        if !known {
            file.models.push(ModelSection {
                name: model.clone(),
                aliases: vec![],
                upstream_name: None,
                owned_by: None,
                upstreams: Vec::new(),
            });
        }
        file.default_model = Some(model);
    }
    if let Some(keys) = env("API_KEYS") {
        let secrets = keys.split(',').map(str::trim).filter(|k| !k.is_empty());
        for (i, secret) in secrets.enumerate() {
            file.keys.push(KeySection {
                id: format!("env-{}", i + 1),
                sha256: auth::digest_hex(secret),
                models: None,
                limits: KeyLimitsSection::default(),
            });
        }
    }
    file
}

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
        })
    }
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
    if let Some(token) = &m.bearer_token {
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

fn nonzero(path: &str, d: Duration) -> Result<Duration, ConfigError> {
    if d.is_zero() {
        Err(err(path, "must be greater than 0"))
    } else {
        Ok(d)
    }
}

fn validate_listen(listen: &str) -> Result<String, ConfigError> {
    listen.parse::<SocketAddr>().map_err(|_| {
        err(
            "listen",
            format!("'{listen}' is not an IP:PORT address (for example 0.0.0.0:8000 or [::]:8000)"),
        )
    })?;
    Ok(listen.to_string())
}

fn validate_upstream(s: UpstreamSection) -> Result<Upstream, ConfigError> {
    validate_upstream_key("upstream.api_key", s.api_key.as_deref())?;
    let servers = match (s.url, s.servers.is_empty()) {
        (Some(_), false) => {
            return Err(err(
                "upstream.url",
                "give either upstream.url (one llama-server) or upstream.servers (several), not both; LLAMA_BASE_URL also sets upstream.url",
            ))
        }
        (url, true) => {
            let url = url.unwrap_or_else(|| DEFAULT_UPSTREAM.into());
            let (authority, addr) = parse_upstream_url("upstream.url", &url)?;
            vec![UpstreamServer {
                name: authority.clone(),
                authority,
                addr,
                api_key: s.api_key.clone(),
                max_in_flight: s.max_in_flight,
            }]
        }
        (None, false) => {
            let mut servers: Vec<UpstreamServer> = Vec::with_capacity(s.servers.len());
            for (i, srv) in s.servers.into_iter().enumerate() {
                let at = |field: &str| format!("upstream.servers[{i}].{field}");
                let (authority, addr) = parse_upstream_url(&at("url"), &srv.url)?;
                let name = srv.name.unwrap_or_else(|| authority.clone());
                if !valid_model_name(&name) {
                    return Err(err(
                        at("name"),
                        format!("'{name}' is not a valid name (non-empty, no spaces or control characters)"),
                    ));
                }
                if let Some(other) = servers.iter().find(|o| o.addr == addr) {
                    return Err(err(
                        at("url"),
                        format!("'{}' is the same address as server '{}'", srv.url, other.name),
                    ));
                }
                if let Some(other) = servers.iter().find(|o| o.name == name) {
                    return Err(err(
                        at("name"),
                        format!("'{name}' is already the name of the server at {}", other.authority),
                    ));
                }
                validate_upstream_key(&at("api_key"), srv.api_key.as_deref())?;
                servers.push(UpstreamServer {
                    name,
                    authority,
                    addr,
                    api_key: srv.api_key.or_else(|| s.api_key.clone()),
                    max_in_flight: srv.max_in_flight.unwrap_or(s.max_in_flight),
                });
            }
            servers
        }
    };
    Ok(Upstream {
        servers,
        connect_timeout: nonzero("upstream.connect_timeout", s.connect_timeout)?,
        first_byte_timeout: nonzero("upstream.first_byte_timeout", s.first_byte_timeout)?,
        idle_timeout: nonzero("upstream.idle_timeout", s.idle_timeout)?,
        total_timeout: match s.total_timeout {
            Some(d) => Some(nonzero("upstream.total_timeout", d)?),
            None => None,
        },
        pool_idle_timeout: s.pool_idle_timeout,
        health_timeout: nonzero("upstream.health_timeout", s.health_timeout)?,
        health_interval: nonzero("upstream.health_interval", s.health_interval)?,
        queue_timeout: nonzero("upstream.queue_timeout", s.queue_timeout)?,
        max_queued: s.max_queued,
    })
}

fn validate_upstream_key(path: &str, key: Option<&str>) -> Result<(), ConfigError> {
    match key {
        Some(key) if key.is_empty() || key.bytes().any(|b| b.is_ascii_control()) => Err(err(
            path,
            "must be a non-empty string without control characters",
        )),
        _ => Ok(()),
    }
}

/// `http://HOST:PORT` -> (`host:port`, resolved address).
fn parse_upstream_url(path: &str, url: &str) -> Result<(String, SocketAddr), ConfigError> {
    let url = url.trim();
    let rest = url.strip_prefix("http://").ok_or_else(|| {
        err(
            path,
            format!("'{url}' must start with http:// (the upstream is llama-server at the end of the SSH tunnel)"),
        )
    })?;
    let (authority, rest_path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    if !matches!(rest_path, "" | "/" | "/v1" | "/v1/") {
        return Err(err(
            path,
            format!("'{url}' has a path; give only http://HOST:PORT"),
        ));
    }
    let uri: http::uri::Authority = authority
        .parse()
        .map_err(|_| err(path, format!("'{url}' has no valid HOST:PORT")))?;
    let host = uri.host().trim_start_matches('[').trim_end_matches(']');
    let port = uri.port_u16().unwrap_or(80);
    if host.is_empty() {
        return Err(err(path, format!("'{url}' has no host")));
    }
    // Resolved once here: pingora's HttpPeer::new panics on a name it cannot resolve.
    let addr = (host, port)
        .to_socket_addrs()
        .ok()
        .and_then(|mut addrs| addrs.next())
        .ok_or_else(|| err(path, format!("cannot resolve host '{host}'")))?;
    Ok((format!("{host}:{port}"), addr))
}

fn valid_model_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 256
        && !name.chars().any(|c| c.is_control() || c.is_whitespace())
}

fn validate_models(
    models: Vec<ModelSection>,
    default_model: Option<String>,
    servers: &[UpstreamServer],
) -> Result<Catalogue, ConfigError> {
    let mut models = models;
    if models.is_empty() {
        models.push(ModelSection {
            name: default_model
                .clone()
                .unwrap_or_else(|| DEFAULT_MODEL.into()),
            aliases: vec![],
            upstream_name: None,
            owned_by: None,
            upstreams: Vec::new(),
        });
    }
    let mut seen = HashSet::new();
    let mut routes = Vec::with_capacity(models.len());
    for (i, m) in models.into_iter().enumerate() {
        if !valid_model_name(&m.name) {
            return Err(err(
                format!("models[{i}].name"),
                format!(
                    "'{}' is not a valid model name (non-empty, no spaces or control characters)",
                    m.name
                ),
            ));
        }
        if !seen.insert(m.name.clone()) {
            return Err(err(
                format!("models[{i}].name"),
                format!("'{}' is listed twice", m.name),
            ));
        }
        for (j, alias) in m.aliases.iter().enumerate() {
            if !valid_model_name(alias) {
                return Err(err(
                    format!("models[{i}].aliases[{j}]"),
                    format!("'{alias}' is not a valid model name"),
                ));
            }
            if !seen.insert(alias.clone()) {
                return Err(err(
                    format!("models[{i}].aliases[{j}]"),
                    format!("'{alias}' is already used by another model or alias"),
                ));
            }
        }
        let upstream_name = m.upstream_name.unwrap_or_else(|| m.name.clone());
        if upstream_name.is_empty() {
            return Err(err(
                format!("models[{i}].upstream_name"),
                "must not be empty",
            ));
        }
        let mut upstreams = Vec::with_capacity(m.upstreams.len());
        for (j, wanted) in m.upstreams.iter().enumerate() {
            let index = servers
                .iter()
                .position(|s| &s.name == wanted)
                .ok_or_else(|| {
                    let names: Vec<&str> = servers.iter().map(|s| s.name.as_str()).collect();
                    err(
                        format!("models[{i}].upstreams[{j}]"),
                        format!(
                            "'{wanted}' is not one of upstream.servers: {}",
                            names.join(", ")
                        ),
                    )
                })?;
            if upstreams.contains(&index) {
                return Err(err(
                    format!("models[{i}].upstreams[{j}]"),
                    format!("'{wanted}' is listed twice"),
                ));
            }
            upstreams.push(index);
        }
        routes.push(ModelRoute {
            name: m.name,
            aliases: m.aliases,
            upstream_name,
            owned_by: m.owned_by.unwrap_or_else(|| "llm-edge".into()),
            upstreams,
        });
    }
    let default = default_model.unwrap_or_else(|| routes[0].name.clone());
    let created = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    if !seen.contains(&default) {
        return Err(err(
            "default_model",
            format!("'{default}' is not one of the models or aliases listed under models"),
        ));
    }
    Catalogue::new(routes, &default, created)
        .ok_or_else(|| err("models", "names and aliases must be unique"))
}

fn validate_keys(
    keys: Vec<KeySection>,
    catalogue: &Catalogue,
    allow_anonymous: bool,
) -> Result<KeyTable, ConfigError> {
    let mut ids = HashSet::new();
    let mut digests = HashSet::new();
    let mut table = Vec::with_capacity(keys.len());
    for (i, k) in keys.into_iter().enumerate() {
        if k.id.is_empty()
            || k.id.len() > 64
            || !k
                .id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return Err(err(
                format!("keys[{i}].id"),
                format!("'{}' must be 1-64 characters of letters, digits, '-', '_' or '.' (it appears in logs and metrics)", k.id),
            ));
        }
        if k.id == "anonymous" || k.id == "invalid" {
            return Err(err(
                format!("keys[{i}].id"),
                format!("'{}' is reserved for requests without a valid key", k.id),
            ));
        }
        if !ids.insert(k.id.clone()) {
            return Err(err(
                format!("keys[{i}].id"),
                format!("'{}' is used twice", k.id),
            ));
        }
        let digest = parse_digest(&k.sha256).ok_or_else(|| {
            err(
                format!("keys[{i}].sha256"),
                "must be 64 hex characters: the SHA-256 of the key, as printed by `llm-edge hash-key`",
            )
        })?;
        if !digests.insert(digest) {
            return Err(err(
                format!("keys[{i}].sha256"),
                "the same key is configured twice",
            ));
        }
        let allowed = match k.models {
            None => None,
            Some(list) => {
                let mut names = Vec::with_capacity(list.len());
                for (j, name) in list.iter().enumerate() {
                    let route = catalogue.resolve(Some(name)).ok_or_else(|| {
                        err(
                            format!("keys[{i}].models[{j}]"),
                            format!("'{name}' is not a configured model or alias"),
                        )
                    })?;
                    names.push(route.name.clone());
                }
                Some(names)
            }
        };
        table.push(ApiKey::new(k.id, digest, allowed));
    }
    Ok(KeyTable::new(table, allow_anonymous))
}

fn validate_key_limits(keys: &[KeySection]) -> Result<Vec<(String, KeyLimits)>, ConfigError> {
    let mut out = Vec::new();
    for (i, k) in keys.iter().enumerate() {
        let l = &k.limits;
        for (field, value) in [
            ("requests_per_minute", l.requests_per_minute.map(u64::from)),
            ("max_concurrent", l.max_concurrent.map(u64::from)),
            ("max_tokens", l.max_tokens),
        ] {
            if value == Some(0) {
                return Err(err(
                    format!("keys[{i}].limits.{field}"),
                    "must be at least 1 (leave it out for no limit)",
                ));
            }
        }
        let limits = KeyLimits {
            requests_per_minute: l.requests_per_minute,
            max_concurrent: l.max_concurrent,
            max_tokens: l.max_tokens,
            over_max_tokens: l.over_max_tokens,
        };
        if limits != KeyLimits::default() {
            out.push((k.id.clone(), limits));
        }
    }
    Ok(out)
}

fn parse_digest(hex_digest: &str) -> Option<[u8; 32]> {
    let bytes = hex::decode(hex_digest.trim()).ok()?;
    bytes.try_into().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    fn load_str(yaml: &str) -> Result<Config, ConfigError> {
        apply_env(parse_yaml(yaml)?, &no_env).validate()
    }

    #[test]
    fn defaults_listen_on_8000_and_forward_to_8080() {
        let c = Config::load(None, &no_env).unwrap();
        assert_eq!(c.listen, "0.0.0.0:8000");
        assert_eq!(
            c.upstream.servers[0].addr,
            "127.0.0.1:8080".parse().unwrap()
        );
        assert_eq!(c.catalogue.default_route().name, "local");
        assert!(c.keys.is_empty());
        assert_eq!(c.limits.max_body_bytes, 32 << 20);
        assert_eq!(c.metrics.listen.as_deref(), Some("127.0.0.1:9464"));
        assert!(!c.metrics.on_public_listener);
    }

    #[test]
    fn tls_files_must_be_regular_files() {
        for (cert, key, path) in [
            ("/dev/zero", "/dev/null", "tls.cert"),
            ("/", "/dev/null", "tls.cert"),
            ("/nonexistent.pem", "/dev/null", "tls.cert"),
        ] {
            let e = load_str(&format!(
                "tls:\n  listen: 127.0.0.1:8443\n  cert: {cert}\n  key: {key}\n"
            ))
            .unwrap_err();
            assert_eq!(e.path, path, "{cert}: {e}");
        }
    }

    #[test]
    fn the_shipped_example_config_is_valid() {
        let text = include_str!("../../conf/llm-edge.yaml");
        let c = load_str(text).unwrap();
        assert_eq!(c.catalogue.default_route().name, "qwen3-30b-a3b-instruct");
    }

    #[test]
    fn full_file() {
        let key = auth::digest_hex("sk-test");
        let c = load_str(&format!(
            r#"
listen: 127.0.0.1:9000
upstream:
  url: http://localhost:8081/
  api_key: upstream-secret
  connect_timeout: 2s
  first_byte_timeout: 3m
  idle_timeout: 1m
  total_timeout: 1h
default_model: qwen
models:
  - name: qwen3
    aliases: [qwen]
    upstream_name: /models/qwen3.gguf
  - name: small
keys:
  - id: alice
    sha256: {key}
    models: [qwen]
server:
  grace_period_seconds: 3
"#
        ))
        .unwrap();
        assert_eq!(c.listen, "127.0.0.1:9000");
        assert_eq!(c.upstream.servers[0].addr.port(), 8081);
        assert_eq!(c.upstream.first_byte_timeout, Duration::from_secs(180));
        assert_eq!(c.upstream.total_timeout, Some(Duration::from_secs(3600)));
        assert_eq!(c.catalogue.default_route().name, "qwen3");
        let alice = c.keys.authenticate(Some(b"Bearer sk-test")).unwrap();
        assert!(alice.allows("qwen3"));
        assert!(!alice.allows("small"));
        assert_eq!(c.server.grace_period_seconds, 3);
    }

    #[test]
    fn unknown_fields_are_rejected_with_their_path() {
        let e = load_str("upstream:\n  urll: http://x:1\n").unwrap_err();
        assert_eq!(e.path, "upstream.urll");
        assert!(e.message.contains("urll"), "{e}");
        let e = load_str("models:\n  - name: a\n    alias: [b]\n").unwrap_err();
        assert!(e.path.starts_with("models[0]"), "{e}");
        let e = load_str("listn: 1.2.3.4:5\n").unwrap_err();
        assert!(e.message.contains("listn"));
    }

    #[test]
    fn type_errors_name_the_path() {
        let e = load_str("upstream:\n  connect_timeout: soon\n").unwrap_err();
        assert_eq!(e.path, "upstream.connect_timeout");
        let e = load_str("limits:\n  max_body_bytes: lots\n").unwrap_err();
        assert_eq!(e.path, "limits.max_body_bytes");
    }

    #[test]
    fn semantic_errors_name_the_path() {
        let cases = [
            ("listen: nowhere\n", "listen"),
            ("upstream:\n  url: https://x:1\n", "upstream.url"),
            (
                "upstream:\n  url: http://127.0.0.1:8080/api\n",
                "upstream.url",
            ),
            (
                "upstream:\n  connect_timeout: 0s\n",
                "upstream.connect_timeout",
            ),
            ("models:\n  - name: a\n  - name: a\n", "models[1].name"),
            (
                "models:\n  - name: a\n    aliases: [a]\n",
                "models[0].aliases[0]",
            ),
            ("models:\n  - name: a\ndefault_model: b\n", "default_model"),
            ("keys:\n  - id: k\n    sha256: abc\n", "keys[0].sha256"),
            ("keys:\n  - id: 'bad id'\n    sha256: abc\n", "keys[0].id"),
            ("server:\n  pid_file: relative.pid\n", "server.pid_file"),
            ("limits:\n  max_body_bytes: 0\n", "limits.max_body_bytes"),
            ("server:\n  threads: 0\n", "server.threads"),
            ("metrics:\n  listen: nowhere\n", "metrics.listen"),
            ("metrics:\n  path: /v1/metrics\n", "metrics.path"),
            ("metrics:\n  bearer_token: 'a b'\n", "metrics.bearer_token"),
            ("keys:\n  - id: invalid\n    sha256: abc\n", "keys[0].id"),
            (
                "cors:\n  allowed_origins: ['https://a.example/path']\n",
                "cors.allowed_origins[0]",
            ),
        ];
        for (yaml, path) in cases {
            let e = load_str(yaml).unwrap_err();
            assert_eq!(e.path, path, "{yaml}: {e}");
        }
        let key = auth::digest_hex("x");
        let e = load_str(&format!(
            "keys:\n  - id: k\n    sha256: {key}\n    models: [nope]\n"
        ))
        .unwrap_err();
        assert_eq!(e.path, "keys[0].models[0]");
        let e = load_str(&format!(
            "keys:\n  - id: a\n    sha256: {key}\n  - id: b\n    sha256: {key}\n"
        ))
        .unwrap_err();
        assert_eq!(e.path, "keys[1].sha256");
    }

    #[test]
    fn seed_environment_works_without_a_file() {
        let env = |name: &str| match name {
            "LLAMA_BASE_URL" => Some("http://127.0.0.1:18080".to_string()),
            "DEFAULT_MODEL" => Some("qwen3-30b-a3b-instruct".to_string()),
            "API_KEYS" => Some("sk-local-abc, sk-two,".to_string()),
            _ => None,
        };
        let c = Config::load(None, &env).unwrap();
        assert_eq!(c.upstream.servers[0].addr.port(), 18080);
        assert_eq!(c.catalogue.default_route().name, "qwen3-30b-a3b-instruct");
        assert_eq!(
            c.keys
                .authenticate(Some(b"Bearer sk-local-abc"))
                .unwrap()
                .id,
            "env-1"
        );
        let two = c.keys.authenticate(Some(b"Bearer sk-two")).unwrap();
        assert_eq!(two.id, "env-2");
        assert!(two.allows("qwen3-30b-a3b-instruct"));
    }

    #[test]
    fn default_model_env_reuses_a_listed_alias() {
        let env = |name: &str| (name == "DEFAULT_MODEL").then(|| "q".to_string());
        let file = parse_yaml("models:\n  - name: qwen\n    aliases: [q]\n").unwrap();
        let c = apply_env(file, &env).validate().unwrap();
        assert_eq!(c.catalogue.routes().len(), 1);
        assert_eq!(c.catalogue.default_route().name, "qwen");
    }

    #[test]
    fn several_upstream_servers() {
        let c = load_str(
            "upstream:\n  api_key: shared\n  max_in_flight: 2\n  servers:\n    - name: gpu-a\n      url: http://127.0.0.1:8081\n    - url: http://127.0.0.1:8082\n      api_key: own\n      max_in_flight: 4\nmodels:\n  - name: big\n    upstreams: [gpu-a]\n  - name: small\n",
        )
        .unwrap();
        let s = &c.upstream.servers;
        assert_eq!(s.len(), 2);
        assert_eq!((s[0].name.as_str(), s[0].addr.port()), ("gpu-a", 8081));
        assert_eq!(s[0].api_key.as_deref(), Some("shared"));
        assert_eq!(s[0].max_in_flight, 2);
        assert_eq!(
            s[1].name, "127.0.0.1:8082",
            "unnamed servers are named by address"
        );
        assert_eq!(s[1].api_key.as_deref(), Some("own"));
        assert_eq!(s[1].max_in_flight, 4);
        assert_eq!(c.catalogue.resolve(Some("big")).unwrap().upstreams, vec![0]);
        assert!(c
            .catalogue
            .resolve(Some("small"))
            .unwrap()
            .upstreams
            .is_empty());
    }

    #[test]
    fn bad_upstream_servers_name_their_path() {
        for (yaml, path) in [
            (
                "upstream:\n  url: http://127.0.0.1:1\n  servers:\n    - url: http://127.0.0.1:2\n",
                "upstream.url",
            ),
            (
                "upstream:\n  servers:\n    - url: http://127.0.0.1:2\n    - url: https://127.0.0.1:3\n",
                "upstream.servers[1].url",
            ),
            (
                "upstream:\n  servers:\n    - {name: a, url: 'http://127.0.0.1:2'}\n    - {name: a, url: 'http://127.0.0.1:3'}\n",
                "upstream.servers[1].name",
            ),
            (
                "upstream:\n  servers:\n    - url: http://127.0.0.1:2\n    - url: http://127.0.0.1:2/\n",
                "upstream.servers[1].url",
            ),
            (
                "upstream:\n  servers:\n    - {name: a, url: 'http://127.0.0.1:2', port: 3}\n",
                "upstream.servers[0].port",
            ),
            (
                "upstream:\n  servers:\n    - {name: a, url: 'http://127.0.0.1:2'}\nmodels:\n  - name: m\n    upstreams: [b]\n",
                "models[0].upstreams[0]",
            ),
            ("upstream:\n  health_interval: 0s\n", "upstream.health_interval"),
        ] {
            let e = load_str(yaml).unwrap_err();
            assert_eq!(e.path, path, "{yaml}: {e}");
        }
    }

    #[test]
    fn key_limits() {
        let key = auth::digest_hex("k");
        let c = load_str(&format!(
            "keys:\n  - id: a\n    sha256: {key}\n    limits:\n      requests_per_minute: 60\n      max_tokens: 512\n      over_max_tokens: reject\nupstream:\n  max_in_flight: 4\n"
        ))
        .unwrap();
        assert_eq!(c.key_limits[0].0, "a");
        assert_eq!(c.key_limits[0].1.requests_per_minute, Some(60));
        assert_eq!(c.key_limits[0].1.over_max_tokens, OverMaxTokens::Reject);
        assert_eq!(c.upstream.servers[0].max_in_flight, 4);
        let e = load_str(&format!(
            "keys:\n  - id: a\n    sha256: {key}\n    limits:\n      max_tokens: 0\n"
        ))
        .unwrap_err();
        assert_eq!(e.path, "keys[0].limits.max_tokens");
        let e = load_str(&format!(
            "keys:\n  - id: a\n    sha256: {key}\n    limits:\n      over_max_tokens: truncate\n"
        ))
        .unwrap_err();
        assert!(e.path.starts_with("keys[0].limits"), "{e}");
    }

    #[test]
    fn empty_file_means_defaults() {
        let c = load_str("").unwrap();
        assert_eq!(c.listen, DEFAULT_LISTEN);
    }
}
