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
    /// Generate a new random API key and the config lines with its hash.
    GenKey {
        /// Key id for the config (appears in logs and metrics).
        #[arg(long, default_value = "new-key")]
        id: String,
    },
    /// Diagnose a gateway from a client machine: connection, auth, models, chat, streaming.
    Check(CheckArgs),
    /// Print the usage ledger (from the config's state_dir): requests and
    /// tokens per key, model or day.
    Usage(UsageArgs),
}

#[derive(Debug, Clone, clap::Args)]
pub struct UsageArgs {
    /// How far back (e.g. 24h, 7d, 30d).
    #[arg(long, default_value = "7d")]
    pub since: String,
    /// Only this key id.
    #[arg(long)]
    pub key: Option<String>,
    /// Group by key, model or day.
    #[arg(long, default_value = "key", value_parser = ["key", "model", "day"])]
    pub by: String,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, clap::Args)]
pub struct CheckArgs {
    /// Gateway URL, with or without /v1 (env: LLM_BASE_URL, then TEST_BASE_URL).
    #[arg(long)]
    pub base_url: Option<String>,
    /// API key (env: LLM_API_KEY, then TEST_API_KEY).
    #[arg(long)]
    pub api_key: Option<String>,
    /// Model to try (env: LLM_MODEL, then TEST_MODEL; default: the first listed).
    #[arg(long)]
    pub model: Option<String>,
    /// Print one JSON document instead of lines.
    #[arg(long)]
    pub json: bool,
    /// Seconds to wait for each step.
    #[arg(long, default_value_t = 30)]
    pub timeout: u64,
}
