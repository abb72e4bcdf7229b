//! CORS for browser clients.
//!
//! Browsers send a preflight `OPTIONS` before a cross-origin `POST` with an
//! `Authorization` header; the gateway answers it itself (never 405, never
//! forwarded). Only configured origins are echoed back. llama-server's own
//! (empty) `Access-Control-Allow-Origin` is always removed, so what the client
//! sees is the gateway's policy alone.

use std::time::Duration;

use pingora_error::Result;
use pingora_http::ResponseHeader;

#[derive(Debug, Clone, Default)]
pub struct CorsPolicy {
    /// Allowed origins; `*` allows any.
    pub allowed_origins: Vec<String>,
    pub max_age: Duration,
}

const ALLOWED_METHODS: &str = "GET, POST, OPTIONS";
const DEFAULT_ALLOWED_HEADERS: &str = "Authorization, Content-Type, X-Request-Id";
const EXPOSED_HEADERS: &str = "X-Request-Id, Retry-After";

impl CorsPolicy {
    pub fn enabled(&self) -> bool {
        !self.allowed_origins.is_empty()
    }

    /// The origin to echo, if the request's `Origin` is allowed.
    pub fn allowed(&self, origin: Option<&str>) -> Option<String> {
        let origin = origin?.trim();
        if origin.is_empty() {
            return None;
        }
        self.allowed_origins
            .iter()
            .any(|o| o == "*" || o.eq_ignore_ascii_case(origin))
            .then(|| origin.to_string())
    }

    /// The request's `Origin` as the access log shows it when the policy
    /// refuses it (`None`: no `Origin`, or an allowed one), so the operator
    /// sees which origin to add to `cors.allowed_origins`. Browsers send
    /// `Origin` only cross-origin or with a POST, and every page is
    /// cross-origin to the gateway. Client text: cut to 128 characters,
    /// anything outside an origin's alphabet shown as `?`.
    pub fn refused(&self, origin: Option<&str>) -> Option<String> {
        let origin = origin?.trim();
        if origin.is_empty() || self.allowed(Some(origin)).is_some() {
            return None;
        }
        Some(
            origin
                .chars()
                .take(128)
                .map(|c| {
                    if c.is_ascii_alphanumeric() || ":/.-_[]".contains(c) {
                        c
                    } else {
                        '?'
                    }
                })
                .collect(),
        )
    }

    /// Adds our CORS headers for `allowed_origin` (upstream ones must be
    /// stripped first with [`strip_upstream_cors`]). `Vary: Origin` is added
    /// once, next to any other `Vary` value already there.
    pub fn apply(&self, resp: &mut ResponseHeader, allowed_origin: Option<&str>) -> Result<()> {
        if let Some(origin) = allowed_origin {
            resp.insert_header("Access-Control-Allow-Origin", origin)?;
            resp.insert_header("Access-Control-Expose-Headers", EXPOSED_HEADERS)?;
        }
        let varies_by_origin = resp.headers.get_all("vary").iter().any(|v| {
            v.to_str().is_ok_and(|v| {
                v.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("origin") || t.trim() == "*")
            })
        });
        if self.enabled() && !varies_by_origin {
            resp.append_header("Vary", "Origin")?;
        }
        Ok(())
    }

    /// The answer to a preflight `OPTIONS`, without the headers every
    /// response gets from [`apply`](Self::apply) (the one place that writes
    /// the client's header adds them).
    pub fn preflight(
        &self,
        allowed_origin: Option<&str>,
        requested_headers: Option<&str>,
    ) -> Result<ResponseHeader> {
        let mut resp = ResponseHeader::build(204, Some(6))?;
        resp.insert_header("Allow", ALLOWED_METHODS)?;
        if allowed_origin.is_some() {
            resp.insert_header("Access-Control-Allow-Methods", ALLOWED_METHODS)?;
            let headers = requested_headers
                .filter(|h| {
                    h.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b", -_".contains(&b))
                })
                .filter(|h| !h.is_empty() && h.len() <= 1024)
                .unwrap_or(DEFAULT_ALLOWED_HEADERS);
            resp.insert_header("Access-Control-Allow-Headers", headers)?;
            resp.insert_header("Access-Control-Max-Age", self.max_age.as_secs().to_string())?;
        }
        Ok(resp)
    }
}

/// Removes every `Access-Control-*` header an upstream response carries.
/// A CORS response header (`Access-Control-*`, lower-case as `http` names are).
pub fn is_cors_header(name: &str) -> bool {
    name.starts_with("access-control-")
}

pub fn strip_upstream_cors(resp: &mut ResponseHeader) {
    let names: Vec<_> = resp
        .headers
        .keys()
        .filter(|n| is_cors_header(n.as_str()))
        .cloned()
        .collect();
    for name in names {
        resp.remove_header(&name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(origins: &[&str]) -> CorsPolicy {
        CorsPolicy {
            allowed_origins: origins.iter().map(|s| s.to_string()).collect(),
            max_age: Duration::from_secs(600),
        }
    }

    #[test]
    fn only_configured_origins_are_echoed() {
        let p = policy(&["https://chat.example.com"]);
        assert_eq!(
            p.allowed(Some("https://chat.example.com")).as_deref(),
            Some("https://chat.example.com")
        );
        assert_eq!(p.allowed(Some("https://evil.example.com")), None);
        assert_eq!(p.allowed(None), None);
        assert_eq!(
            policy(&["*"]).allowed(Some("http://x")).as_deref(),
            Some("http://x")
        );
        assert_eq!(policy(&[]).allowed(Some("http://x")), None);
    }

    #[test]
    fn llama_servers_empty_header_never_reaches_the_client() {
        let mut resp = ResponseHeader::build(200, None).unwrap();
        resp.insert_header("Access-Control-Allow-Origin", "")
            .unwrap();
        strip_upstream_cors(&mut resp);
        policy(&[]).apply(&mut resp, None).unwrap();
        assert!(!resp.headers.contains_key("access-control-allow-origin"));
        policy(&["http://a"])
            .apply(&mut resp, Some("http://a"))
            .unwrap();
        assert_eq!(resp.headers["access-control-allow-origin"], "http://a");
        assert_eq!(resp.headers["vary"], "Origin");
    }

    #[test]
    fn vary_origin_is_written_once() {
        let p = policy(&["http://a"]);
        let mut resp = p.preflight(Some("http://a"), None).unwrap();
        p.apply(&mut resp, Some("http://a")).unwrap();
        p.apply(&mut resp, Some("http://a")).unwrap();
        assert_eq!(resp.headers.get_all("vary").iter().count(), 1);
        let mut upstream = ResponseHeader::build(200, None).unwrap();
        upstream.insert_header("Vary", "Accept-Encoding").unwrap();
        p.apply(&mut upstream, None).unwrap();
        let vary: Vec<_> = upstream.headers.get_all("vary").iter().collect();
        assert_eq!(vary, ["Accept-Encoding", "Origin"]);
    }

    #[test]
    fn refused_origins_are_named_for_the_log() {
        let p = policy(&["http://a"]);
        assert_eq!(p.refused(Some("http://a")), None);
        assert_eq!(p.refused(None), None);
        assert_eq!(p.refused(Some(" ")), None);
        assert_eq!(p.refused(Some("null")).as_deref(), Some("null"));
        assert_eq!(
            p.refused(Some("http://evil.example:8080")).as_deref(),
            Some("http://evil.example:8080")
        );
        assert_eq!(
            p.refused(Some("http://x y\"z")).as_deref(),
            Some("http://x?y?z")
        );
        assert_eq!(p.refused(Some(&"a".repeat(500))).unwrap().len(), 128);
        // Without a policy every origin is refused.
        assert!(policy(&[]).refused(Some("http://a")).is_some());
    }

    #[test]
    fn preflight() {
        let p = policy(&["http://a"]);
        let ok = p
            .preflight(Some("http://a"), Some("authorization, content-type"))
            .unwrap();
        assert_eq!(ok.status.as_u16(), 204);
        assert_eq!(
            ok.headers["access-control-allow-headers"],
            "authorization, content-type"
        );
        assert_eq!(ok.headers["access-control-max-age"], "600");
        let denied = p.preflight(None, Some("authorization")).unwrap();
        assert_eq!(denied.status.as_u16(), 204);
        assert!(!denied.headers.contains_key("access-control-allow-origin"));
        let odd = p.preflight(Some("http://a"), Some("x\r\ny")).unwrap();
        assert_eq!(
            odd.headers["access-control-allow-headers"],
            DEFAULT_ALLOWED_HEADERS
        );
    }
}
