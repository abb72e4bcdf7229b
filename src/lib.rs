//! llm-edge: an edge gateway, built on Pingora, that puts a self-hosted
//! llama.cpp `llama-server` on the public internet with API keys, public model
//! names, unbuffered streaming and cancellation.
//!
//! The folders are the architecture:
//! - [`gateway`]: the Pingora `ProxyHttp` phases and the per-request record;
//!   it wires the others together and is the only part that answers clients.
//! - [`policy`]: who may do what (keys, limits, budgets, per-IP guards,
//!   CORS, hygiene, the route table, header rules), as pure logic.
//! - [`openai`]: the wire formats (request bodies, the SSE dialects, the
//!   model catalogue), as pure logic.
//! - [`upstream`]: llama-server itself (connections, the server set and
//!   balancing, slot admission, the relay of one exchange).
//! - [`shared`]: what several edges share through Redis / Valkey
//!   (`state.redis`): per-key limits and quotas, upstream slot leases.
//! - [`config`], [`metrics`], [`check`] (the client-side diagnostics),
//!   [`errors`] (the one error type), [`server`] (start-up), [`cli`].

#![forbid(unsafe_code)]

pub mod check;
pub mod cli;
pub mod config;
pub mod errors;
pub mod gateway;
pub mod labels;
pub mod ledger;
pub mod logging;
pub mod metrics;
pub mod openai;
pub mod policy;
pub mod server;
pub mod shared;
pub mod state;
pub mod upstream;
