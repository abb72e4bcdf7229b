//! llm-edge: an edge gateway, built on Pingora, that puts a self-hosted
//! llama.cpp `llama-server` on the public internet with API keys, public model
//! names, unbuffered streaming and cancellation.

pub mod admission;
pub mod auth;
pub mod balance;
pub mod body;
pub mod budget;
pub mod check;
pub mod cli;
pub mod clients;
pub mod config;
pub mod cors;
pub mod ctx;
pub mod errors;
pub mod gateway_error;
pub mod headers;
pub mod hygiene;
pub mod limits;
pub mod logging;
pub mod metrics;
pub mod metrics_app;
pub mod models;
pub mod proxy;
pub mod relay;
pub mod routes;
pub mod server;
pub mod sse;
pub mod state;
pub mod upstream;
