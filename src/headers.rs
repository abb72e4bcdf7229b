//! Header rules between the client and llama-server.
//!
//! Hop-by-hop headers never cross; the client's `Authorization` (its gateway
//! key) is never forwarded, the configured upstream key is sent instead;
//! `Accept-Encoding` is dropped so responses come back uncompressed and the
//! stream can be relayed (and read on the side) as it is.

use pingora_error::Result;
use pingora_http::{RequestHeader, ResponseHeader};

use crate::config::UpstreamServer;
use crate::cors::CorsPolicy;

const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Client headers that must not reach llama-server.
const NOT_FORWARDED: &[&str] = &[
    "authorization",
    "x-api-key",
    "accept-encoding",
    "expect",
    "host",
    "content-length",
];

fn forwarded(name: &str) -> bool {
    !HOP_BY_HOP.contains(&name) && !NOT_FORWARDED.contains(&name)
}

/// The header llm-edge sends upstream for a body it has read and rewritten,
/// still without `Host` and `Authorization`: those depend on which server it
/// goes to ([`address_to`]), which failover may change.
pub fn upstream_request(
    client: &RequestHeader,
    body_len: usize,
    request_id: Option<&str>,
) -> Result<RequestHeader> {
    let path = client
        .uri
        .path_and_query()
        .map_or("/", |pq| pq.as_str())
        .as_bytes()
        .to_vec();
    let mut req =
        RequestHeader::build(client.method.clone(), &path, Some(client.headers.len() + 4))?;
    for (name, value) in client.headers.iter() {
        if forwarded(name.as_str()) {
            req.append_header(name.clone(), value.clone())?;
        }
    }
    req.insert_header("Content-Length", body_len.to_string())?;
    if let Some(id) = request_id {
        req.insert_header("X-Request-Id", id)?;
    }
    Ok(req)
}

/// Edits, in place, a request that Pingora's own proxy loop forwards.
pub fn rewrite_passthrough_request(
    req: &mut RequestHeader,
    server: &UpstreamServer,
    request_id: Option<&str>,
) -> Result<()> {
    for name in [
        "authorization",
        "x-api-key",
        "accept-encoding",
        "proxy-authorization",
    ] {
        req.remove_header(name);
    }
    if let Some(id) = request_id {
        req.insert_header("X-Request-Id", id)?;
    }
    address_to(req, server)
}

/// `Host` and the server's own key (llama-server's `--api-key`), if any.
pub fn address_to(req: &mut RequestHeader, server: &UpstreamServer) -> Result<()> {
    req.insert_header("Host", server.authority.as_str())?;
    if let Some(key) = &server.api_key {
        req.insert_header("Authorization", format!("Bearer {key}"))?;
    }
    Ok(())
}

pub fn is_event_stream(resp: &ResponseHeader) -> bool {
    resp.headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| {
            ct.trim_start()
                .to_ascii_lowercase()
                .starts_with("text/event-stream")
        })
}

/// The client's response header, built from llama-server's.
///
/// Streams are sent chunked (flushed per chunk), never with a
/// `Content-Length`, and marked `X-Accel-Buffering: no` so no proxy in front
/// of us buffers them either.
pub fn downstream_response(upstream: &ResponseHeader, is_sse: bool) -> Result<ResponseHeader> {
    let mut resp = ResponseHeader::build(upstream.status, Some(upstream.headers.len() + 4))?;
    for (name, value) in upstream.headers.iter() {
        if !HOP_BY_HOP.contains(&name.as_str()) {
            resp.append_header(name.clone(), value.clone())?;
        }
    }
    crate::cors::strip_upstream_cors(&mut resp);
    let has_length = resp.headers.contains_key("content-length");
    if is_sse || !has_length {
        resp.remove_header("content-length");
        resp.insert_header("Transfer-Encoding", "chunked")?;
    }
    if is_sse {
        resp.insert_header("X-Accel-Buffering", "no")?;
        resp.insert_header("Cache-Control", "no-cache")?;
    }
    Ok(resp)
}

/// What every response to a client carries, whoever wrote it: the request id
/// and the gateway's CORS policy (never llama-server's).
pub fn finish_client_response(
    resp: &mut ResponseHeader,
    request_id: Option<&str>,
    cors: &CorsPolicy,
    allowed_origin: Option<&str>,
) -> Result<()> {
    if let Some(id) = request_id {
        resp.insert_header("X-Request-Id", id)?;
    }
    cors.apply(resp, allowed_origin)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upstream(key: Option<&str>) -> UpstreamServer {
        UpstreamServer {
            name: "gpu".into(),
            authority: "127.0.0.1:8080".into(),
            addr: "127.0.0.1:8080".parse().unwrap(),
            api_key: key.map(str::to_string),
            max_in_flight: 0,
        }
    }

    fn client_request() -> RequestHeader {
        let mut req = RequestHeader::build("POST", b"/v1/chat/completions?x=1", None).unwrap();
        req.insert_header("Authorization", "Bearer sk-client")
            .unwrap();
        req.insert_header("Accept-Encoding", "gzip").unwrap();
        req.insert_header("Content-Length", "999").unwrap();
        req.insert_header("Connection", "keep-alive").unwrap();
        req.insert_header("Expect", "100-continue").unwrap();
        req.insert_header("Host", "edge.example.com").unwrap();
        req.insert_header("Content-Type", "application/json")
            .unwrap();
        req.insert_header("X-Custom", "kept").unwrap();
        req
    }

    #[test]
    fn client_key_is_replaced_by_the_upstream_key() {
        let mut req = upstream_request(&client_request(), 42, Some("r1")).unwrap();
        address_to(&mut req, &upstream(Some("up-secret"))).unwrap();
        assert_eq!(req.headers["authorization"], "Bearer up-secret");
        assert_eq!(req.headers["content-length"], "42");
        assert_eq!(req.headers["host"], "127.0.0.1:8080");
        assert_eq!(req.headers["x-custom"], "kept");
        assert_eq!(req.headers["x-request-id"], "r1");
        assert_eq!(req.uri.to_string(), "/v1/chat/completions?x=1");
        for gone in ["accept-encoding", "connection", "expect"] {
            assert!(!req.headers.contains_key(gone), "{gone}");
        }
    }

    #[test]
    fn without_upstream_key_no_authorization_is_sent() {
        let mut req = upstream_request(&client_request(), 1, None).unwrap();
        address_to(&mut req, &upstream(None)).unwrap();
        assert!(!req.headers.contains_key("authorization"));
        let mut pass = client_request();
        rewrite_passthrough_request(&mut pass, &upstream(None), None).unwrap();
        assert!(!pass.headers.contains_key("authorization"));
        assert!(!pass.headers.contains_key("accept-encoding"));
    }

    #[test]
    fn streams_are_chunked_and_unbuffered() {
        let mut up = ResponseHeader::build(200, None).unwrap();
        up.insert_header("Content-Type", "text/event-stream")
            .unwrap();
        up.insert_header("Content-Length", "100").unwrap();
        up.insert_header("Keep-Alive", "timeout=5, max=100")
            .unwrap();
        assert!(is_event_stream(&up));
        let down = downstream_response(&up, true).unwrap();
        assert!(!down.headers.contains_key("content-length"));
        assert!(!down.headers.contains_key("keep-alive"));
        assert_eq!(down.headers["transfer-encoding"], "chunked");
        assert_eq!(down.headers["x-accel-buffering"], "no");
    }

    #[test]
    fn sized_responses_keep_their_length() {
        let mut up = ResponseHeader::build(400, None).unwrap();
        up.insert_header("Content-Type", "application/json")
            .unwrap();
        up.insert_header("Content-Length", "12").unwrap();
        let mut down = downstream_response(&up, false).unwrap();
        assert_eq!(down.status.as_u16(), 400);
        assert_eq!(down.headers["content-length"], "12");
        assert!(!down.headers.contains_key("transfer-encoding"));
        finish_client_response(&mut down, Some("r"), &CorsPolicy::default(), None).unwrap();
        assert_eq!(down.headers["x-request-id"], "r");
    }
}
