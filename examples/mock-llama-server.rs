//! The mock llama-server (crate `mock-llama`, `crates/mock-llama`) as a standalone process, for the
//! Python/Node client tests and for trying llm-edge without a GPU.
//!
//! Usage: mock-llama-server [--port N] [--token-delay-ms MS] [--tokens N]
//!                          [--alias NAME] [--api-key KEY] [--parallel N]
//! Prints `listening on 127.0.0.1:PORT` once ready.

use std::time::Duration;

use mock_llama::{MockLlama, MockOptions};

#[tokio::main]
async fn main() {
    let mut opts = MockOptions::default();
    let mut port = 0u16;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || {
            args.next()
                .unwrap_or_else(|| panic!("{flag} needs a value"))
        };
        match flag.as_str() {
            "--port" => port = value().parse().expect("--port N"),
            "--token-delay-ms" => {
                opts.token_delay =
                    Duration::from_millis(value().parse().expect("--token-delay-ms MS"));
            }
            "--tokens" => opts.tokens = value().parse().expect("--tokens N"),
            "--alias" => opts.alias = value(),
            "--api-key" => opts.api_key = Some(value()),
            "--parallel" => opts.parallel = value().parse().expect("--parallel N"),
            other => panic!("unknown flag {other}"),
        }
    }
    let mock = MockLlama::start_on(port, opts).await;
    println!("listening on {}", mock.addr);
    tokio::signal::ctrl_c().await.expect("wait for ctrl-c");
}
