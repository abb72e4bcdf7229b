//! Command-line interface.
//!
//! Only Pingora's `--upgrade` and `--daemon` flags are exposed: Pingora's own
//! `-c` would read our YAML as *its* config and silently ignore every field.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "llm-edge",
    version,
    about = "An edge gateway for self-hosted llama.cpp servers"
)]
pub struct Cli {
    /// YAML configuration file (built-in defaults when omitted).
    #[arg(long, value_name = "FILE", global = true)]
    pub config: Option<PathBuf>,

    /// Listen address, overriding the config (e.g. 127.0.0.1:8000).
    #[arg(long, value_name = "HOST:PORT")]
    pub listen: Option<String>,

    /// Check the configuration and exit (non-zero with the reason when invalid).
    #[arg(long)]
    pub validate: bool,

    /// Take over the listening sockets from a running instance (zero-downtime reload).
    #[arg(short = 'u', long)]
    pub upgrade: bool,

    /// Run in the background.
    #[arg(short = 'd', long)]
    pub daemon: bool,

    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Read an API key from stdin and print its SHA-256 hex digest for the config.
    HashKey,
}
