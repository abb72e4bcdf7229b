//! The paths an operator opened (`routes.passthrough`): the key and its
//! request limits hold, the body is relayed as it came, never inspected; a
//! key with token limits is refused (its tokens would go uncounted).

use pingora_error::Result;
use pingora_proxy::Session;

use super::ctx::RequestCtx;
use super::GatewayProxy;
use crate::errors::{ApiError, GatewayError};
use crate::policy::auth::ApiKey;
use crate::policy::routes::Dialect;
use crate::upstream::relay::{Relay, UpstreamPath};

impl GatewayProxy {
    /// A path the operator opened: the key and its request limits hold; the
    /// body (bounded like any other) goes upstream as it came.
    pub(super) async fn forward_passthrough(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        key: &ApiKey,
    ) -> Result<(), GatewayError> {
        // Its body is never read for tokens: a key whose tokens are counted
        // would spend them uncounted here.
        if self.state.tokens.limits(&key.id).is_some() {
            return Err(ApiError::PathNotAllowed(format!(
                "the API key '{}' has token limits, and the passthrough path {} is not token-accounted: use the /v1 model routes",
                key.id,
                session.req_header().uri.path()
            ))
            .into());
        }
        self.admit(ctx, key)?;
        self.shared_admit(ctx, key, 0, None).await?;
        let (body, reservation) = self.read_body(session, ctx, key).await?;
        let req = session.req_header();
        let has_body = !body.is_empty() || !matches!(req.method.as_str(), "GET" | "HEAD");
        let relay = Relay {
            upstream: &self.state.upstream,
            metrics: &self.state.metrics,
            cors: &self.state.cfg.cors,
            allowed: &[],
            model: "(passthrough)",
            key: &key.id,
            dialect: Dialect::OpenAi,
            expects_json: false,
            accounting: false,
            affinity: None,
            path: UpstreamPath::Client,
            content_length: has_body,
        };
        relay.forward(session, ctx, body, reservation, None).await
    }
}
