//! `llm-edge usage`: the ledger of the config's `state_dir`, or with
//! `state.redis` the whole fleet's, as a table or JSON. Reads only; a
//! running gateway's last few seconds (one flush interval) may not be in it
//! yet.

use std::path::Path;
use std::process::ExitCode;

use super::report::{self, GroupBy};
use super::store::Store;
use crate::cli::UsageArgs;
use crate::config::{process_env, Config};

pub fn run(config: Option<&Path>, args: &UsageArgs) -> ExitCode {
    let cfg = match Config::load(config, &process_env) {
        Ok(cfg) => cfg,
        Err(e) => {
            eprintln!("llm-edge usage: invalid configuration: {e}");
            return ExitCode::from(2);
        }
    };
    if cfg.state_dir.is_none() && cfg.shared.is_none() {
        eprintln!("llm-edge usage: the configuration has no state_dir, so usage is kept in memory only: read it from the running gateway at http://<metrics.listen>/usage");
        return ExitCode::from(2);
    }
    let Ok(span) = humantime::parse_duration(&args.since) else {
        eprintln!(
            "llm-edge usage: --since '{}' must be a duration such as 24h or 7d",
            args.since
        );
        return ExitCode::from(2);
    };
    let by = GroupBy::parse(&args.by).unwrap_or_default();
    let now_s = crate::policy::tokens::now_ms() / 1000;
    let since_hour = now_s.saturating_sub(span.as_secs()) / 3600;
    // With a shared store, the whole fleet's ledger (every edge adds its
    // rows at each flush); else this edge's file.
    let rows = match (&cfg.shared, cfg.state_dir.as_deref()) {
        (Some(shared), _) => crate::shared::read_usage(shared, since_hour, now_s / 3600),
        (None, Some(dir)) => Store::open_existing(dir).and_then(|s| s.rows(since_hour)),
        (None, None) => Ok(Vec::new()),
    };
    let rows = match rows {
        Ok(rows) => rows,
        Err(e) => {
            eprintln!("llm-edge usage: {e}");
            return ExitCode::from(1);
        }
    };
    let groups = report::group(&rows, by, args.key.as_deref());
    if args.json {
        println!("{}", report::json(&groups, by, since_hour));
    } else {
        println!(
            "usage since {}T{:02}:00Z (UTC){}",
            report::day_label(since_hour),
            since_hour % 24,
            args.key
                .as_deref()
                .map_or(String::new(), |k| format!(", key {k}"))
        );
        print!("{}", report::table(&groups, by));
    }
    ExitCode::SUCCESS
}
