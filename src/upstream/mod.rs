//! llama-server, usually at the end of an SSH reverse tunnel: pooled
//! connections and timeouts ([`client`]), the set of servers with their
//! health and the least-load choice ([`balance`]), fair slot admission
//! ([`admission`]), and the relay of one request and its response between
//! client and server ([`relay`]).
//!
//! Must not import `gateway` (the relay gets what it needs through
//! [`relay::Relay`]).

pub mod admission;
pub mod affinity;
pub mod balance;
pub mod client;
pub mod relay;
