//! Builds and runs the Pingora server from a validated [`Config`], and keeps
//! "a running process" meaning "a serving gateway": a listener that cannot be
//! bound ends the process with its address and reason, a stop or hand-over
//! ends it as soon as nothing is in flight (the grace period is only the upper
//! bound for streams still running), and SIGHUP is logged, not fatal.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora_core::apps::{HttpServerApp, ServerApp};
use pingora_core::protocols::http::ServerSession;
use pingora_core::protocols::{Stream, ALPN};
use pingora_core::server::configuration::{Opt, ServerConf};
use pingora_core::server::{Server, ShutdownWatch};
use pingora_proxy::HttpProxy;

use crate::config::Config;
use crate::gateway::GatewayProxy;
use crate::metrics::app::MetricsApp;
use crate::state::GatewayState;
use crate::upstream::balance::HealthChecker;

fn server_conf(cfg: &Config, daemon: bool) -> ServerConf {
    let s = &cfg.server;
    ServerConf {
        daemon,
        threads: s.threads,
        pid_file: s.pid_file.clone(),
        upgrade_sock: s.upgrade_sock.clone(),
        error_log: s.error_log.clone(),
        grace_period_seconds: Some(s.grace_period_seconds),
        graceful_shutdown_timeout_seconds: Some(s.graceful_shutdown_timeout_seconds),
        ..ServerConf::default()
    }
}

/// Serves until stopped (SIGTERM/SIGINT) or upgraded away (SIGQUIT); never returns.
pub fn run(cfg: Config, upgrade: bool, daemon: bool) -> ! {
    crate::logging::set_access_log_format(cfg.logging.access_log_format);
    // On an upgrade the old process still holds the ports and hands them over.
    if !upgrade {
        let mut addrs = vec![("listen", cfg.listen.as_str())];
        if let Some(tls) = &cfg.tls {
            addrs.push(("tls.listen", tls.listen.as_str()));
        }
        if let Some(m) = &cfg.metrics.listen {
            addrs.push(("metrics.listen", m.as_str()));
        }
        for (what, addr) in addrs {
            if let Err(e) = std::net::TcpListener::bind(addr) {
                log::error!("cannot listen on {addr} ({what}): {e}; is another process (an older llm-edge?) using it?");
                eprintln!("llm-edge: cannot listen on {addr} ({what}): {e}");
                std::process::exit(1);
            }
        }
    }
    let opt = Opt {
        upgrade,
        daemon,
        ..Opt::default()
    };
    let mut server = Server::new_with_opt_and_conf(opt, server_conf(&cfg, daemon));
    server.bootstrap();
    let listen = cfg.listen.clone();
    for warning in cfg.startup_warnings() {
        log::warn!("{warning}");
    }
    let upstreams: Vec<String> = cfg
        .upstream
        .servers
        .iter()
        .map(|s| format!("http://{}", s.authority))
        .collect();
    log::info!(
        "llm-edge {} listening on {listen}, upstream {}",
        env!("CARGO_PKG_VERSION"),
        upstreams.join(", ")
    );
    let metrics_listen = cfg.metrics.listen.clone();
    let state = match GatewayState::new(cfg) {
        Ok(state) => state,
        Err(e) => {
            log::error!("usage ledger: {e}");
            eprintln!("llm-edge: usage ledger: {e}");
            std::process::exit(1);
        }
    };
    state.publish_quota_use();
    match state.ledger.path() {
        Some(path) => log::info!("usage ledger in {}", path.display()),
        None => log::info!("usage ledger in memory only (no state_dir): usage and quotas start from zero on every start"),
    }
    let proxy = GatewayProxy::new(state.clone());
    let app = EdgeApp {
        proxy: Arc::new(pingora_proxy::http_proxy(&server.configuration, proxy)),
        read_timeout: state.cfg.downstream.read_timeout,
    };
    let mut service = pingora_core::services::listening::Service::new("llm-edge".into(), app);
    // No L4 read buffer on the plain-TCP listener: Pingora would otherwise
    // allocate (and zero) a 64 KiB `BufReader` per accepted connection and keep
    // it for the connection's life, about 8.6 KiB of touched RSS per open stream.
    // The HTTP/1 parser reads into its own buffer anyway. The write side keeps
    // Pingora's default (one MSS). The TLS listener below keeps the default read
    // buffer, which helps rustls' record-sized reads.
    service.add_listener(
        pingora_core::listeners::ListenerConfig::tcp(listen.as_str()).l4_buffer(
            pingora_core::listeners::L4BufferSettings::new(
                0,
                pingora_core::listeners::DEFAULT_L4_WRITE_BUFFER_SIZE,
            ),
        ),
    );
    if let Some(tls) = &state.cfg.tls {
        // Certificate files were checked by validation; they are read again on every start and upgrade.
        let mut settings =
            match pingora_core::listeners::tls::TlsSettings::intermediate(&tls.cert, &tls.key) {
                Ok(settings) => settings,
                Err(e) => {
                    log::error!("tls: cannot use {} / {}: {e}", tls.cert, tls.key);
                    std::process::exit(2);
                }
            };
        if tls.http2 {
            settings.enable_h2();
        }
        log::info!(
            "TLS on {}{}",
            tls.listen,
            if tls.http2 {
                " (HTTP/2 and HTTP/1.1)"
            } else {
                ""
            }
        );
        service.add_tls_with_settings(&tls.listen, None, settings);
    }
    server.add_service(service);
    server.add_service(pingora_core::services::background::background_service(
        "lifecycle",
        Lifecycle {
            state: state.clone(),
        },
    ));
    if let Some(store) = &state.shared {
        server.add_service(pingora_core::services::background::background_service(
            "shared state",
            SharedStateService {
                store: store.clone(),
            },
        ));
    }
    let drain_state = state.clone();
    server.add_service(pingora_core::services::background::background_service(
        "usage ledger",
        LedgerFlusher {
            state: state.clone(),
        },
    ));
    if !state.upstream.is_single() {
        server.add_service(pingora_core::services::background::background_service(
            "upstream health checks",
            HealthChecker {
                set: state.upstream.clone(),
                interval: state.cfg.upstream.health_interval,
            },
        ));
    }
    if let Some(metrics_listen) = metrics_listen {
        log::info!(
            "metrics on http://{metrics_listen}{}",
            state.cfg.metrics.path
        );
        let mut metrics_service = pingora_core::services::listening::Service::new(
            "llm-edge metrics".into(),
            MetricsApp { state },
        );
        metrics_service.add_tcp(&metrics_listen);
        server.add_service(metrics_service);
    }
    let drain = DrainFirst { state: drain_state };
    server.run(pingora_core::server::RunArgs {
        shutdown_signal: Box::new(drain),
    });
    std::process::exit(0)
}

/// Pingora's own signal handling, except that a stop (SIGTERM) first marks
/// the edge draining (`/health` answers 503) for `server.drain_delay` while
/// it still accepts, so a load balancer checking `/health` moves new
/// requests to the other edges before this one stops accepting. A reload
/// (SIGQUIT) hands the listening sockets over at once: nothing is refused.
struct DrainFirst {
    state: Arc<GatewayState>,
}

#[async_trait]
impl pingora_core::server::ShutdownSignalWatch for DrainFirst {
    async fn recv(&self) -> pingora_core::server::ShutdownSignal {
        use pingora_core::server::ShutdownSignal;
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut quit), Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::quit()),
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            log::error!("cannot watch the stop and reload signals");
            return std::future::pending().await;
        };
        let delay = self.state.cfg.server.drain_delay;
        tokio::select! {
            // Not draining: the new process answers on the same sockets.
            _ = quit.recv() => ShutdownSignal::GracefulUpgrade,
            _ = term.recv() => {
                self.state.draining.store(true, std::sync::atomic::Ordering::Relaxed);
                if !delay.is_zero() {
                    log::info!("draining: /health answers 503 for {} before the listeners close (server.drain_delay)", humantime::format_duration(delay));
                    tokio::time::sleep(delay).await;
                }
                ShutdownSignal::GracefulTerminate
            }
            _ = int.recv() => ShutdownSignal::FastShutdown,
        }
    }
}

/// Logs SIGHUP instead of dying of it, and ends the process as soon as a
/// stop (SIGTERM, SIGINT) or a hand-over (SIGQUIT, after the sockets went to
/// the new process) leaves no request in flight. Pingora alone would sleep
/// the whole `grace_period_seconds` first, refusing connections all along.
struct Lifecycle {
    state: Arc<GatewayState>,
}

#[async_trait]
impl pingora_core::services::background::BackgroundService for Lifecycle {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        use tokio::signal::unix::{signal, SignalKind};
        let mut hup = signal(SignalKind::hangup()).ok();
        loop {
            tokio::select! {
                _ = shutdown.changed() => break,
                Some(()) = async { match hup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => {
                    log::warn!("SIGHUP ignored: to reload, run `systemctl reload llm-edge` (validates the config, then hands the sockets to a new process with --upgrade); see the README");
                }
            }
        }
        // Two quiet readings in a row: a request between accept and its
        // first phase is not counted yet, so give it a moment to show up.
        let mut quiet = 0;
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if self.state.metrics.requests_in_flight() > 0 {
                quiet = 0;
                continue;
            }
            quiet += 1;
            if quiet >= 2 {
                log::info!("stopping: no request in flight");
                push_fleet_usage(&self.state).await;
                if let Err(e) = self.state.ledger.flush() {
                    log::error!("usage ledger: the last flush failed ({e}); up to one flush interval of usage is lost");
                }
                // Only our own: after a hand-over the new process has
                // written its pid to the same file.
                let pid_file = &self.state.cfg.server.pid_file;
                let ours = std::fs::read_to_string(pid_file)
                    .is_ok_and(|p| p.trim() == std::process::id().to_string());
                if ours {
                    let _ = std::fs::remove_file(pid_file);
                }
                log::logger().flush();
                std::process::exit(0);
            }
        }
    }
}

/// Checks the shared store every 500 ms (a store that came back is used
/// again without a restart) and renews the leases of requests in flight.
struct SharedStateService {
    store: Arc<crate::shared::SharedState>,
}

#[async_trait]
impl pingora_core::services::background::BackgroundService for SharedStateService {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        tokio::select! {
            _ = shutdown.changed() => {}
            () = self.store.clone().run(Duration::from_millis(500)) => {}
        }
    }
}

/// Writes the usage ledger every `ledger.flush_interval` (the request path
/// only adds to memory). The lifecycle flushes once more at exit.
struct LedgerFlusher {
    state: Arc<GatewayState>,
}

#[async_trait]
impl pingora_core::services::background::BackgroundService for LedgerFlusher {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut interval = self.state.cfg.ledger_flush_interval;
        let mut stopping = false;
        loop {
            tokio::select! {
                // Stopping: the process may end at any moment once the grace
                // period is over (Pingora exits on its own), so flush often.
                _ = shutdown.changed(), if !stopping => {
                    stopping = true;
                    interval = interval.min(Duration::from_millis(250));
                }
                _ = tokio::time::sleep(interval) => {}
            }
            push_fleet_usage(&self.state).await;
            let state = self.state.clone();
            let flushed = tokio::task::spawn_blocking(move || {
                let flushed = state.ledger.flush();
                state.publish_quota_use();
                flushed
            })
            .await;
            if let Ok(Err(e)) = flushed {
                log::warn!(
                    "usage ledger: cannot write ({e}); kept in memory, retrying in {}",
                    humantime::format_duration(interval)
                );
            }
        }
    }
}

/// With `state.redis`: adds what this edge recorded since the last flush to
/// the fleet's ledger; kept for the next flush when the store is away.
async fn push_fleet_usage(state: &GatewayState) {
    let Some(store) = &state.shared else {
        return;
    };
    if let Err(e) = store.add_usage(|| state.ledger.take_fleet_rows()).await {
        log::warn!(
            "fleet usage ledger: cannot write ({}); kept for the next flush",
            e.0
        );
    }
}

/// Pingora's proxy app, with `downstream.read_timeout` applied while the
/// first request header of a new HTTP/1 connection is read.
///
/// Pingora 0.9.1 reads that header under its built-in 60 s keep-alive timer
/// (per read), before any `ProxyHttp` phase can set a timeout, so a client
/// that sent part of a header and went quiet (slowloris) held its connection
/// for a minute whatever the config said. Later requests on a kept-alive
/// connection still wait under `downstream.keepalive_timeout`; HTTP/2 (TLS
/// with ALPN h2) goes through Pingora's own path unchanged.
struct EdgeApp {
    proxy: Arc<HttpProxy<GatewayProxy>>,
    read_timeout: Duration,
}

#[async_trait]
impl ServerApp for EdgeApp {
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        if !matches!(stream.selected_alpn_proto(), None | Some(ALPN::H1)) {
            return ServerApp::process_new(&self.proxy, stream, shutdown).await;
        }
        // Pingora's own HTTP/1 loop (its `ServerApp` for HTTP apps), except
        // that the first header is read under `read_timeout` (keep-alive off
        // until `early_request_filter` sets it) instead of a fixed 60 s.
        let mut session = ServerSession::new_http1(stream);
        session.set_keepalive(None);
        session.set_read_timeout(Some(self.read_timeout));
        session.set_keepalive_reuses_remaining(
            self.proxy
                .server_options()
                .and_then(|o| o.keepalive_request_limit),
        );
        let mut result = self.proxy.process_new_http(session, shutdown).await;
        while let Some((stream, persistent)) = result.map(|r| r.consume()) {
            let mut session = ServerSession::new_http1(stream);
            if let Some(persistent) = persistent {
                persistent.apply_to_session(&mut session);
            }
            result = self.proxy.process_new_http(session, shutdown).await;
        }
        None
    }

    async fn cleanup(&self) {
        self.proxy.http_cleanup().await;
    }
}
