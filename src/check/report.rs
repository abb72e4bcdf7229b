//! The report: one [`Check`] per step (PASS/WARN/FAIL/SKIP with a detail, a
//! hint and extra JSON fields), and the [`Report`] that sums them up as JSON
//! and the exit code. Pure. The text output is each check's [`Check::line`],
//! printed by `run` as the step completes, then [`Report::summary`]: there is
//! no whole-report text renderer.

use std::fmt::Write as _;
use std::process::ExitCode;

use serde_json::{json, Map, Value};

use super::settings::BaseUrl;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Pass,
    /// Something is wrong, but the later steps still run.
    Warn,
    Fail,
    /// Not run because an earlier step failed.
    Skipped,
}

impl Status {
    pub fn label(self) -> &'static str {
        match self {
            Status::Pass => "PASS",
            Status::Warn => "WARN",
            Status::Fail => "FAIL",
            Status::Skipped => "SKIP",
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Pass => "pass",
            Status::Warn => "warn",
            Status::Fail => "fail",
            Status::Skipped => "skipped",
        }
    }
}

/// The outcome of one step.
#[derive(Debug, Clone)]
pub struct Check {
    pub name: &'static str,
    pub status: Status,
    pub detail: String,
    pub hint: Option<String>,
    /// Extra JSON fields: `http_status`, `latency_ms`, `models`, `ttft_ms`, ...
    pub metrics: Map<String, Value>,
}

impl Check {
    pub fn new(name: &'static str, status: Status, detail: impl Into<String>) -> Check {
        Check {
            name,
            status,
            detail: detail.into(),
            hint: None,
            metrics: Map::new(),
        }
    }

    pub fn pass(name: &'static str, detail: impl Into<String>) -> Check {
        Check::new(name, Status::Pass, detail)
    }

    pub fn fail(name: &'static str, detail: impl Into<String>, hint: impl Into<String>) -> Check {
        Check::new(name, Status::Fail, detail).hint(hint)
    }

    pub fn warn(name: &'static str, detail: impl Into<String>, hint: impl Into<String>) -> Check {
        Check::new(name, Status::Warn, detail).hint(hint)
    }

    pub fn skipped(name: &'static str, why: &str) -> Check {
        Check::new(name, Status::Skipped, format!("skipped: {why}"))
    }

    pub fn hint(mut self, hint: impl Into<String>) -> Check {
        self.hint = Some(hint.into());
        self
    }

    pub fn with(mut self, key: &str, value: impl Into<Value>) -> Check {
        self.metrics.insert(key.to_string(), value.into());
        self
    }

    pub fn to_json(&self) -> Value {
        let mut m = Map::new();
        m.insert("name".into(), json!(self.name));
        m.insert("ok".into(), json!(self.status == Status::Pass));
        m.insert("status".into(), json!(self.status.as_str()));
        m.insert("detail".into(), json!(self.detail));
        m.insert("hint".into(), json!(self.hint));
        for (k, v) in &self.metrics {
            m.entry(k.clone()).or_insert_with(|| v.clone());
        }
        Value::Object(m)
    }

    /// `PASS connection  gateway at http://... answered in 3 ms`
    pub fn line(&self) -> String {
        let mut line = format!("{} {:<10}  {}", self.status.label(), self.name, self.detail);
        if let Some(hint) = &self.hint {
            let _ = write!(line, " -> hint: {hint}");
        }
        line
    }
}

#[derive(Debug, Clone)]
pub struct Report {
    pub base: BaseUrl,
    pub model: Option<String>,
    pub checks: Vec<Check>,
}

impl Report {
    /// True when no step failed (a warning alone does not fail the run).
    pub fn ok(&self) -> bool {
        self.checks
            .iter()
            .all(|c| matches!(c.status, Status::Pass | Status::Warn))
    }

    pub fn to_json(&self) -> Value {
        json!({
            "ok": self.ok(),
            "base_url": self.base.api,
            "root_url": self.base.root,
            "model": self.model,
            "checks": self.checks.iter().map(Check::to_json).collect::<Vec<_>>(),
        })
    }

    pub fn summary(&self) -> String {
        let count = |s: Status| self.checks.iter().filter(|c| c.status == s).count();
        let mut parts = vec![format!("{} passed", count(Status::Pass))];
        for (status, word) in [
            (Status::Warn, "warning"),
            (Status::Fail, "failed"),
            (Status::Skipped, "skipped"),
        ] {
            let n = count(status);
            if n > 0 {
                let plural = if status == Status::Warn && n > 1 {
                    "s"
                } else {
                    ""
                };
                parts.push(format!("{n} {word}{plural}"));
            }
        }
        format!(
            "result: {} ({}) for {}",
            if self.ok() { "ok" } else { "FAILED" },
            parts.join(", "),
            self.base.api
        )
    }

    pub fn exit_code(&self) -> ExitCode {
        if self.ok() {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(1)
        }
    }
}
