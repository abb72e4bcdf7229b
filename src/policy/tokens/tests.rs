use super::*;

const T0: u64 = 1_780_000_000_000; // 2026-05-28T20:26:40Z

fn budget(limits: TokenLimits) -> TokenBudget {
    TokenBudget::new([("k".to_string(), limits)], T0)
}

#[test]
fn calendar_conversions_round_trip() {
    assert_eq!(civil_from_days(0), (1970, 1, 1));
    assert_eq!(civil_from_days(days_from_civil(2024, 2, 29)), (2024, 2, 29));
    assert_eq!(
        civil_from_days(days_from_civil(2026, 12, 31) + 1),
        (2027, 1, 1)
    );
    let (month, first) = month_of(T0);
    assert_eq!(month, 2026 * 12 + 4);
    assert_eq!(civil_from_days(first as i64), (2026, 5, 1));
    assert_eq!(
        civil_from_days(next_month_start(2026 * 12 + 11) as i64),
        (2027, 1, 1)
    );
}

#[test]
fn concurrent_reservations_never_pass_the_minute_budget() {
    let b = budget(TokenLimits {
        per_minute: Some(1000),
        ..TokenLimits::default()
    });
    let held: Vec<_> = (0..10).map(|_| b.reserve("k", 100, T0).unwrap()).collect();
    let refused = b.reserve("k", 100, T0).unwrap_err();
    assert_eq!(refused.reason, LimitReason::KeyTokensPerMinute);
    // 100 tokens come back in 6 s at 1000 per minute
    assert_eq!(refused.retry_after, Duration::from_secs(6));
    // settling for less gives the rest back at once
    for r in held {
        r.settle(40, T0);
    }
    assert_eq!(b.room("k", T0), Some(600));
    // a key without limits is never refused
    assert_eq!(b.reserve("other", u64::MAX, T0).unwrap().tokens(), 0);
}

#[test]
fn using_more_than_reserved_is_a_debt_the_next_requests_pay() {
    let b = budget(TokenLimits {
        per_minute: Some(600),
        ..TokenLimits::default()
    });
    b.reserve("k", 100, T0).unwrap().settle(700, T0);
    assert_eq!(b.room("k", T0), Some(0));
    let state = b.state("k", T0).unwrap();
    assert_eq!(state.remaining, 0);
    // -100 tokens: 70 s until the bucket is full again at 10/s
    assert_eq!(state.reset, Duration::from_secs(70));
    assert!(b.reserve("k", 1, T0 + 10_000).is_err());
    assert!(b.reserve("k", 1, T0 + 10_100).is_ok());
}

#[test]
fn an_unsettled_reservation_gives_everything_back() {
    let b = budget(TokenLimits {
        per_day: Some(500),
        ..TokenLimits::default()
    });
    drop(b.reserve("k", 500, T0).unwrap());
    assert_eq!(b.room("k", T0), Some(500));
    assert_eq!(b.state("k", T0).unwrap().day, Some((0, 500)));
}

#[test]
fn quotas_hold_for_the_utc_day_and_month_and_renew() {
    let b = budget(TokenLimits {
        per_day: Some(1000),
        per_month: Some(1500),
        ..TokenLimits::default()
    });
    b.reserve("k", 900, T0).unwrap().settle(900, T0);
    let refused = b.reserve("k", 200, T0).unwrap_err();
    assert_eq!(refused.reason, LimitReason::KeyTokensPerDay);
    let midnight = (day_of(T0) + 1) * DAY_MS;
    assert_eq!(refused.retry_after, Duration::from_millis(midnight - T0));
    // the next day the month's quota is what is left
    b.reserve("k", 500, midnight).unwrap().settle(500, midnight);
    let refused = b.reserve("k", 200, midnight).unwrap_err();
    assert_eq!(refused.reason, LimitReason::KeyTokensPerMonth);
    let june = days_from_civil(2026, 6, 1) as u64 * DAY_MS;
    assert_eq!(refused.retry_after, Duration::from_millis(june - midnight));
    assert!(b.reserve("k", 1000, june).is_ok());
}

#[test]
fn other_processes_usage_counts_against_the_quota() {
    let b = budget(TokenLimits {
        per_day: Some(1000),
        ..TokenLimits::default()
    });
    let (month, _) = month_of(T0);
    b.set_external("k", (day_of(T0), 800), (month, 800), T0);
    assert_eq!(b.room("k", T0), Some(200));
    // figures of another day are not this day's
    b.set_external("k", (day_of(T0) - 1, 1000), (month, 1000), T0);
    assert_eq!(b.room("k", T0), Some(200));
}

#[test]
fn the_prompt_estimate_rounds_up() {
    assert_eq!(estimate_prompt_tokens(0), 0);
    assert_eq!(estimate_prompt_tokens(1), 1);
    assert_eq!(estimate_prompt_tokens(300), 100);
}
