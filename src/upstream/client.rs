//! The connection to llama-server, usually through the SSH reverse tunnel.
//!
//! Model routes are forwarded by llm-edge itself rather than by Pingora's
//! proxy loop: the whole body has to be read and checked before anything is
//! sent upstream, and on stock Pingora 0.9.1 a body read in `request_filter`
//! is only re-sent from a 64 KiB retry buffer (larger prompts would hang).
//! Owning this path also gives separate first-byte and between-chunk
//! timeouts, and a retry when a pooled connection turns out to be stale.
//!
//! Every new TCP connection is a new SSH channel, so connections are pooled;
//! llama-server closes idle ones after 5 s and any after 100 requests, so a
//! pooled connection can be dead when we pick it. It also closes every
//! connection that carried a chunked (streamed) response, without saying so:
//! those are never pooled. Pingora's pool already
//! drops connections it finds closed when handing one out; a request whose
//! write fails on a reused connection (so llama-server cannot have read it)
//! is sent again once, on a fresh connection. Once the whole request was
//! written it is never sent again, even when the connection then closes
//! without an answer: llama-server may be generating it, and a second copy
//! would be a second prompt on the GPU (and a second bill).

use std::time::Duration;

use bytes::Bytes;
use http::HeaderValue;
use pingora_core::connectors::{ConnectorOptions, TransportConnector};
use pingora_core::protocols::http::v1::client::HttpSession;
use pingora_core::upstreams::peer::{HttpPeer, Peer};
use pingora_error::{Error, ErrorType};
use pingora_http::RequestHeader;

use crate::config::{self, UpstreamServer};
use crate::errors::ApiError;
use crate::labels::UpstreamErrorKind;
use crate::policy::headers;

/// Why the upstream did not produce a response header.
#[derive(Debug)]
pub enum UpstreamFailure {
    /// TCP connect failed: nothing listens at the tunnel's end.
    Connect(Box<Error>),
    /// Connected, but the connection closed or broke before a response: the
    /// usual picture of an SSH tunnel whose llama-server is down.
    NoResponse(Box<Error>),
    /// No response header within `first_byte_timeout`.
    FirstByteTimeout(Duration),
    /// Something answered, but not with valid HTTP.
    Invalid(Box<Error>),
}

impl UpstreamFailure {
    /// Nothing reached the server: another one can take the request. Only a
    /// failed connect qualifies; once a request was sent it may be running
    /// (as nginx, a POST is not sent twice), and a request that crashes
    /// llama-server must not crash every replica in turn.
    pub fn nothing_sent(&self) -> bool {
        matches!(self, UpstreamFailure::Connect(_))
    }
}

impl UpstreamFailure {
    pub fn kind(&self) -> UpstreamErrorKind {
        match self {
            UpstreamFailure::Connect(e) => connect_kind(e),
            UpstreamFailure::NoResponse(_) => UpstreamErrorKind::Reset,
            UpstreamFailure::FirstByteTimeout(_) => UpstreamErrorKind::Timeout,
            UpstreamFailure::Invalid(_) => UpstreamErrorKind::InvalidResponse,
        }
    }

    /// A few words for the list of servers' states.
    pub fn short_reason(&self) -> String {
        match self {
            UpstreamFailure::Connect(e) => describe(e),
            UpstreamFailure::NoResponse(e) => format!("closed without answering ({})", describe(e)),
            UpstreamFailure::FirstByteTimeout(_) => "no response in time".into(),
            UpstreamFailure::Invalid(e) => format!("invalid HTTP ({})", describe(e)),
        }
    }

    pub fn into_api_error(self, authority: &str) -> ApiError {
        let hint = ApiError::TUNNEL_HINT;
        match self {
            UpstreamFailure::Connect(e) => ApiError::UpstreamUnreachable(format!(
                "the upstream llama-server at {authority} is unreachable ({}): {hint}",
                describe(&e)
            )),
            UpstreamFailure::NoResponse(e) => ApiError::UpstreamUnreachable(format!(
                "the upstream at {authority} accepted the connection but closed it without answering ({}): the SSH tunnel is up but llama-server behind it is not answering; {hint}",
                describe(&e)
            )),
            UpstreamFailure::FirstByteTimeout(t) => ApiError::UpstreamTimeout(format!(
                "the upstream llama-server at {authority} sent no response within {}: it may be overloaded or stuck; see upstream.first_byte_timeout",
                humantime::format_duration(t)
            )),
            UpstreamFailure::Invalid(e) => ApiError::UpstreamBroken(format!(
                "the upstream at {authority} answered with an invalid HTTP response ({}): is llama-server what listens there?",
                describe(&e)
            )),
        }
    }
}

/// `llm_edge_upstream_errors_total{kind}` of a failed connect.
pub fn connect_kind(e: &Error) -> UpstreamErrorKind {
    if matches!(e.etype(), ErrorType::ConnectTimedout) {
        UpstreamErrorKind::ConnectTimeout
    } else {
        UpstreamErrorKind::Refused
    }
}

pub fn describe(e: &Error) -> String {
    match e.etype() {
        ErrorType::ConnectRefused => "connection refused".into(),
        ErrorType::ConnectTimedout => "connect timed out".into(),
        ErrorType::ConnectionClosed => "connection closed".into(),
        _ => e.etype().as_str().to_lowercase(),
    }
}

/// How far a request got before its exchange failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Writing it failed: the server did not read it.
    Writing,
    /// It was written whole: the server may be working on it.
    Written,
}

/// A response header has arrived; the body is still to be read.
pub struct Exchange {
    pub http: HttpSession,
}

/// Why [`UpstreamClient::send`] returned without a response header.
#[derive(Debug)]
pub enum Unsent {
    /// It failed; `header` is the request header back when it was never
    /// handed to a connection (a failed connect), for another server.
    Failed {
        failure: UpstreamFailure,
        header: Option<Box<RequestHeader>>,
    },
    /// A pooled connection turned out stale while the request was written:
    /// llama-server read none of it, so it goes out again on a fresh
    /// connection ([`UpstreamClient::send_fresh`]). The header went with the
    /// broken connection: the caller builds it again (rare, so the common
    /// path keeps no copy).
    Stale,
}

impl Unsent {
    fn failed(failure: UpstreamFailure) -> Unsent {
        Unsent::Failed {
            failure,
            header: None,
        }
    }
}

/// The connection pool and timeouts for one llama-server.
pub struct UpstreamClient {
    transport: TransportConnector,
    peer: HttpPeer,
    server: UpstreamServer,
    first_byte_timeout: Duration,
    pool_idle_timeout: Duration,
    health_timeout: Duration,
    /// `Host` and `Authorization` for this server, rendered once: every
    /// request carries them (a clone of a value is a reference count).
    host: Option<HeaderValue>,
    authorization: Option<HeaderValue>,
}

impl UpstreamClient {
    pub fn new(server: UpstreamServer, cfg: &config::Upstream) -> UpstreamClient {
        let mut peer = HttpPeer::new(server.addr, false, String::new());
        peer.options.connection_timeout = Some(cfg.connect_timeout);
        peer.options.total_connection_timeout = Some(cfg.connect_timeout);
        let transport = TransportConnector::new(Some(ConnectorOptions::new(256)));
        let host = HeaderValue::from_str(&server.authority).ok();
        let authorization = server.api_key.as_ref().and_then(|key| {
            let mut value = HeaderValue::from_str(&format!("Bearer {}", key.expose())).ok()?;
            value.set_sensitive(true);
            Some(value)
        });
        UpstreamClient {
            transport,
            peer,
            server,
            first_byte_timeout: cfg.first_byte_timeout,
            pool_idle_timeout: cfg.pool_idle_timeout,
            health_timeout: cfg.health_timeout,
            host,
            authorization,
        }
    }

    /// Addresses `req` to this server: its `Host`, and its own key or none
    /// (a header that went to another server first may carry that one's).
    fn address(&self, req: &mut RequestHeader) -> pingora_error::Result<()> {
        let invalid = || Error::explain(ErrorType::InvalidHTTPHeader, "invalid value while insert");
        let host = self.host.clone().ok_or_else(invalid)?;
        req.insert_header(http::header::HOST, host)?;
        match (&self.authorization, &self.server.api_key) {
            (Some(value), _) => req.insert_header("authorization", value.clone())?,
            (None, Some(_)) => return Err(invalid()),
            (None, None) => {
                req.remove_header(&http::header::AUTHORIZATION);
            }
        }
        Ok(())
    }

    pub fn server(&self) -> &UpstreamServer {
        &self.server
    }

    pub fn peer(&self) -> &HttpPeer {
        &self.peer
    }

    /// Sends the request (addressed to this server) and waits for the
    /// response header (cancel-safe: dropping the future drops the
    /// connection, which stops llama-server). The header is handed over, not
    /// copied: it comes back only when no connection took it.
    pub async fn send(
        &self,
        mut req: Box<RequestHeader>,
        body: &Bytes,
    ) -> Result<Exchange, Unsent> {
        if let Err(e) = self.address(&mut req) {
            return Err(Unsent::failed(UpstreamFailure::Invalid(e)));
        }
        if let Some(stream) = self.transport.reused_stream(&self.peer).await {
            let http = HttpSession::new_with_options(stream, &self.peer);
            return match self.exchange_staged(http, req, body).await {
                Ok(done) => Ok(done),
                // A stale pooled connection that refused the request itself:
                // nothing was read upstream; try once more on a fresh one.
                Err((UpstreamFailure::NoResponse(e), Stage::Writing)) => {
                    log::debug!(
                        "pooled upstream connection was stale ({e}); retrying on a new one"
                    );
                    Err(Unsent::Stale)
                }
                Err((failure @ UpstreamFailure::NoResponse(_), Stage::Written)) => {
                    // Not re-sent (it may be running); said at info so a 502
                    // from a pooled connection can be told from a fresh one's.
                    log::info!(
                        "a pooled connection to {} closed after the request was written, without answering ({}); not re-sent",
                        self.server.authority,
                        failure.short_reason()
                    );
                    Err(Unsent::failed(failure))
                }
                Err((other, _)) => Err(Unsent::failed(other)),
            };
        }
        self.connect_and_send(req, body).await
    }

    /// [`UpstreamClient::send`] on a new connection (after a stale pooled one).
    pub async fn send_fresh(
        &self,
        mut req: Box<RequestHeader>,
        body: &Bytes,
    ) -> Result<Exchange, Unsent> {
        if let Err(e) = self.address(&mut req) {
            return Err(Unsent::failed(UpstreamFailure::Invalid(e)));
        }
        self.connect_and_send(req, body).await
    }

    async fn connect_and_send(
        &self,
        req: Box<RequestHeader>,
        body: &Bytes,
    ) -> Result<Exchange, Unsent> {
        // Boxed: the connect future is large and only needed when the pool
        // has no connection (it would otherwise grow every request's future).
        let stream = match Box::pin(self.transport.new_stream(&self.peer)).await {
            Ok(stream) => stream,
            Err(e) => {
                return Err(Unsent::Failed {
                    failure: UpstreamFailure::Connect(e),
                    header: Some(req),
                })
            }
        };
        let http = HttpSession::new_with_options(stream, &self.peer);
        self.exchange(http, req, body).await.map_err(Unsent::failed)
    }

    async fn exchange(
        &self,
        http: HttpSession,
        req: Box<RequestHeader>,
        body: &Bytes,
    ) -> Result<Exchange, UpstreamFailure> {
        self.exchange_staged(http, req, body)
            .await
            .map_err(|(failure, _)| failure)
    }

    /// [`UpstreamClient::exchange`], saying how far the request got when it failed.
    async fn exchange_staged(
        &self,
        mut http: HttpSession,
        req: Box<RequestHeader>,
        body: &Bytes,
    ) -> Result<Exchange, (UpstreamFailure, Stage)> {
        // One deadline for sending the request and receiving the response
        // header: an upstream that accepts but never reads (a stuck tunnel)
        // must not hold a large body's write forever.
        let limit = self.first_byte_timeout;
        let exchange = async {
            let write = async {
                http.write_request_header(req).await?;
                if !body.is_empty() {
                    http.write_body(body).await?;
                }
                http.finish_body().await?;
                Ok::<(), Box<Error>>(())
            };
            write
                .await
                .map_err(|e| (UpstreamFailure::NoResponse(e), Stage::Writing))?;
            http.read_response().await.map_err(|e| {
                let failure = match e.etype() {
                    ErrorType::InvalidHTTPHeader | ErrorType::H1Error => {
                        UpstreamFailure::Invalid(e)
                    }
                    _ => UpstreamFailure::NoResponse(e),
                };
                (failure, Stage::Written)
            })
        };
        match tokio::time::timeout(limit, exchange).await {
            Err(_) => Err((UpstreamFailure::FirstByteTimeout(limit), Stage::Written)),
            Ok(Err(failure)) => Err(failure),
            Ok(Ok(_)) => Ok(Exchange { http }),
        }
    }

    /// Returns a finished exchange's connection to the pool when it can be reused.
    pub async fn release(&self, mut exchange: Exchange) {
        // llama-server (cpp-httplib) closes the connection after every
        // chunked response although its headers promise keep-alive, and a
        // request sent on it in the meantime is read and dropped unanswered:
        // never pool one (it is closed when dropped here).
        if exchange
            .http
            .resp_header()
            .is_some_and(|h| headers::is_chunked(&h.headers))
        {
            return;
        }
        exchange.http.respect_keepalive();
        if let Some(stream) = exchange.http.reuse().await {
            self.transport.release_stream(
                stream,
                self.peer.reuse_hash(),
                Some(self.pool_idle_timeout),
            );
        }
    }

    /// Probes llama-server's own `GET /health` (public even with
    /// `--api-key`): its state, with a few words on why it is not healthy
    /// (for the list of servers' states).
    pub async fn probe(&self) -> (HealthReport, String) {
        let mut req = match RequestHeader::build("GET", b"/health", None) {
            Ok(req) => req,
            Err(e) => {
                let why = format!("cannot build request: {e}");
                return (HealthReport::Unreachable(why.clone()), why);
            }
        };
        let _ = headers::address_to(&mut req, &self.server);
        let probe = async {
            let stream = self
                .transport
                .new_stream(&self.peer)
                .await
                .map_err(UpstreamFailure::Connect)?;
            let http = HttpSession::new_with_options(stream, &self.peer);
            let mut exchange = self.exchange(http, Box::new(req), &Bytes::new()).await?;
            let status = exchange.http.get_status().map_or(0, |s| s.as_u16());
            let mut body = Vec::new();
            while let Ok(Some(chunk)) = exchange.http.read_body_ref().await {
                body.extend_from_slice(chunk);
                if body.len() > 64 * 1024 {
                    break;
                }
            }
            Ok::<_, UpstreamFailure>((status, body))
        };
        let limit = humantime::format_duration(self.health_timeout);
        match tokio::time::timeout(self.health_timeout, probe).await {
            Err(_) => (
                HealthReport::Unreachable(format!(
                    "no answer from {} within {limit}",
                    self.server.authority,
                )),
                format!("no answer within {limit}"),
            ),
            Ok(Err(failure)) => {
                let why = failure.short_reason();
                let report = HealthReport::Unreachable(
                    failure.into_api_error(&self.server.authority).to_string(),
                );
                (report, why)
            }
            Ok(Ok((200, _))) => (HealthReport::Healthy, String::new()),
            Ok(Ok((503, body))) => {
                let message = error_message(&body);
                (HealthReport::Loading(message.clone()), message)
            }
            Ok(Ok((status, body))) => (
                HealthReport::Unhealthy(format!(
                    "llama-server /health answered {status}: {}",
                    String::from_utf8_lossy(&body[..body.len().min(200)])
                )),
                format!("/health answered {status}"),
            ),
        }
    }
}

/// llama-server's `error.message`, or the body as text.
fn error_message(body: &[u8]) -> String {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
        .unwrap_or_else(|| String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned())
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HealthReport {
    Healthy,
    Loading(String),
    Unhealthy(String),
    Unreachable(String),
}
