//! Validation of `upstream`: one `url` or several `servers`, each resolved
//! once to an address, with its key and slot count (inherited from
//! `upstream` when unset).
//!
//! Builds [`Upstream`] from [`UpstreamSection`]; must not import anything
//! outside `config` (the servers are named here, used by `upstream/`).

use std::net::{SocketAddr, ToSocketAddrs};

use super::nonzero;
use crate::config::runtime::{Upstream, UpstreamServer};
use crate::config::schema::{Routing, UpstreamSection};
use crate::config::{err, ConfigError, Secret, DEFAULT_UPSTREAM};

pub(super) fn validate_upstream(s: UpstreamSection) -> Result<Upstream, ConfigError> {
    validate_upstream_key("upstream.api_key", s.api_key.as_ref().map(Secret::expose))?;
    let servers = match (s.url, s.servers.is_empty()) {
        (Some(_), false) => {
            return Err(err(
                "upstream.url",
                "give either upstream.url (one llama-server) or upstream.servers (several), not both; LLAMA_BASE_URL also sets upstream.url",
            ))
        }
        (url, true) => {
            let url = url.unwrap_or_else(|| DEFAULT_UPSTREAM.into());
            let (authority, addr) = parse_upstream_url("upstream.url", &url)?;
            vec![UpstreamServer {
                name: authority.clone(),
                authority,
                addr,
                api_key: s.api_key.clone(),
                max_in_flight: s.max_in_flight,
                context: default_context(s.max_in_flight),
            }]
        }
        (None, false) => {
            let mut servers: Vec<UpstreamServer> = Vec::with_capacity(s.servers.len());
            for (i, srv) in s.servers.into_iter().enumerate() {
                let at = |field: &str| format!("upstream.servers[{i}].{field}");
                let (authority, addr) = parse_upstream_url(&at("url"), &srv.url)?;
                let name = srv.name.unwrap_or_else(|| authority.clone());
                if !valid_model_name(&name) {
                    return Err(err(
                        at("name"),
                        format!("'{name}' is not a valid name (non-empty, no spaces or control characters)"),
                    ));
                }
                if let Some(other) = servers.iter().find(|o| o.addr == addr) {
                    return Err(err(
                        at("url"),
                        format!("'{}' is the same address as server '{}'", srv.url, other.name),
                    ));
                }
                if let Some(other) = servers.iter().find(|o| o.name == name) {
                    return Err(err(
                        at("name"),
                        format!("'{name}' is already the name of the server at {}", other.authority),
                    ));
                }
                validate_upstream_key(&at("api_key"), srv.api_key.as_ref().map(Secret::expose))?;
                let max_in_flight = srv.max_in_flight.unwrap_or(s.max_in_flight);
                let context = match srv.context {
                    Some(0) => return Err(err(at("context"), "must be at least 1 (tokens)")),
                    Some(c) => c,
                    None => default_context(max_in_flight),
                };
                servers.push(UpstreamServer {
                    name,
                    authority,
                    addr,
                    api_key: srv.api_key.or_else(|| s.api_key.clone()),
                    max_in_flight,
                    context,
                });
            }
            servers
        }
    };
    let load_factor = s.affinity.load_factor;
    if !(0.0..=100.0).contains(&load_factor) {
        return Err(err(
            "upstream.affinity.load_factor",
            format!("{load_factor} is out of range; give a number from 0 to 100 (0.25: no server above 1.25 times the mean load)"),
        ));
    }
    let header = s.affinity.key_header.trim().to_ascii_lowercase();
    if !header.is_empty() && http::HeaderName::from_bytes(header.as_bytes()).is_err() {
        return Err(err(
            "upstream.affinity.key_header",
            format!("'{header}' is not a valid header name"),
        ));
    }
    // Affinity only matters with a choice to make; one server is least load.
    let routing = s.routing.unwrap_or(if servers.len() > 1 {
        Routing::CacheAffinity
    } else {
        Routing::LeastLoad
    });
    Ok(Upstream {
        routing,
        load_factor,
        affinity_header: (!header.is_empty()).then_some(header),
        servers,
        connect_timeout: nonzero("upstream.connect_timeout", s.connect_timeout)?,
        first_byte_timeout: nonzero("upstream.first_byte_timeout", s.first_byte_timeout)?,
        idle_timeout: nonzero("upstream.idle_timeout", s.idle_timeout)?,
        total_timeout: match s.total_timeout {
            Some(d) => Some(nonzero("upstream.total_timeout", d)?),
            None => None,
        },
        pool_idle_timeout: s.pool_idle_timeout,
        health_timeout: nonzero("upstream.health_timeout", s.health_timeout)?,
        health_interval: nonzero("upstream.health_interval", s.health_interval)?,
        queue_timeout: nonzero("upstream.queue_timeout", s.queue_timeout)?,
        max_queued: s.max_queued,
    })
}

/// A server's context when not configured: 8192 tokens per slot (one slot
/// without a limit).
fn default_context(max_in_flight: usize) -> u64 {
    8192 * max_in_flight.max(1) as u64
}

fn validate_upstream_key(path: &str, key: Option<&str>) -> Result<(), ConfigError> {
    match key {
        Some(key) if key.is_empty() || key.bytes().any(|b| b.is_ascii_control()) => Err(err(
            path,
            "must be a non-empty string without control characters",
        )),
        _ => Ok(()),
    }
}

/// `http://HOST:PORT` -> (`host:port`, resolved address).
fn parse_upstream_url(path: &str, url: &str) -> Result<(String, SocketAddr), ConfigError> {
    let url = url.trim();
    let rest = url.strip_prefix("http://").ok_or_else(|| {
        err(
            path,
            format!("'{url}' must start with http:// (the upstream is llama-server at the end of the SSH tunnel)"),
        )
    })?;
    let (authority, rest_path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    if !matches!(rest_path, "" | "/" | "/v1" | "/v1/") {
        return Err(err(
            path,
            format!("'{url}' has a path; give only http://HOST:PORT"),
        ));
    }
    let uri: http::uri::Authority = authority
        .parse()
        .map_err(|_| err(path, format!("'{url}' has no valid HOST:PORT")))?;
    let host = uri.host().trim_start_matches('[').trim_end_matches(']');
    let port = uri.port_u16().unwrap_or(80);
    if host.is_empty() {
        return Err(err(path, format!("'{url}' has no host")));
    }
    // Resolved once here: pingora's HttpPeer::new panics on a name it cannot resolve.
    let addr = (host, port)
        .to_socket_addrs()
        .ok()
        .and_then(|mut addrs| addrs.next())
        .ok_or_else(|| err(path, format!("cannot resolve host '{host}'")))?;
    Ok((format!("{host}:{port}"), addr))
}

pub(super) fn valid_model_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 256
        && !name.chars().any(|c| c.is_control() || c.is_whitespace())
}
