//! Transport failures: what went wrong when no HTTP answer came (refused,
//! timeout, DNS, TLS, closed, unreachable), classified from the client
//! error, and the hint for each. Pure.

use std::time::Duration;

use super::settings::BaseUrl;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransportKind {
    Refused,
    Timeout,
    Dns,
    Tls,
    /// Connected, then closed or reset without an HTTP answer.
    Closed,
    /// No route to the host or network.
    Unreachable,
    Other,
}

impl TransportKind {
    pub fn as_str(self) -> &'static str {
        match self {
            TransportKind::Refused => "connection_refused",
            TransportKind::Timeout => "timeout",
            TransportKind::Dns => "dns",
            TransportKind::Tls => "tls",
            TransportKind::Closed => "connection_closed",
            TransportKind::Unreachable => "unreachable",
            TransportKind::Other => "transport",
        }
    }
}

/// Classifies a client error from its flags, the kinds of the I/O errors in
/// its source chain, and the chain's text.
pub fn classify_transport(
    is_timeout: bool,
    io_kinds: &[std::io::ErrorKind],
    text: &str,
    https: bool,
) -> TransportKind {
    use std::io::ErrorKind as K;
    let text = text.to_ascii_lowercase();
    let has = |needles: &[&str]| needles.iter().any(|n| text.contains(n));
    if io_kinds.contains(&K::ConnectionRefused) || has(&["connection refused"]) {
        TransportKind::Refused
    } else if is_timeout || io_kinds.contains(&K::TimedOut) || has(&["timed out"]) {
        TransportKind::Timeout
    } else if has(&[
        "dns error",
        "failed to lookup address",
        "name or service not known",
        "nodename nor servname",
        "no such host",
        "name resolution",
    ]) {
        TransportKind::Dns
    } else if https
        && has(&[
            "tls",
            "certificate",
            "handshake",
            "corrupt message",
            "invalidcontenttype",
            "unknownissuer",
            "notvalidforname",
            "alert",
        ])
    {
        TransportKind::Tls
    } else if io_kinds
        .iter()
        .any(|k| matches!(k, K::HostUnreachable | K::NetworkUnreachable))
        || has(&["no route to host", "network is unreachable"])
    {
        TransportKind::Unreachable
    } else if io_kinds.iter().any(|k| {
        matches!(
            k,
            K::ConnectionReset | K::ConnectionAborted | K::UnexpectedEof | K::BrokenPipe
        )
    }) || has(&[
        "connection closed",
        "connection reset",
        "incomplete message",
        "broken pipe",
    ]) {
        TransportKind::Closed
    } else {
        TransportKind::Other
    }
}

/// The hint for a transport failure while reaching the gateway.
pub fn transport_hint(kind: TransportKind, base: &BaseUrl, timeout: Duration) -> String {
    let (host, port) = (&base.host, base.port);
    let secs = timeout.as_secs();
    match kind {
        TransportKind::Refused => format!(
            "gateway not running or port closed: nothing accepts connections at {host}:{port}; start llm-edge on the edge (systemctl status llm-edge) or check the port"
        ),
        TransportKind::Timeout => format!(
            "firewall or wrong address: nothing answered from {host}:{port} within {secs} s (a firewall dropping packets, a wrong IP or port, or a service there that is not llm-edge)"
        ),
        TransportKind::Dns => format!(
            "DNS failure: the name '{host}' does not resolve; check its spelling in the base URL, or use the edge's IP address"
        ),
        TransportKind::Tls => format!(
            "TLS error talking to https://{host}:{port}: check the certificate (name, expiry, issuer), or use http:// if this port is not a TLS one (llm-edge speaks TLS only on its tls.listen port, when configured; its listen port is plain HTTP)"
        ),
        TransportKind::Closed => format!(
            "{host}:{port} accepted the connection but closed it without an HTTP answer: a wrong port, a proxy in the way, or http:// to a TLS port (try https://)"
        ),
        TransportKind::Unreachable => format!(
            "no route to {host}: a wrong address, or the network or a firewall blocks it"
        ),
        TransportKind::Other => format!("cannot talk to the gateway at {host}:{port}"),
    }
}
