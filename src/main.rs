use std::io::Read;
use std::process::ExitCode;

use clap::Parser;

use llm_edge::cli::{Cli, Command};
use llm_edge::config::{process_env, Config};

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Command::HashKey) = cli.command {
        return hash_key();
    }
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let mut cfg = match Config::load(cli.config.as_deref(), &process_env) {
        Ok(cfg) => cfg,
        Err(e) => {
            eprintln!("llm-edge: invalid configuration: {e}");
            return ExitCode::from(2);
        }
    };
    if let Some(listen) = cli.listen {
        if let Err(e) = cfg.set_listen(&listen) {
            eprintln!("llm-edge: --listen: {e}");
            return ExitCode::from(2);
        }
    }
    if cli.validate {
        println!("configuration is valid");
        return ExitCode::SUCCESS;
    }
    llm_edge::server::run(cfg, cli.upgrade, cli.daemon)
}

fn hash_key() -> ExitCode {
    let mut input = String::new();
    if let Err(e) = std::io::stdin().read_to_string(&mut input) {
        eprintln!("llm-edge hash-key: cannot read stdin: {e}");
        return ExitCode::from(2);
    }
    let key = input.strip_suffix('\n').unwrap_or(&input);
    let key = key.strip_suffix('\r').unwrap_or(key);
    if key.is_empty() {
        eprintln!(
            "llm-edge hash-key: no key on stdin (usage: printf '%s' 'sk-...' | llm-edge hash-key)"
        );
        return ExitCode::from(2);
    }
    println!("{}", llm_edge::auth::digest_hex(key));
    ExitCode::SUCCESS
}
