//! Builds and runs the Pingora server from a validated [`Config`].

use pingora_core::server::configuration::{Opt, ServerConf};
use pingora_core::server::Server;

use crate::config::Config;
use crate::metrics_app::MetricsApp;
use crate::proxy::GatewayProxy;
use crate::state::GatewayState;

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
    let opt = Opt {
        upgrade,
        daemon,
        ..Opt::default()
    };
    let mut server = Server::new_with_opt_and_conf(opt, server_conf(&cfg, daemon));
    server.bootstrap();
    let listen = cfg.listen.clone();
    if cfg.keys.is_empty() && !cfg.keys.allows_anonymous() {
        log::warn!("no API keys are configured: every /v1 request will be refused with 401; set API_KEYS or add keys to the config");
    }
    log::info!(
        "llm-edge {} listening on {listen}, upstream http://{}",
        env!("CARGO_PKG_VERSION"),
        cfg.upstream.authority
    );
    let metrics_listen = cfg.metrics.listen.clone();
    let state = GatewayState::new(cfg);
    let proxy = GatewayProxy::new(state.clone());
    let mut service =
        pingora_proxy::http_proxy_service_with_name(&server.configuration, proxy, "llm-edge");
    service.add_tcp(&listen);
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
    server.run_forever()
}
