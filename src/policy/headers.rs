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
    HOP_BY_HOP.contains(&name) || connection_has(headers, name)
}

/// Whether a `Connection` header lists `token` (case-insensitive).
pub fn connection_has(headers: &HeaderMap, token: &str) -> bool {
    headers.get_all(http::header::CONNECTION).iter().any(|v| {
        v.as_bytes()
            .split(|b| *b == b',')
            .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
    })
}

/// HTTP/1.1 keeps a connection unless the client says `close`; HTTP/1.0
/// only when it asks for `keep-alive`.
pub fn client_keeps_alive(http10: bool, headers: &HeaderMap) -> bool {
    if http10 {
        connection_has(headers, "keep-alive")
    } else {
        !connection_has(headers, "close")
    }
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
            let ct = ct.trim_start().as_bytes();
            const SSE: &[u8] = b"text/event-stream";
            ct.len() >= SSE.len() && ct[..SSE.len()].eq_ignore_ascii_case(SSE)
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
/// Whether a message's body is sent with `Transfer-Encoding: chunked`.
pub fn is_chunked(headers: &http::HeaderMap) -> bool {
    headers
        .get_all(http::header::TRANSFER_ENCODING)
        .iter()
        .any(|v| {
            v.as_bytes()
                .split(|&b| b == b',')
                .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"chunked"))
        })
}

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
mod tests;
