//! The file, as written by the operator: one serde struct per section, with
//! `deny_unknown_fields` and the defaults of every key, and [`parse_yaml`].
//!
//! Owns the config keys and their defaults, nothing else: it must not import
//! the runtime types or the validation (a section is checked in
//! `validate`, not here), nor anything outside `config` except the few
//! policy enums that appear verbatim in the file.

use std::time::Duration;

use serde::Deserialize;

use super::{err, ConfigError, Secret, DEFAULT_LISTEN, DEFAULT_METRICS_LISTEN};
use crate::logging::AccessLogFormat;
use crate::policy::limits::OverMaxTokens;

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
    pub logging: LoggingSection,
    /// Where the usage ledger lives (`usage.sqlite3`); none: in memory only.
    pub state_dir: Option<std::path::PathBuf>,
    pub ledger: LedgerSection,
    /// The optional shared state of several edges (Redis / Valkey).
    pub state: StateSection,
}

/// What several edges share through Redis or Valkey: per-key limits, token
/// budgets and quotas, upstream slots. Without `redis`, nothing is shared.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StateSection {
    /// `redis://[user:password@]host:port/db` or `rediss://` (TLS).
    pub redis: Option<Secret>,
    /// When the store cannot answer: `local` (each edge's own limits
    /// divided by `expected_edges`) or `deny` (503).
    pub on_error: crate::policy::limits::OnStoreError,
    pub expected_edges: u32,
    /// The longest a request waits on the store before `on_error` applies.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// How long a lease (a concurrent request, an upstream slot) outlives
    /// the edge that holds it; renewed every third of it while in use.
    #[serde(with = "humantime_serde")]
    pub lease_ttl: Duration,
    /// Prefix of every key the edges write (several fleets on one store).
    pub prefix: String,
}

impl Default for StateSection {
    fn default() -> Self {
        StateSection {
            redis: None,
            on_error: Default::default(),
            expected_edges: 2,
            timeout: Duration::from_millis(100),
            lease_ttl: Duration::from_secs(30),
            prefix: "llm-edge".into(),
        }
    }
}

/// The usage ledger's write-behind: aggregated in memory, written every
/// `flush_interval` and at shutdown.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LedgerSection {
    #[serde(with = "humantime_serde")]
    pub flush_interval: Duration,
}

impl Default for LedgerSection {
    fn default() -> Self {
        LedgerSection {
            flush_interval: Duration::from_secs(5),
        }
    }
}

/// The process's own log (stderr).
#[derive(Debug, Clone, Copy, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoggingSection {
    /// `text` (one `key=value` line) or `json` (one JSON object per line,
    /// for log pipelines) for the access log.
    pub access_log_format: AccessLogFormat,
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
            state_dir: None,
            ledger: LedgerSection::default(),
            state: StateSection::default(),
            logging: LoggingSection::default(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamSection {
    /// One llama-server (the default, `http://127.0.0.1:8080`); or `servers`.
    pub url: Option<String>,
    pub api_key: Option<Secret>,
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
    /// `least_load` or `cache_affinity`; default: affinity with several servers.
    pub routing: Option<Routing>,
    pub affinity: AffinitySection,
}

/// `upstream.routing`: how a request's server is chosen among several.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Routing {
    LeastLoad,
    CacheAffinity,
}

/// `upstream.affinity`: the knobs of cache-affinity routing.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AffinitySection {
    /// ε: a server with the prompt keeps it while one more request leaves
    /// it within `(1 + ε)` times its share of the load.
    pub load_factor: f64,
    /// A request header naming the session (its value is an explicit key);
    /// empty: none.
    pub key_header: String,
}

impl Default for AffinitySection {
    fn default() -> Self {
        AffinitySection {
            load_factor: 0.25,
            key_header: "x-session-id".into(),
        }
    }
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
            routing: None,
            affinity: AffinitySection::default(),
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
    pub api_key: Option<Secret>,
    pub max_in_flight: Option<usize>,
    /// Its context in tokens (llama-server's `-c`, all slots together):
    /// sizes its prefix index.
    pub context: Option<u64>,
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
    /// Prompt and completion tokens per minute (reserved, then settled).
    pub tokens_per_minute: Option<u64>,
    /// Quotas per UTC calendar day and month.
    pub tokens_per_day: Option<u64>,
    pub tokens_per_month: Option<u64>,
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
    pub bearer_token: Option<Secret>,
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
    /// On SIGTERM, how long `/health` answers 503 (`draining`) while the
    /// edge still accepts, so a load balancer's health check takes it out
    /// before it stops accepting. 0: stop accepting at once.
    #[serde(with = "humantime_serde")]
    pub drain_delay: Duration,
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
            drain_delay: Duration::ZERO,
        }
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
