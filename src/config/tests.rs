//! The configuration's unit tests: the file, the environment and validation
//! end to end (`load_str` parses, applies an empty environment, validates).

use std::time::Duration;

use super::*;
use crate::policy::auth;
use crate::policy::limits::OverMaxTokens;

fn no_env(_: &str) -> Option<String> {
    None
}

fn load_str(yaml: &str) -> Result<Config, ConfigError> {
    apply_env(parse_yaml(yaml)?, &no_env).validate()
}

#[test]
fn defaults_listen_on_loopback_8000_and_forward_to_8080() {
    let c = Config::load(None, &no_env).unwrap();
    assert_eq!(c.listen, "127.0.0.1:8000");
    assert_eq!(
        c.upstream.servers[0].addr,
        "127.0.0.1:8080".parse().unwrap()
    );
    assert_eq!(c.catalogue.default_route().name.as_ref(), "local");
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
    assert_eq!(
        c.catalogue.default_route().name.as_ref(),
        "qwen3-30b-a3b-instruct"
    );
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
    assert_eq!(c.catalogue.default_route().name.as_ref(), "qwen3");
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
    assert_eq!(
        c.catalogue.default_route().name.as_ref(),
        "qwen3-30b-a3b-instruct"
    );
    assert_eq!(
        c.keys
            .authenticate(Some(b"Bearer sk-local-abc"))
            .unwrap()
            .id
            .as_ref(),
        "env-1"
    );
    let two = c.keys.authenticate(Some(b"Bearer sk-two")).unwrap();
    assert_eq!(&*two.id, "env-2");
    assert!(two.allows("qwen3-30b-a3b-instruct"));
}

#[test]
fn default_model_env_reuses_a_listed_alias() {
    let env = |name: &str| (name == "DEFAULT_MODEL").then(|| "q".to_string());
    let file = parse_yaml("models:\n  - name: qwen\n    aliases: [q]\n").unwrap();
    let c = apply_env(file, &env).validate().unwrap();
    assert_eq!(c.catalogue.routes().len(), 1);
    assert_eq!(c.catalogue.default_route().name.as_ref(), "qwen");
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
    assert_eq!(s[0].api_key.as_ref().map(Secret::expose), Some("shared"));
    assert_eq!(s[0].max_in_flight, 2);
    assert_eq!(
        s[1].name, "127.0.0.1:8082",
        "unnamed servers are named by address"
    );
    assert_eq!(s[1].api_key.as_ref().map(Secret::expose), Some("own"));
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
        ("upstream:\n  routing: round_robin\n", "upstream.routing"),
        ("upstream:\n  affinity:\n    load_factor: -1\n", "upstream.affinity.load_factor"),
        ("upstream:\n  affinity:\n    key_header: 'x y'\n", "upstream.affinity.key_header"),
        ("upstream:\n  affinity:\n    epsilon: 1\n", "upstream.affinity.epsilon"),
        (
            "upstream:\n  servers:\n    - {name: a, url: 'http://127.0.0.1:2', context: 0}\n",
            "upstream.servers[0].context",
        ),
    ] {
        let e = load_str(yaml).unwrap_err();
        assert_eq!(e.path, path, "{yaml}: {e}");
    }
}

#[test]
fn routing_defaults_to_affinity_with_several_servers() {
    use crate::config::Routing;
    let one = load_str("upstream:\n  url: http://127.0.0.1:2\n").unwrap();
    assert_eq!(one.upstream.routing, Routing::LeastLoad);
    let two = "upstream:\n  max_in_flight: 2\n  servers:\n    - {name: a, url: 'http://127.0.0.1:2', context: 4096}\n    - {name: b, url: 'http://127.0.0.1:3'}\n";
    let c = load_str(two).unwrap();
    assert_eq!(c.upstream.routing, Routing::CacheAffinity);
    assert_eq!(c.upstream.load_factor, 0.25);
    assert_eq!(c.upstream.affinity_header.as_deref(), Some("x-session-id"));
    assert_eq!(c.upstream.servers[0].context, 4096);
    assert_eq!(c.upstream.servers[1].context, 2 * 8192);
    let c = load_str(&format!(
        "{two}  routing: least_load\n  affinity:\n    load_factor: 0.5\n    key_header: ''\n"
    ))
    .unwrap();
    assert_eq!(c.upstream.routing, Routing::LeastLoad);
    assert_eq!(c.upstream.load_factor, 0.5);
    assert_eq!(c.upstream.affinity_header, None);
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

#[test]
fn secrets_never_print() {
    let (shared, own, token) = (
        "sk-shared-upstream-7f3a",
        "sk-own-server-9c1e",
        "scrape-token-4b2d",
    );
    let yaml = format!(
        "upstream:\n  api_key: {shared}\n  servers:\n    - url: http://127.0.0.1:8081\n      api_key: {own}\n    - url: http://127.0.0.1:8082\nmetrics:\n  bearer_token: {token}\n"
    );
    let file = parse_yaml(&yaml).unwrap();
    let file_debug = format!("{file:?}");
    let c = apply_env(file, &no_env).validate().unwrap();
    let s = &c.upstream.servers;
    assert_eq!(s[0].api_key.as_ref().map(Secret::expose), Some(own));
    assert_eq!(s[1].api_key.as_ref().map(Secret::expose), Some(shared));
    assert_eq!(
        c.metrics.bearer_token.as_ref().map(Secret::expose),
        Some(token)
    );
    for shown in [
        file_debug,
        format!("{c:?}"),
        format!("{c:#?}"),
        format!("{:?}", c.upstream),
        format!("{:?}", c.metrics),
    ] {
        for secret in [shared, own, token] {
            assert!(!shown.contains(secret), "{secret} printed in {shown}");
        }
        assert!(shown.contains("Secret(\"***\")"), "{shown}");
    }
    let secret = Secret::new(own);
    assert_eq!(format!("{secret}"), "***");
    assert_eq!(format!("{secret:?}"), "Secret(\"***\")");
    assert_eq!(secret.expose(), own);
}

#[test]
fn documented_example_keys_are_refused_naming_the_key() {
    for example in auth::EXAMPLE_KEYS {
        let e = load_str(&format!(
            "keys:\n  - id: mine\n    sha256: {}\n",
            auth::digest_hex(example)
        ))
        .unwrap_err();
        assert_eq!(e.path, "keys[0].sha256");
        assert!(
            e.message.contains("'mine'") && e.message.contains("gen-key"),
            "{e}"
        );
    }
    let env = |name: &str| (name == "API_KEYS").then(|| "sk-change-me".to_string());
    let e = Config::load(None, &env).unwrap_err();
    assert!(e.message.contains("'env-1'"), "{e}");
}

#[test]
fn placeholder_keys_from_the_environment_are_warned_about_by_id() {
    let keys =
        "sk-edge-0123456789abcdef0123456789abcdef, short, sk-please-CHANGE-ME-before-production";
    let env = |name: &str| (name == "API_KEYS").then(|| keys.to_string());
    let c = Config::load(None, &env).unwrap();
    let warnings = c.startup_warnings();
    assert_eq!(warnings.len(), 2, "{warnings:?}");
    assert!(warnings[0].contains("env-2") && warnings[0].contains("shorter than 24"));
    assert!(warnings[1].contains("env-3") && warnings[1].contains("placeholder word"));
    assert!(!warnings
        .iter()
        .any(|w| w.contains("short,") || w.contains("CHANGE")));
}

#[test]
fn listen_comes_from_the_environment_and_anonymous_on_it_is_warned_about() {
    let env = |name: &str| (name == "LISTEN").then(|| " 0.0.0.0:9000 ".to_string());
    let file = parse_yaml("allow_anonymous: true\n").unwrap();
    let mut c = apply_env(file, &env).validate().unwrap();
    assert_eq!(c.listen, "0.0.0.0:9000");
    let warnings = c.startup_warnings();
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("allow_anonymous") && w.contains("0.0.0.0:9000")),
        "{warnings:?}"
    );
    c.set_listen("[::1]:9000").unwrap();
    assert!(
        c.startup_warnings().is_empty(),
        "{:?}",
        c.startup_warnings()
    );
    let none = load_str("").unwrap();
    assert!(none.startup_warnings()[0].contains("no API keys"));
}

#[test]
fn access_log_format() {
    use crate::logging::AccessLogFormat;
    assert_eq!(
        load_str("").unwrap().logging.access_log_format,
        AccessLogFormat::Text
    );
    let cfg = load_str("logging:\n  access_log_format: json\n").unwrap();
    assert_eq!(cfg.logging.access_log_format, AccessLogFormat::Json);
    let e = load_str("logging:\n  access_log_format: xml\n").unwrap_err();
    assert_eq!(e.path, "logging.access_log_format");
    assert!(
        e.message.contains("text") && e.message.contains("json"),
        "{e}"
    );
    let e = load_str("logging:\n  format: json\n").unwrap_err();
    assert_eq!(e.path, "logging.format");
}

#[test]
fn systemds_state_directory_is_the_ledgers_unless_the_file_says_otherwise() {
    let env = |name: &str| {
        (name == "STATE_DIRECTORY").then(|| "/var/lib/llm-edge:/var/lib/other".to_string())
    };
    let c = apply_env(parse_yaml("").unwrap(), &env).validate().unwrap();
    assert_eq!(
        c.state_dir.as_deref(),
        Some(std::path::Path::new("/var/lib/llm-edge"))
    );
    let c = apply_env(parse_yaml("state_dir: /srv/usage\n").unwrap(), &env)
        .validate()
        .unwrap();
    assert_eq!(
        c.state_dir.as_deref(),
        Some(std::path::Path::new("/srv/usage"))
    );
    let e = load_str("state_dir: relative/dir\n").unwrap_err();
    assert_eq!(e.path, "state_dir");
    let e = load_str("ledger:\n  flush_interval: 1h\n").unwrap_err();
    assert_eq!(e.path, "ledger.flush_interval");
}

#[test]
fn the_shared_store_is_optional_and_checked_with_its_path_named() {
    assert!(load_str("").unwrap().shared.is_none());
    let c = load_str("state:\n  redis: redis://:pw@10.0.0.5:6379/2\n").unwrap();
    let s = c.shared.expect("shared");
    assert_eq!(s.url.expose(), "redis://:pw@10.0.0.5:6379/2");
    assert_eq!(s.on_error, crate::policy::limits::OnStoreError::Local);
    assert_eq!(s.expected_edges, 2);
    assert_eq!(s.timeout, Duration::from_millis(100));
    assert!(
        !format!("{s:?}").contains("pw"),
        "the password never prints"
    );
    let c = load_str(
        "state:\n  redis: rediss://valkey.internal:6380\n  on_error: deny\n  expected_edges: 3\n  timeout: 50ms\n  lease_ttl: 10s\n",
    )
    .unwrap();
    let s = c.shared.unwrap();
    assert_eq!(s.on_error, crate::policy::limits::OnStoreError::Deny);
    assert_eq!(
        (s.expected_edges, s.lease_ttl),
        (3, Duration::from_secs(10))
    );
    for (yaml, path) in [
        ("state:\n  redis: http://x:6379\n", "state.redis"),
        (
            "state:\n  redis: redis://h\n  expected_edges: 0\n",
            "state.expected_edges",
        ),
        (
            "state:\n  redis: redis://h\n  timeout: 30s\n",
            "state.timeout",
        ),
        (
            "state:\n  redis: redis://h\n  lease_ttl: 100ms\n",
            "state.lease_ttl",
        ),
        ("state:\n  redis: redis://h\n  prefix: ''\n", "state.prefix"),
        (
            "state:\n  redis: redis://h\n  on_error: retry\n",
            "state.on_error",
        ),
        ("state:\n  redis: redis://h\n  cluster: true\n", "state"),
        ("server:\n  drain_delay: 1h\n", "server.drain_delay"),
    ] {
        let e = load_str(yaml).unwrap_err();
        assert!(
            e.path.starts_with(path),
            "{yaml}: {} ({})",
            e.path,
            e.message
        );
    }
}

#[test]
fn an_edges_share_of_the_limits_rounds_up_and_never_reaches_zero() {
    use crate::policy::limits::KeyLimits;
    use crate::policy::tokens::TokenLimits;
    let l = KeyLimits {
        requests_per_minute: Some(60),
        max_concurrent: Some(3),
        max_tokens: Some(500),
        tokens: TokenLimits {
            per_minute: Some(1001),
            per_day: None,
            per_month: Some(1),
        },
        ..KeyLimits::default()
    };
    let s = l.scaled(2);
    assert_eq!(s.requests_per_minute, Some(30));
    assert_eq!(s.max_concurrent, Some(2));
    assert_eq!(
        s.max_tokens,
        Some(500),
        "a per-request ceiling is not shared"
    );
    assert_eq!(s.tokens.per_minute, Some(501));
    assert_eq!((s.tokens.per_day, s.tokens.per_month), (None, Some(1)));
    assert_eq!(l.scaled(1), l);
}
