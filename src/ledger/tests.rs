use super::*;
use crate::policy::tokens::{TokenBudget, TokenLimits};

const T0: u64 = 1_780_000_000_000;

fn counts(prompt: u64, completion: u64) -> Counts {
    Counts {
        requests: 1,
        prompt_tokens: prompt,
        completion_tokens: completion,
        ..Counts::default()
    }
}

fn budget(per_day: u64) -> Arc<TokenBudget> {
    Arc::new(TokenBudget::new(
        [(
            "alice".to_string(),
            TokenLimits {
                per_day: Some(per_day),
                ..TokenLimits::default()
            },
        )],
        tokens::now_ms(),
    ))
}

#[test]
fn rows_are_summed_per_key_model_and_hour_written_or_not() {
    let ledger = Ledger::open(None, budget(1000)).unwrap();
    ledger.record("alice", "m", T0, &counts(10, 5));
    ledger.record("alice", "m", T0 + 1000, &counts(1, 1));
    ledger.record("alice", "m", T0 + 3_600_000, &counts(2, 2));
    ledger.record("bob", "m", T0, &counts(7, 0));
    ledger.flush().unwrap();
    ledger.record("alice", "m", T0, &counts(100, 0));
    let rows = ledger.rows(0).unwrap();
    assert_eq!(rows.len(), 3, "{rows:?}");
    let first = &rows
        .iter()
        .find(|r| r.key == "alice" && r.hour == T0 / 3_600_000)
        .unwrap()
        .counts;
    assert_eq!(
        (first.requests, first.prompt_tokens, first.completion_tokens),
        (3, 111, 6)
    );
    assert!(ledger
        .rows(T0 / 3_600_000 + 1)
        .unwrap()
        .iter()
        .all(|r| r.key == "alice"));
}

#[test]
fn the_file_survives_a_restart_and_restores_todays_quota() {
    let dir = tempfile::tempdir().unwrap();
    let now = tokens::now_ms();
    {
        let ledger = Ledger::open(Some(dir.path()), budget(1000)).unwrap();
        ledger.record("alice", "m", now, &counts(300, 300));
        ledger.flush().unwrap();
        ledger.record("alice", "m", now, &counts(1, 1));
        // dropped without a flush: a crash loses what was pending
    }
    let b = budget(1000);
    let ledger = Ledger::open(Some(dir.path()), b.clone()).unwrap();
    assert_eq!(b.room("alice", now), Some(400));
    let rows = ledger.rows(0).unwrap();
    assert_eq!(rows[0].counts.tokens(), 600);
    assert!(ledger.path().unwrap().ends_with(store::FILE_NAME));
}

#[test]
fn two_processes_sharing_the_file_see_each_others_usage_but_count_their_own_once() {
    let dir = tempfile::tempdir().unwrap();
    let now = tokens::now_ms();
    let (ba, bb) = (budget(1000), budget(1000));
    let a = Ledger::open(Some(dir.path()), ba.clone()).unwrap();
    let b = Ledger::open(Some(dir.path()), bb.clone()).unwrap();
    // a's request, settled in a's budget and written by a
    ba.reserve("alice", 200, now).unwrap().settle(200, now);
    a.record("alice", "m", now, &counts(100, 100));
    a.flush().unwrap();
    assert_eq!(ba.room("alice", now), Some(800), "a counts its own once");
    b.flush().unwrap();
    assert_eq!(bb.room("alice", now), Some(800), "b sees a's");
}

#[test]
fn the_table_is_aligned_with_totals() {
    let rows = vec![
        Row {
            key: "alice".into(),
            model: "qwen".into(),
            hour: 493_000,
            counts: counts(1200, 34),
        },
        Row {
            key: "bob".into(),
            model: "qwen".into(),
            hour: 493_001,
            counts: counts(5, 6),
        },
    ];
    let groups = report::group(&rows, report::GroupBy::Key, None);
    let text = report::table(&groups, report::GroupBy::Key);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 5, "{text}");
    assert!(
        lines[0].starts_with("key  ") && lines[0].contains("completion"),
        "{text}"
    );
    assert!(
        lines[4].starts_with("total") && lines[4].contains("1245"),
        "{text}"
    );
    let widths: Vec<usize> = lines.iter().map(|l| l.len()).collect();
    assert!(widths.iter().all(|&w| w == widths[0]), "{text}");
    assert_eq!(
        report::group(&rows, report::GroupBy::Day, Some("bob"))[0].0,
        report::day_label(493_001)
    );
    let json = report::json(&groups, report::GroupBy::Key, 493_000);
    assert_eq!(json["total"]["total_tokens"], 1245);
    assert_eq!(json["groups"][1]["name"], "bob");
}
