//! Header rules between the client and llama-server.
//!
//! Hop-by-hop headers never cross, in either direction, including those a
//! `Connection` header names; the client's `Authorization`/`x-api-key` (its
//! gateway key) is never forwarded, the configured upstream key is sent
//! instead, and key-like query parameters are dropped; `Accept-Encoding` is
//! dropped so responses come back uncompressed and the stream can be relayed
//! (and read on the side) as it is. Client-supplied `X-Forwarded-For`,
//! `Forwarded` and `X-Real-IP` are never passed on: llama-server gets the
//! client address the gateway resolved (trusting only configured proxies).

use std::net::IpAddr;

use http::HeaderMap;
use pingora_error::Result;
use pingora_http::{RequestHeader, ResponseHeader};

use crate::config::UpstreamServer;
use crate::policy::cors::CorsPolicy;

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
    // llama-server keeps generating a request that carries it after its
    // client leaves (no cancellation) and replays the stream to whoever asks
    // for the id: never a tenant's to set
    "x-conversation-id",
    // the client's own claims about where it is: replaced by what we resolved
    "x-forwarded-for",
    "forwarded",
    "x-real-ip",
];

/// Query parameters that carry keys in some clients: never forwarded (nor logged).
const KEY_PARAMS: &[&str] = &[
    "api_key",
    "api-key",
    "apikey",
    "key",
    "token",
    "access_token",
];

/// Whether `name` is hop-by-hop: always, or because `Connection` names it.
fn hop_by_hop(name: &str, headers: &HeaderMap) -> bool {
    HOP_BY_HOP.contains(&name)
        || headers.get_all(http::header::CONNECTION).iter().any(|v| {
            v.as_bytes()
                .split(|b| *b == b',')
                .any(|token| token.trim_ascii().eq_ignore_ascii_case(name.as_bytes()))
        })
}

/// What goes upstream besides the client's end-to-end headers.
#[derive(Debug, Clone, Copy)]
pub struct Forwarding<'a> {
    /// The canonical path the gateway checked (never the client's spelling).
    pub path: &'a str,
    /// The client's query, if any (key-like parameters are dropped).
    pub query: Option<&'a str>,
    /// `None`: a request without a body (no `Content-Length` is sent).
    pub body_len: Option<usize>,
    pub request_id: Option<&'a str>,
    pub client_ip: Option<IpAddr>,
}

/// The header llm-edge sends upstream for a body it has read (and
/// rewritten), still without `Host` and `Authorization`: those depend on
/// which server it goes to ([`address_to`]), which failover may change.
pub fn upstream_request(client: &RequestHeader, fwd: &Forwarding) -> Result<RequestHeader> {
    let mut target = String::with_capacity(fwd.path.len() + fwd.query.map_or(0, str::len) + 1);
    target.push_str(fwd.path);
    if let Some(query) = fwd.query.and_then(filter_query) {
        target.push('?');
        target.push_str(&query);
    }
    let mut req = RequestHeader::build(
        client.method.clone(),
        target.as_bytes(),
        Some(client.headers.len() + 4),
    )?;
    for (name, value) in client.headers.iter() {
        let name_str = name.as_str();
        if !NOT_FORWARDED.contains(&name_str) && !hop_by_hop(name_str, &client.headers) {
            req.append_header(name.clone(), value.clone())?;
        }
    }
    if let Some(len) = fwd.body_len {
        req.insert_header("Content-Length", len.to_string())?;
    }
    if let Some(id) = fwd.request_id {
        req.insert_header("X-Request-Id", id)?;
    }
    if let Some(ip) = fwd.client_ip {
        req.insert_header("X-Forwarded-For", ip.to_string())?;
    }
    Ok(req)
}

/// `query` without key-like parameters; `None` when nothing is left.
pub fn filter_query(query: &str) -> Option<String> {
    let kept: Vec<&str> = query
        .split('&')
        .filter(|pair| {
            let name = pair.split('=').next().unwrap_or("");
            !pair.is_empty() && !KEY_PARAMS.contains(&percent_decode_lower(name).as_str())
        })
        .collect();
    (!kept.is_empty()).then(|| kept.join("&"))
}

/// A query parameter's name, percent-decoded and lower-cased, so `api%5Fkey`
/// and `API_KEY` are recognised too.
fn percent_decode_lower(name: &str) -> String {
    let b = name.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        match (
            b[i],
            b.get(i + 1).copied().and_then(hex),
            b.get(i + 2).copied().and_then(hex),
        ) {
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            (b'+', _, _) => {
                out.push(b' ');
                i += 1;
            }
            (c, _, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).to_ascii_lowercase()
}

/// `Host` and the server's own key (llama-server's `--api-key`), if any.
pub fn address_to(req: &mut RequestHeader, server: &UpstreamServer) -> Result<()> {
    req.insert_header("Host", server.authority.as_str())?;
    if let Some(key) = &server.api_key {
        req.insert_header("Authorization", format!("Bearer {}", key.expose()))?;
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
/// of us buffers them either. An HTTP/1.0 client (`http10`) knows no chunked
/// coding: such a body is delimited by closing the connection instead (the
/// caller turns keep-alive off when the header has no `Content-Length`).
pub fn downstream_response(
    upstream: &ResponseHeader,
    is_sse: bool,
    http10: bool,
) -> Result<ResponseHeader> {
    let mut resp = ResponseHeader::build(upstream.status, Some(upstream.headers.len() + 4))?;
    for (name, value) in upstream.headers.iter() {
        if !hop_by_hop(name.as_str(), &upstream.headers) {
            resp.append_header(name.clone(), value.clone())?;
        }
    }
    crate::policy::cors::strip_upstream_cors(&mut resp);
    let has_length = resp.headers.contains_key("content-length");
    if is_sse || !has_length {
        resp.remove_header("content-length");
        if !http10 {
            resp.insert_header("Transfer-Encoding", "chunked")?;
        }
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
    use crate::config::Secret;

    fn upstream(key: Option<&str>) -> UpstreamServer {
        UpstreamServer {
            name: "gpu".into(),
            authority: "127.0.0.1:8080".into(),
            addr: "127.0.0.1:8080".parse().unwrap(),
            api_key: key.map(Secret::from),
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

    fn fwd<'a>(body_len: usize, request_id: Option<&'a str>) -> Forwarding<'a> {
        Forwarding {
            path: "/v1/chat/completions",
            query: Some("x=1"),
            body_len: Some(body_len),
            request_id,
            client_ip: None,
        }
    }

    #[test]
    fn client_key_is_replaced_by_the_upstream_key() {
        let mut req = upstream_request(&client_request(), &fwd(42, Some("r1"))).unwrap();
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
        let mut req = upstream_request(&client_request(), &fwd(1, None)).unwrap();
        address_to(&mut req, &upstream(None)).unwrap();
        assert!(!req.headers.contains_key("authorization"));
    }

    #[test]
    fn connection_named_and_forwarding_headers_stay_behind() {
        let mut client = client_request();
        client
            .insert_header("Connection", "keep-alive, X-Secret-Hop")
            .unwrap();
        client.insert_header("X-Secret-Hop", "1").unwrap();
        client.insert_header("Upgrade", "websocket").unwrap();
        client.insert_header("X-Forwarded-For", "6.6.6.6").unwrap();
        client.insert_header("Forwarded", "for=6.6.6.6").unwrap();
        client.insert_header("X-Api-Key", "sk-client").unwrap();
        client.insert_header("X-Conversation-Id", "conv1").unwrap();
        let f = Forwarding {
            client_ip: Some("203.0.113.7".parse().unwrap()),
            ..fwd(1, None)
        };
        let req = upstream_request(&client, &f).unwrap();
        for gone in [
            "x-secret-hop",
            "upgrade",
            "forwarded",
            "x-api-key",
            "connection",
            "x-conversation-id",
        ] {
            assert!(!req.headers.contains_key(gone), "{gone}");
        }
        assert_eq!(req.headers["x-forwarded-for"], "203.0.113.7");
        assert_eq!(req.headers.get_all("x-forwarded-for").iter().count(), 1);

        let mut up = ResponseHeader::build(200, None).unwrap();
        up.insert_header("Connection", "keep-alive, X-Hop").unwrap();
        up.insert_header("X-Hop", "1").unwrap();
        up.insert_header("Keep-Alive", "timeout=5").unwrap();
        up.insert_header("Content-Length", "2").unwrap();
        let down = downstream_response(&up, false, false).unwrap();
        for gone in ["x-hop", "keep-alive", "connection"] {
            assert!(!down.headers.contains_key(gone), "{gone}");
        }
    }

    #[test]
    fn key_like_query_parameters_are_dropped() {
        assert_eq!(filter_query("a=1&api_key=s&b=2"), Some("a=1&b=2".into()));
        assert_eq!(filter_query("KEY=s&Token=t&access_token=u"), None);
        assert_eq!(filter_query("api%5Fkey=s&x"), Some("x".into()));
        assert_eq!(filter_query("monkey=1"), Some("monkey=1".into()));
        let f = Forwarding {
            query: Some("api_key=sk-secret&stream=1"),
            ..fwd(1, None)
        };
        let req = upstream_request(&client_request(), &f).unwrap();
        assert_eq!(req.uri.to_string(), "/v1/chat/completions?stream=1");
    }

    #[test]
    fn http10_clients_get_no_chunked_coding() {
        let mut up = ResponseHeader::build(200, None).unwrap();
        up.insert_header("Content-Type", "text/event-stream")
            .unwrap();
        let down = downstream_response(&up, true, true).unwrap();
        assert!(!down.headers.contains_key("transfer-encoding"));
        assert!(!down.headers.contains_key("content-length"));
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
        let down = downstream_response(&up, true, false).unwrap();
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
        let mut down = downstream_response(&up, false, false).unwrap();
        assert_eq!(down.status.as_u16(), 400);
        assert_eq!(down.headers["content-length"], "12");
        assert!(!down.headers.contains_key("transfer-encoding"));
        finish_client_response(&mut down, Some("r"), &CorsPolicy::default(), None).unwrap();
        assert_eq!(down.headers["x-request-id"], "r");
    }
}
