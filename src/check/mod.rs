//! `llm-edge check`: client-side diagnostics, run from any client machine
//! (Machine C) against a gateway.
//!
//! Five steps, in order, each reported as one PASS/WARN/FAIL/SKIP line with a
//! hint naming the likely cause of a failure:
//!
//! 1. `connection`: `GET /health` (no key): is the gateway there at all?
//! 2. `upstream`: `GET /health/upstream` (no key): is llama-server reachable
//!    behind the SSH tunnel? Only a warning, so the auth step still runs.
//! 3. `models`: `GET /v1/models` with the key: is the key accepted, which models?
//! 4. `chat`: `POST /v1/chat/completions`, a short prompt, `max_tokens` 16.
//! 5. `streaming`: the same with `stream: true`; passes when `data: [DONE]`
//!    arrives, and measures the time to the first token and tokens/s.
//!
//! Steps that cannot work after an earlier failure are reported as skipped.
//! Every network step is bounded by `--timeout`. Exit code: 0 when nothing
//! failed, 1 on any failure, 2 on a usage error.
//!
//! Files: `settings` (flags and environment), `transport` (no HTTP answer:
//! why, and the hint), `hints` (error bodies and their hints), `stream` (the
//! SSE scan) and `report` (the lines, JSON and exit code) are pure and
//! unit-tested in `tests.rs`; `net` (the HTTP plumbing) and `steps` (the five
//! steps) talk to the gateway and are tested end to end by `tests/check.rs`.
//! This file runs the steps in order.
//!
//! A client of the gateway: must not import `gateway`, `policy`, `upstream`
//! or `openai`; only `cli` for its arguments and `errors::code` for the
//! gateway's error codes (matched through those constants, never re-typed).

use std::io::Write as _;
use std::process::ExitCode;

use serde_json::json;

use crate::cli::CheckArgs;

mod hints;
mod net;
mod report;
mod settings;
mod steps;
mod stream;
mod transport;

pub use hints::{api_error_hint, parse_error_body, snippet, ErrorInfo, HintCtx};
pub use report::{Check, Report, Status};
pub use settings::{normalize_base_url, resolve_settings, BaseUrl, Settings};
pub use steps::MAX_TOKENS;
pub use stream::StreamScan;
pub use transport::{classify_transport, transport_hint, TransportKind};

use net::Net;

/// Runs `llm-edge check` and returns its exit code.
pub fn run(args: &CheckArgs) -> ExitCode {
    let settings = match resolve_settings(args, &|name| std::env::var(name).ok()) {
        Ok(s) => s,
        Err(e) => {
            if args.json {
                let doc = json!({"ok": false, "base_url": null, "error": e, "checks": []});
                emit(&format!(
                    "{}\n",
                    serde_json::to_string_pretty(&doc).unwrap_or_default()
                ));
            }
            eprintln!("llm-edge check: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("llm-edge check: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let json_mode = settings.json;
    let report = runtime.block_on(run_checks(&settings, &mut |check: &Check| {
        if !json_mode {
            emit(&format!("{}\n", check.line()));
        }
    }));
    if json_mode {
        let doc = serde_json::to_string_pretty(&report.to_json()).unwrap_or_default();
        emit(&format!("{doc}\n"));
    } else {
        emit(&format!("{}\n", report.summary()));
    }
    report.exit_code()
}

/// Writes to stdout, ignoring a closed pipe (no panic as `println!` would).
fn emit(text: &str) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes());
    let _ = out.flush();
}

/// Runs the steps in order; `on_check` sees each as it completes.
pub async fn run_checks(s: &Settings, on_check: &mut dyn FnMut(&Check)) -> Report {
    let mut report = Report {
        base: s.base.clone(),
        model: s.model.clone(),
        checks: Vec::new(),
    };
    let mut push = |report: &mut Report, check: Check| {
        on_check(&check);
        report.checks.push(check);
    };
    let client = match reqwest::Client::builder()
        .connect_timeout(s.timeout)
        .user_agent(concat!("llm-edge-check/", env!("CARGO_PKG_VERSION")))
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            push(
                &mut report,
                Check::fail(
                    "connection",
                    format!("cannot create the HTTP client: {e}"),
                    "a local problem (TLS roots, proxy variables): see the message",
                ),
            );
            for name in ["upstream", "models", "chat", "streaming"] {
                push(&mut report, Check::skipped(name, "no HTTP client"));
            }
            return report;
        }
    };
    let net = Net { client, s };

    let (check, reachable) = net.connection().await;
    push(&mut report, check);
    if !reachable {
        for name in ["upstream", "models", "chat", "streaming"] {
            push(
                &mut report,
                Check::skipped(name, "the gateway cannot be reached"),
            );
        }
        return report;
    }
    push(&mut report, net.upstream().await);

    let (check, models) = net.models().await;
    push(&mut report, check);
    let Some(models) = models else {
        push(
            &mut report,
            Check::skipped("chat", "the models step failed"),
        );
        push(
            &mut report,
            Check::skipped("streaming", "the models step failed"),
        );
        return report;
    };
    let Some(model) = s.model.clone().or_else(|| models.first().cloned()) else {
        let why = "no model to try: the key lists none; pass --model";
        push(&mut report, Check::skipped("chat", why));
        push(&mut report, Check::skipped("streaming", why));
        return report;
    };
    report.model = Some(model.clone());
    let ctx = HintCtx {
        model: Some(&model),
        models: &models,
        key_source: s.key_source,
    };

    let check = net.chat(&model, &ctx).await;
    let chat_ok = check.status == Status::Pass;
    push(&mut report, check);
    if !chat_ok {
        push(
            &mut report,
            Check::skipped("streaming", "the chat step failed"),
        );
        return report;
    }
    push(&mut report, net.streaming(&model, &ctx).await);
    report
}

#[cfg(test)]
mod tests;
