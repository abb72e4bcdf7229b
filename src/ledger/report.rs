//! Reading the ledger: rows grouped by key, model or day, as an aligned
//! table with totals (`llm-edge usage`) or JSON (`llm-edge usage --json`,
//! the metrics listener's `/usage`). Pure: rows in, text out.

use std::collections::BTreeMap;

use super::{Counts, Row};
use crate::policy::tokens::civil_from_days;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GroupBy {
    #[default]
    Key,
    Model,
    Day,
}

impl GroupBy {
    pub fn parse(s: &str) -> Option<GroupBy> {
        match s {
            "key" => Some(GroupBy::Key),
            "model" => Some(GroupBy::Model),
            "day" => Some(GroupBy::Day),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            GroupBy::Key => "key",
            GroupBy::Model => "model",
            GroupBy::Day => "day",
        }
    }
}

/// `2026-12-02` for an hour since the epoch.
pub fn day_label(hour: u64) -> String {
    let (y, m, d) = civil_from_days((hour / 24) as i64);
    format!("{y:04}-{m:02}-{d:02}")
}

/// The rows of `key` (all keys when `None`), summed per group, in order.
pub fn group(rows: &[Row], by: GroupBy, key: Option<&str>) -> Vec<(String, Counts)> {
    let mut groups: BTreeMap<String, Counts> = BTreeMap::new();
    for r in rows.iter().filter(|r| key.is_none_or(|k| r.key == k)) {
        let name = match by {
            GroupBy::Key => r.key.clone(),
            GroupBy::Model => r.model.clone(),
            GroupBy::Day => day_label(r.hour),
        };
        groups.entry(name).or_default().add(&r.counts);
    }
    groups.into_iter().collect()
}

const COLUMNS: [&str; 8] = [
    "requests",
    "prompt",
    "cached",
    "completion",
    "total",
    "errors",
    "cancelled",
    "gpu_s",
];

fn cells(c: &Counts) -> [String; 8] {
    [
        c.requests.to_string(),
        c.prompt_tokens.to_string(),
        c.cached_tokens.to_string(),
        c.completion_tokens.to_string(),
        c.tokens().to_string(),
        c.errors.to_string(),
        c.cancelled.to_string(),
        format!("{:.1}", c.gpu_ms as f64 / 1000.0),
    ]
}

/// An aligned table: the group's name left-aligned, numbers right-aligned,
/// and a total line.
pub fn table(groups: &[(String, Counts)], by: GroupBy) -> String {
    let mut total = Counts::default();
    for (_, c) in groups {
        total.add(c);
    }
    let mut lines: Vec<(String, [String; 8])> = groups
        .iter()
        .map(|(name, c)| (name.clone(), cells(c)))
        .collect();
    lines.push(("total".into(), cells(&total)));
    let head = (by.as_str().to_string(), COLUMNS.map(String::from));
    let all = std::iter::once(&head).chain(&lines);
    let name_w = all.clone().map(|(n, _)| n.len()).max().unwrap_or(0);
    let mut widths = [0usize; 8];
    for (_, row) in all {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let render = |name: &str, row: &[String; 8]| {
        let mut line = format!("{name:<name_w$}");
        for (w, cell) in widths.iter().zip(row) {
            line.push_str(&format!("  {cell:>w$}"));
        }
        line.push('\n');
        line
    };
    let mut out = render(&head.0, &head.1);
    let rule = "-".repeat(out.trim_end().len());
    for (i, (name, row)) in lines.iter().enumerate() {
        if i + 1 == lines.len() {
            out.push_str(&rule);
            out.push('\n');
        }
        out.push_str(&render(name, row));
    }
    out
}

/// The same as JSON: `{"by": ..., "groups": [{"name", counts...}], "total": {...}}`.
pub fn json(groups: &[(String, Counts)], by: GroupBy, since_hour: u64) -> serde_json::Value {
    let mut total = Counts::default();
    let list: Vec<serde_json::Value> = groups
        .iter()
        .map(|(name, c)| {
            total.add(c);
            let mut v = serde_json::to_value(c).unwrap_or_default();
            v["name"] = serde_json::Value::String(name.clone());
            v["total_tokens"] = c.tokens().into();
            v
        })
        .collect();
    let mut total_json = serde_json::to_value(total).unwrap_or_default();
    total_json["total_tokens"] = total.tokens().into();
    serde_json::json!({
        "by": by.as_str(),
        "since": format!("{}T{:02}:00:00Z", day_label(since_hour), since_hour % 24),
        "groups": list,
        "total": total_json,
    })
}
