//! Protections keyed by client IP, applied before authentication.
//!
//! An edge on a public address gets key-guessing and connection floods.
//! Failed authentications per IP per minute and concurrent requests per IP
//! are counted in fixed-size estimators (Pingora's count-min sketches), so
//! memory stays bounded however many addresses show up. The client IP is the
//! TCP peer, or, only when that peer is a configured trusted proxy, the
//! nearest untrusted address in `X-Forwarded-For`.

use std::net::IpAddr;
use std::time::Duration;

use pingora_limits::inflight::{Guard, Inflight};
use pingora_limits::rate::Rate;

use crate::labels::LimitReason;
use crate::policy::limits::Refusal;

/// An IP network in CIDR form (`10.0.0.0/8`, `::1/128`; a bare address is a /32 or /128).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpNet {
    addr: IpAddr,
    prefix: u8,
}

impl std::str::FromStr for IpNet {
    type Err = String;

    fn from_str(s: &str) -> Result<IpNet, String> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr
            .trim()
            .parse()
            .map_err(|_| format!("'{s}' is not an IP address or CIDR"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("'{s}' has an invalid prefix length"))?,
        };
        Ok(IpNet { addr, prefix })
    }
}

impl IpNet {
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct ClientPolicy {
    pub trusted_proxies: Vec<IpNet>,
    pub max_auth_failures_per_minute: Option<u32>,
    pub max_concurrent_per_ip: Option<u32>,
}

pub struct ClientGuard {
    policy: ClientPolicy,
    auth_failures: Rate,
    in_flight: Inflight,
}

/// Holds one of the client IP's concurrent requests.
pub struct IpSlot(#[allow(dead_code)] Guard);

impl std::fmt::Debug for IpSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("IpSlot")
    }
}

impl ClientGuard {
    pub fn new(policy: ClientPolicy) -> ClientGuard {
        ClientGuard {
            policy,
            auth_failures: Rate::new(Duration::from_secs(60)),
            in_flight: Inflight::new(),
        }
    }

    /// The client's address: the peer, or what a trusted proxy says it forwarded.
    pub fn client_ip(&self, peer: Option<IpAddr>, forwarded_for: Option<&str>) -> Option<IpAddr> {
        let peer = peer?;
        let trusted = |ip: IpAddr| self.policy.trusted_proxies.iter().any(|n| n.contains(ip));
        if !trusted(peer) {
            return Some(peer);
        }
        let Some(xff) = forwarded_for else {
            return Some(peer);
        };
        // Walk from the nearest hop outwards; the first untrusted address is the client.
        let mut client = peer;
        for hop in xff.rsplit(',') {
            match hop.trim().parse::<IpAddr>() {
                Ok(ip) => {
                    client = ip;
                    if !trusted(ip) {
                        break;
                    }
                }
                Err(_) => break,
            }
        }
        Some(client)
    }

    /// Refuses an IP that failed authentication too often this minute.
    pub fn check_auth_throttle(&self, ip: IpAddr) -> Result<(), Refusal> {
        let Some(max) = self.policy.max_auth_failures_per_minute else {
            return Ok(());
        };
        if self.auth_failures.observe(&ip, 0) >= max as isize {
            return Err(Refusal {
                reason: LimitReason::IpAuthFailures,
                message: format!(
                    "too many failed authentications from this address (more than {max} a minute); wait and check your API key"
                ),
                retry_after: Duration::from_secs(60),
            });
        }
        Ok(())
    }

    pub fn note_auth_failure(&self, ip: IpAddr) {
        if self.policy.max_auth_failures_per_minute.is_some() {
            self.auth_failures.observe(&ip, 1);
        }
    }

    /// Counts one concurrent request of `ip`, or refuses it.
    pub fn enter(&self, ip: IpAddr) -> Result<Option<IpSlot>, Refusal> {
        let Some(max) = self.policy.max_concurrent_per_ip else {
            return Ok(None);
        };
        let (guard, count) = self.in_flight.incr(ip, 1);
        if count > max as isize {
            return Err(Refusal {
                reason: LimitReason::IpConcurrency,
                message: format!("too many concurrent requests from this address (limit {max})"),
                retry_after: Duration::from_secs(1),
            });
        }
        Ok(Some(IpSlot(guard)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn cidrs() {
        let net: IpNet = "10.1.0.0/16".parse().unwrap();
        assert!(net.contains(ip("10.1.200.3")));
        assert!(!net.contains(ip("10.2.0.1")));
        assert!("127.0.0.1"
            .parse::<IpNet>()
            .unwrap()
            .contains(ip("127.0.0.1")));
        assert!("::1/128".parse::<IpNet>().unwrap().contains(ip("::1")));
        assert!("0.0.0.0/0"
            .parse::<IpNet>()
            .unwrap()
            .contains(ip("8.8.8.8")));
        assert!("1.2.3.4/33".parse::<IpNet>().is_err());
        assert!("nope".parse::<IpNet>().is_err());
    }

    #[test]
    fn forwarded_for_is_trusted_only_from_proxies() {
        let g = ClientGuard::new(ClientPolicy {
            trusted_proxies: vec!["10.0.0.0/8".parse().unwrap()],
            ..Default::default()
        });
        // untrusted peer: XFF ignored
        assert_eq!(
            g.client_ip(Some(ip("203.0.113.9")), Some("1.1.1.1")),
            Some(ip("203.0.113.9"))
        );
        // trusted peer: nearest untrusted hop
        assert_eq!(
            g.client_ip(
                Some(ip("10.0.0.2")),
                Some("1.1.1.1, 198.51.100.7, 10.0.0.5")
            ),
            Some(ip("198.51.100.7"))
        );
        // garbage stops the walk at the last good hop
        assert_eq!(
            g.client_ip(Some(ip("10.0.0.2")), Some("evil, 10.0.0.9")),
            Some(ip("10.0.0.9"))
        );
        assert_eq!(
            g.client_ip(Some(ip("10.0.0.2")), None),
            Some(ip("10.0.0.2"))
        );
    }

    #[test]
    fn auth_failures_throttle_per_ip() {
        let g = ClientGuard::new(ClientPolicy {
            max_auth_failures_per_minute: Some(3),
            ..Default::default()
        });
        let (a, b) = (ip("192.0.2.1"), ip("192.0.2.2"));
        for _ in 0..3 {
            assert!(g.check_auth_throttle(a).is_ok());
            g.note_auth_failure(a);
        }
        assert_eq!(
            g.check_auth_throttle(a).unwrap_err().reason,
            LimitReason::IpAuthFailures
        );
        assert!(g.check_auth_throttle(b).is_ok());
    }

    #[test]
    fn concurrency_per_ip() {
        let g = ClientGuard::new(ClientPolicy {
            max_concurrent_per_ip: Some(2),
            ..Default::default()
        });
        let a = ip("192.0.2.1");
        let s1 = g.enter(a).unwrap();
        let _s2 = g.enter(a).unwrap();
        assert!(g.enter(a).is_err());
        assert!(g.enter(ip("192.0.2.2")).is_ok());
        drop(s1);
        assert!(g.enter(a).is_ok());
    }
}
