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

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue};
use pingora_error::{ErrorType, OrErr, Result};
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

// Names the gateway writes, built at compile time (a name parsed at run
// time is copied into a fresh buffer; a clone of these copies nothing).
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_ACCEL_BUFFERING: HeaderName = HeaderName::from_static("x-accel-buffering");

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
    pub request_id: Option<&'a HeaderValue>,
    pub client_ip: Option<IpAddr>,
}

/// The header llm-edge sends upstream for a body it has read (and
/// rewritten), still without `Host` and `Authorization`: those depend on
/// which server it goes to ([`address_to`]), which failover may change.
///
/// Built as plain `http` parts, without Pingora's map of header-name case:
/// that map doubles the header maps and copies every name, and llama-server
/// reads names case-insensitively. On the wire the common names are still
/// title-cased by Pingora, the rest go lower-case (as the client's own
/// extension headers already did).
pub fn upstream_request(client: &RequestHeader, fwd: &Forwarding) -> Result<RequestHeader> {
    let query = fwd.query.and_then(filter_query);
    let target = match (
        &query,
        crate::policy::routes::static_upstream_path(fwd.path),
    ) {
        (None, Some(path)) => Bytes::from_static(path.as_bytes()),
        (None, None) => Bytes::copy_from_slice(fwd.path.as_bytes()),
        (Some(query), _) => {
            let mut target = String::with_capacity(fwd.path.len() + query.len() + 1);
            target.push_str(fwd.path);
            target.push('?');
            target.push_str(query);
            Bytes::from(target)
        }
    };
    let uri = http::Uri::from_maybe_shared(target).or_err(
        ErrorType::InvalidHTTPHeader,
        "invalid upstream request target",
    )?;
    let mut headers = HeaderMap::with_capacity(client.headers.len() + 4);
    for (name, value) in client.headers.iter() {
        let name_str = name.as_str();
        if !NOT_FORWARDED.contains(&name_str) && !hop_by_hop(name_str, &client.headers) {
            headers.append(name.clone(), value.clone());
        }
    }
    if let Some(len) = fwd.body_len {
        headers.insert(http::header::CONTENT_LENGTH, short_value(len)?);
    }
    if let Some(id) = fwd.request_id {
        headers.insert(X_REQUEST_ID.clone(), id.clone());
    }
    if let Some(ip) = fwd.client_ip {
        headers.insert(X_FORWARDED_FOR.clone(), short_value(ip)?);
    }
    let (mut parts, ()) = http::Request::new(()).into_parts();
    parts.method = client.method.clone();
    parts.uri = uri;
    parts.headers = headers;
    Ok(RequestHeader::from(parts))
}

/// A short value (a number, an address) as a header value, formatted on the
/// stack: one allocation, where `to_string()` and `HeaderValue::from(usize)`
/// take two.
pub fn short_value(v: impl std::fmt::Display) -> Result<HeaderValue> {
    use std::io::Write as _;
    // Longer than any number or address text (an IPv6 one is at most 45).
    let mut buf = [0u8; 64];
    let mut cursor = std::io::Cursor::new(&mut buf[..]);
    write!(cursor, "{v}").or_err(ErrorType::InvalidHTTPHeader, "header value too long")?;
    let len = cursor.position() as usize;
    HeaderValue::from_bytes(&buf[..len])
        .or_err(ErrorType::InvalidHTTPHeader, "invalid header value")
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
    // Plain `http` parts, without Pingora's header-name case map (see
    // `upstream_request`): llama-server's own extension headers already
    // reached the client lower-cased, now ours do too.
    let mut headers = HeaderMap::with_capacity(upstream.headers.len() + 4);
    for (name, value) in upstream.headers.iter() {
        let name_str = name.as_str();
        // llama-server's CORS answer is never passed on: the gateway's policy decides.
        if !hop_by_hop(name_str, &upstream.headers)
            && !crate::policy::cors::is_cors_header(name_str)
        {
            headers.append(name.clone(), value.clone());
        }
    }
    let has_length = headers.contains_key(http::header::CONTENT_LENGTH);
    if is_sse || !has_length {
        headers.remove(http::header::CONTENT_LENGTH);
        if !http10 {
            headers.insert(
                http::header::TRANSFER_ENCODING,
                HeaderValue::from_static("chunked"),
            );
        }
    }
    if is_sse {
        headers.insert(X_ACCEL_BUFFERING.clone(), HeaderValue::from_static("no"));
        headers.insert(
            http::header::CACHE_CONTROL,
            HeaderValue::from_static("no-cache"),
        );
    }
    Ok(response_from(upstream.status, headers))
}

/// A response header from plain parts (no header-name case map, no reason
/// phrase): no allocation beyond `headers` itself.
pub fn response_from(status: http::StatusCode, headers: HeaderMap) -> ResponseHeader {
    let (mut parts, ()) = http::Response::new(()).into_parts();
    parts.status = status;
    parts.headers = headers;
    ResponseHeader::from(parts)
}

/// Sets `name` to `value`. On a header without a case
/// map (the gateway's own, see [`response_from`]) the name is used as it is;
/// Pingora's `insert_header` would copy it twice.
pub fn set_header(resp: &mut ResponseHeader, name: HeaderName, value: HeaderValue) -> Result<()> {
    // A case map or a reason phrase of its own would not survive the parts.
    if resp.has_case() || resp.get_reason_phrase() != resp.status.canonical_reason() {
        return resp.insert_header(name, value);
    }
    let taken = std::mem::replace(resp, response_from(resp.status, HeaderMap::new()));
    let mut parts = http::response::Parts::from(taken);
    parts.headers.insert(name, value);
    *resp = ResponseHeader::from(parts);
    Ok(())
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
    request_id: Option<&HeaderValue>,
    cors: &CorsPolicy,
    allowed_origin: Option<&str>,
) -> Result<()> {
    if let Some(id) = request_id {
        set_header(resp, X_REQUEST_ID.clone(), id.clone())?;
    }
    cors.apply(resp, allowed_origin)
}

#[cfg(test)]
mod tests;
