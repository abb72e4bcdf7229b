//! The validated configuration the gateway runs on: immutable, built only
//! by `validate`, read by the gateway, the upstream set and metrics.
//!
//! Plain data: it must not import the file schema's parsing, the
//! environment or the validation. (It reuses the file's `ServerSection`
//! and `LoggingSection` as they are, since they need no conversion.)

use std::net::SocketAddr;
use std::time::Duration;

use super::schema::{LoggingSection, ServerSection};
use super::secret::Secret;
use crate::openai::models::Catalogue;
use crate::policy::auth::KeyTable;
use crate::policy::clients::ClientPolicy;
use crate::policy::cors::CorsPolicy;
use crate::policy::limits::KeyLimits;
use crate::policy::routes::RouteTable;

/// One llama-server.
#[derive(Debug, Clone)]
pub struct UpstreamServer {
    /// Its name in metrics and messages: `upstream.servers[i].name`, or
    /// `host:port` when there is only `upstream.url`.
    pub name: String,
    /// `host:port` as configured, for messages and the `Host` header.
    pub authority: String,
    pub addr: SocketAddr,
    pub api_key: Option<Secret>,
    /// Requests allowed at this server at once (its slots); 0: no limit.
    pub max_in_flight: usize,
    /// Its context in tokens (`-c`, all slots), for the prefix index.
    pub context: u64,
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
    pub routing: Routing,
    /// ε of bounded load (`upstream.affinity.load_factor`).
    pub load_factor: f64,
    /// The session header (lower case), if any.
    pub affinity_header: Option<String>,
}

pub use crate::config::schema::Routing;

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
    pub bearer_token: Option<Secret>,
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
    /// Found while loading (the environment's keys); logged at start-up
    /// with [`Config::startup_warnings`].
    pub warnings: Vec<String>,
    /// The usage ledger's directory (none: usage lives in memory only).
    pub state_dir: Option<std::path::PathBuf>,
    pub ledger_flush_interval: std::time::Duration,
    pub logging: LoggingSection,
    /// The shared store of several edges; `None`: this edge alone.
    pub shared: Option<SharedConfig>,
}

/// `state`, validated: present only with `state.redis`.
#[derive(Debug, Clone)]
pub struct SharedConfig {
    pub url: super::Secret,
    pub on_error: crate::policy::limits::OnStoreError,
    pub expected_edges: u32,
    pub timeout: std::time::Duration,
    pub lease_ttl: std::time::Duration,
    pub prefix: String,
}

/// The optional TLS listener (rustls; HTTP/2 over ALPN when `http2`).
#[derive(Debug, Clone)]
pub struct TlsConfig {
    pub listen: String,
    pub cert: String,
    pub key: String,
    pub http2: bool,
}
