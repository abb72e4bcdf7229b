//! Request-smuggling and path hygiene, checked before routing.
//!
//! An edge must not forward anything a backend could read differently from
//! us: both `Content-Length` and `Transfer-Encoding`, conflicting lengths, a
//! transfer coding other than plain `chunked`, absolute-form targets (we are
//! not a forward proxy) and percent-encoded dots, slashes or NULs in the path
//! are refused with a 400 that says why.

use http::HeaderMap;
use http::Uri;

use crate::errors::ApiError;

fn bad(message: &str) -> ApiError {
    ApiError::InvalidRequest(message.to_string())
}

/// `raw_target` is the request target exactly as it came on the request line
/// (`None` for HTTP/2, where `:scheme` and `:authority` are always present).
pub fn check(
    raw_target: Option<&[u8]>,
    uri: &Uri,
    headers: &HeaderMap,
    max_header_bytes: usize,
) -> Result<(), ApiError> {
    let header_bytes: usize = raw_target.map_or(uri.path().len(), <[u8]>::len)
        + headers
            .iter()
            .map(|(n, v)| n.as_str().len() + v.len() + 4)
            .sum::<usize>();
    if header_bytes > max_header_bytes {
        return Err(ApiError::HeadersTooLarge {
            limit: max_header_bytes,
        });
    }
    let absolute_form = raw_target.is_some_and(|t| {
        !t.starts_with(b"/") || uri.scheme().is_some() || uri.authority().is_some()
    });
    if absolute_form {
        return Err(bad(
            "absolute-form request targets are not accepted: send the path only (e.g. POST /v1/chat/completions)",
        ));
    }
    let path = uri.path().as_bytes();
    let encoded = |enc: &[u8]| path.windows(enc.len()).any(|w| w.eq_ignore_ascii_case(enc));
    if [b"%2e", b"%2f", b"%5c", b"%00"]
        .iter()
        .any(|enc| encoded(*enc))
        || path.contains(&b'\\')
    {
        return Err(bad(
            "the request path must not contain encoded dots, slashes, backslashes or NUL bytes",
        ));
    }
    // The gateway never tunnels. `h2c` (curl --http2 on plain HTTP) is only
    // an offer, safely declined by answering in HTTP/1.1.
    if let Some(upgrade) = headers.get(http::header::UPGRADE) {
        if !upgrade.as_bytes().trim_ascii().eq_ignore_ascii_case(b"h2c") {
            return Err(bad(
                "protocol upgrades (Upgrade header) are not accepted: this gateway serves plain HTTP requests only",
            ));
        }
    }
    // At most two of each are looked at: no list is built per request.
    let mut lengths = headers.get_all(http::header::CONTENT_LENGTH).iter();
    let mut codings = headers.get_all(http::header::TRANSFER_ENCODING).iter();
    let (length, coding) = (lengths.next(), codings.next());
    if length.is_some() && coding.is_some() {
        return Err(bad(
            "a request must not carry both Content-Length and Transfer-Encoding",
        ));
    }
    if lengths.next().is_some() || length.is_some_and(|v| v.as_bytes().contains(&b',')) {
        return Err(bad("a request must carry a single Content-Length"));
    }
    if let Some(v) = length {
        let valid = !v.is_empty() && v.as_bytes().iter().all(u8::is_ascii_digit);
        if !valid {
            return Err(bad("invalid Content-Length header"));
        }
    }
    if codings.next().is_some()
        || coding.is_some_and(|v| !v.as_bytes().trim_ascii().eq_ignore_ascii_case(b"chunked"))
    {
        return Err(bad(
            "Transfer-Encoding other than a single 'chunked' is not supported",
        ));
    }
    Ok(())
}

/// Pingora drops `Content-Length` from a request that also carries
/// `Transfer-Encoding` (RFC 9112 lets a server do that) before any of our
/// phases sees it; the raw header block still shows both. Such a request is
/// how smuggling starts, so it is refused, as SECURITY.md says.
pub fn check_raw_framing(raw_header: &[u8]) -> Result<(), ApiError> {
    let has = |name: &[u8]| {
        raw_header.split(|b| *b == b'\n').skip(1).any(|line| {
            line.len() > name.len()
                && line[..name.len()].eq_ignore_ascii_case(name)
                && line[name.len()..].trim_ascii_start().starts_with(b":")
        })
    };
    if has(b"content-length") && has(b"transfer-encoding") {
        return Err(bad(
            "a request must not carry both Content-Length and Transfer-Encoding",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(target: &str, headers: &[(&str, &str)]) -> Result<(), ApiError> {
        let uri: Uri = target.parse().unwrap();
        let mut map = HeaderMap::new();
        for (k, v) in headers {
            map.append(
                http::header::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        check(Some(target.as_bytes()), &uri, &map, 8192)
    }

    #[test]
    fn ordinary_requests_pass() {
        assert!(req("/v1/chat/completions", &[("content-length", "12")]).is_ok());
        assert!(req("/v1/chat/completions", &[("transfer-encoding", "chunked")]).is_ok());
        assert!(req("/v1/models?x=%20", &[]).is_ok());
    }

    #[test]
    fn smuggling_vectors_are_400() {
        for headers in [
            &[("content-length", "5"), ("transfer-encoding", "chunked")][..],
            &[("content-length", "5"), ("content-length", "6")],
            &[("content-length", "5, 5")],
            &[("content-length", "+5")],
            &[("transfer-encoding", "gzip, chunked")],
            &[
                ("transfer-encoding", "chunked"),
                ("transfer-encoding", "chunked"),
            ],
            &[("transfer-encoding", "identity")],
            &[("upgrade", "websocket"), ("connection", "upgrade")],
        ] {
            let e = req("/v1/chat/completions", headers).unwrap_err();
            assert_eq!(e.status(), 400, "{headers:?}");
        }
    }

    #[test]
    fn both_framings_in_the_raw_header_are_400() {
        let both = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert_eq!(check_raw_framing(both).unwrap_err().status(), 400);
        let one = b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nX-Content-Length: 5\r\n\r\n";
        assert!(check_raw_framing(one).is_ok());
    }

    #[test]
    fn http2_requests_carry_their_authority() {
        let uri: Uri = "https://edge.example/v1/models".parse().unwrap();
        assert!(check(None, &uri, &HeaderMap::new(), 8192).is_ok());
    }

    #[test]
    fn oversized_headers_are_431() {
        let big = "a".repeat(9000);
        let e = req("/v1/models", &[("x-big", &big)]).unwrap_err();
        assert_eq!(e.status(), 431);
    }

    #[test]
    fn paths_and_targets() {
        for target in [
            "http://evil.example/v1/models",
            "/v1/%2e%2e/admin",
            "/v1/models%2Fsecret",
            "/v1/a%00b",
            "/v1/a%5cb",
        ] {
            assert_eq!(req(target, &[]).unwrap_err().status(), 400, "{target}");
        }
    }
}
