use super::*;

fn up(index: usize, assigned: usize) -> Candidate {
    Candidate {
        index,
        health: Health::Up,
        assigned,
        slots: 0,
    }
}

#[test]
fn least_assigned_wins_and_ties_rotate() {
    let c = |a: usize, b: usize, c: usize| vec![up(0, a), up(1, b), up(2, c)];
    assert_eq!(pick(c(3, 1, 2), 0, 3), Some(1));
    assert_eq!(pick(c(0, 0, 0), 0, 3), Some(0));
    assert_eq!(pick(c(0, 0, 0), 1, 3), Some(1));
    assert_eq!(pick(c(0, 0, 0), 2, 3), Some(2));
    assert_eq!(pick(c(1, 0, 0), 0, 3), Some(1));
    assert_eq!(pick(c(0, 1, 0), 1, 3), Some(2));
}

#[test]
fn load_is_relative_to_the_slots() {
    let small = Candidate {
        slots: 1,
        ..up(0, 1)
    };
    let big = Candidate {
        slots: 8,
        ..up(1, 4)
    };
    assert_eq!(pick([small, big], 0, 2), Some(1));
    let big_full = Candidate {
        slots: 8,
        ..up(1, 9)
    };
    assert_eq!(pick([small, big_full], 0, 2), Some(0));
}

#[test]
fn down_and_loading_servers_are_skipped() {
    let down = Candidate {
        health: Health::Down,
        ..up(0, 0)
    };
    let loading = Candidate {
        health: Health::Loading,
        ..up(1, 0)
    };
    assert_eq!(pick([down, loading, up(2, 9)], 0, 3), Some(2));
    assert_eq!(pick([down, loading], 0, 2), None);
    let unknown = Candidate {
        health: Health::Unknown,
        ..up(0, 0)
    };
    assert_eq!(pick([unknown], 0, 1), Some(0));
}
