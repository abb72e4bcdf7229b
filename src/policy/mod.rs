//! Policy: who may reach what, and how much of it. Keys, per-key limits,
//! the body budget, per-IP guards, CORS, request hygiene, the route table
//! and the header rules between client and llama-server.
//!
//! Pure logic, unit-tested with plain inputs: nothing here talks to a socket.
//! Must not import `gateway` or `upstream`. (`headers` edits Pingora's header
//! types, which are plain data.)

pub mod auth;
pub mod budget;
pub mod clients;
pub mod cors;
pub mod headers;
pub mod hygiene;
pub mod limits;
pub mod ratelimit;
pub mod routes;
pub mod tokens;
