//! The HTTP plumbing the steps share: one client, requests bounded by
//! `--timeout`, bodies read up to a limit, and a request that got no HTTP
//! answer turned into a check line with its transport hint.

use std::time::Duration;

use tokio::time::Instant;

use super::report::{Check, Status};
use super::settings::Settings;
use super::transport::{classify_transport, transport_hint, TransportKind};

/// The most of a (non-streamed) body read; replies to the test requests are small.
pub(super) const BODY_LIMIT: usize = 1 << 20;

/// Why a request got no HTTP answer.
#[derive(Debug)]
pub(super) enum NetError {
    /// Nothing within the step's deadline.
    Timeout,
    Transport {
        kind: TransportKind,
        detail: String,
    },
    TooLarge,
}

/// A complete (non-streamed) answer.
pub(super) struct Reply {
    pub(super) status: u16,
    pub(super) body: Vec<u8>,
    pub(super) elapsed: Duration,
}

pub(super) struct Net<'a> {
    pub(super) client: reqwest::Client,
    pub(super) s: &'a Settings,
}

impl Net<'_> {
    pub(super) fn deadline(&self) -> Instant {
        Instant::now() + self.s.timeout
    }

    pub(super) fn secs(&self) -> u64 {
        self.s.timeout.as_secs()
    }

    pub(super) fn transport(&self, err: &reqwest::Error) -> NetError {
        let mut chain: Vec<String> = Vec::new();
        let mut kinds = Vec::new();
        let mut current: Option<&(dyn std::error::Error + 'static)> = Some(err);
        while let Some(e) = current {
            if let Some(io) = e.downcast_ref::<std::io::Error>() {
                kinds.push(io.kind());
            }
            let text = e.to_string();
            if !chain.iter().any(|c| c.contains(&text)) {
                chain.push(text);
            }
            current = e.source();
        }
        let all = chain.join(": ");
        let kind = classify_transport(err.is_timeout(), &kinds, &all, self.s.base.https);
        if kind == TransportKind::Timeout {
            return NetError::Timeout;
        }
        // The first link only says "error sending request for url (...)".
        let detail = if chain.len() > 1 {
            chain[1..].join(": ")
        } else {
            all
        };
        NetError::Transport { kind, detail }
    }

    pub(super) fn request(&self, method: reqwest::Method, url: &str) -> reqwest::RequestBuilder {
        let req = self.client.request(method, url);
        match &self.s.api_key {
            Some(key) => req.bearer_auth(key),
            None => req,
        }
    }

    /// Sends and reads the whole body, all before `deadline`.
    pub(super) async fn fetch(
        &self,
        req: reqwest::RequestBuilder,
        deadline: Instant,
    ) -> Result<Reply, NetError> {
        let start = Instant::now();
        let mut resp = match tokio::time::timeout_at(deadline, req.send()).await {
            Err(_) => return Err(NetError::Timeout),
            Ok(Err(e)) => return Err(self.transport(&e)),
            Ok(Ok(resp)) => resp,
        };
        let status = resp.status().as_u16();
        let body = self.read_body(&mut resp, deadline).await?;
        Ok(Reply {
            status,
            body,
            elapsed: start.elapsed(),
        })
    }

    pub(super) async fn read_body(
        &self,
        resp: &mut reqwest::Response,
        deadline: Instant,
    ) -> Result<Vec<u8>, NetError> {
        let mut body = Vec::new();
        loop {
            match tokio::time::timeout_at(deadline, resp.chunk()).await {
                Err(_) => return Err(NetError::Timeout),
                Ok(Err(e)) => return Err(self.transport(&e)),
                Ok(Ok(None)) => return Ok(body),
                Ok(Ok(Some(chunk))) => {
                    body.extend_from_slice(&chunk);
                    if body.len() > BODY_LIMIT {
                        return Err(NetError::TooLarge);
                    }
                }
            }
        }
    }

    /// A failed request as a check line: `fail` or `warn` with the hint.
    pub(super) fn net_failure(
        &self,
        name: &'static str,
        status: Status,
        what: &str,
        err: NetError,
        timeout_hint: Option<&str>,
    ) -> Check {
        let (detail, hint, kind) = match err {
            NetError::Timeout => (
                format!("{what}: no answer within {} s", self.secs()),
                timeout_hint.map_or_else(
                    || transport_hint(TransportKind::Timeout, &self.s.base, self.s.timeout),
                    str::to_string,
                ),
                TransportKind::Timeout,
            ),
            NetError::Transport { kind, detail } => (
                format!("{what}: {detail}"),
                transport_hint(kind, &self.s.base, self.s.timeout),
                kind,
            ),
            NetError::TooLarge => (
                format!("{what}: the answer is larger than {BODY_LIMIT} bytes"),
                "something other than llm-edge answers at this URL".to_string(),
                TransportKind::Other,
            ),
        };
        Check::new(name, status, detail)
            .hint(hint)
            .with("error", kind.as_str())
    }
}

pub(super) fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

pub(super) fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

pub(super) fn quote(text: &str) -> String {
    let flat: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if flat.chars().count() > 60 {
        format!("\"{}...\"", flat.chars().take(60).collect::<String>())
    } else {
        format!("\"{flat}\"")
    }
}
