//! `/health/upstream`: every server's state, without a key.

use pingora_error::Result;
use pingora_proxy::Session;
use serde_json::json;

use super::ctx::RequestCtx;
use super::GatewayProxy;
use crate::errors::{ApiError, GatewayError};
use crate::upstream::client::HealthReport;

/// A server's state in `/health/upstream`, and what it said.
pub(super) fn health_words(report: &HealthReport) -> (&'static str, Option<&str>) {
    match report {
        HealthReport::Healthy => ("ok", None),
        HealthReport::Loading(d) => ("loading", Some(d)),
        HealthReport::Unhealthy(d) => ("unhealthy", Some(d)),
        HealthReport::Unreachable(d) => ("unreachable", Some(d)),
    }
}

impl GatewayProxy {
    /// Every server's health. 200 while at least one is up (`degraded`
    /// when some are not), else 503 with each server's state.
    pub(super) async fn upstream_health(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<(), GatewayError> {
        let set = &self.state.upstream;
        // With several servers, the health checker's last findings: this
        // path needs no key, and must not open a connection to every server
        // per call. A lone server is probed now, as before.
        let cached = (!set.is_single()).then(|| set.last_reports()).flatten();
        let reports = match cached {
            Some(reports) => reports,
            None => set.check_all().await,
        };
        let servers: Vec<serde_json::Value> = set
            .members()
            .iter()
            .zip(&reports)
            .map(|(m, report)| {
                let (status, detail) = health_words(report);
                let mut v = json!({
                    "name": m.server().name,
                    "upstream": m.server().authority,
                    "status": status,
                });
                if let Some(detail) = detail {
                    v["message"] = json!(detail);
                }
                v
            })
            .collect();
        let up = reports
            .iter()
            .filter(|r| **r == HealthReport::Healthy)
            .count();
        let authority = match set.members() {
            [single] => single.server().authority.clone(),
            _ => set
                .members()
                .iter()
                .map(|m| m.server().authority.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        };
        if up > 0 {
            let status = if up == reports.len() {
                "ok"
            } else {
                "degraded"
            };
            let body = json!({"status": status, "upstream": authority, "upstreams": servers});
            return self.respond_json(session, ctx, 200, body.to_string()).await;
        }
        let (state, message) = match reports.as_slice() {
            [HealthReport::Loading(detail)] => (
                "loading",
                format!("llama-server at {authority} is still loading its model: {detail}"),
            ),
            [HealthReport::Unhealthy(detail)] => ("unhealthy", detail.clone()),
            [HealthReport::Unreachable(detail)] => ("unreachable", detail.clone()),
            all => {
                let loading = all.iter().all(|r| matches!(r, HealthReport::Loading(_)));
                (
                    if loading { "loading" } else { "unreachable" },
                    format!(
                        "none of the {} upstream servers is up: {}",
                        all.len(),
                        set.describe(&[])
                    ),
                )
            }
        };
        let error = ApiError::UpstreamUnavailable(message);
        ctx.error_code = Some(error.code());
        let mut body = error.json(ctx.request_id());
        body["status"] = json!(state);
        body["upstream"] = json!(authority);
        body["upstreams"] = json!(servers);
        self.respond_json(session, ctx, 503, body.to_string()).await
    }
}
