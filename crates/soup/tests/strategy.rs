//! Each strategy's decisions on scripted scores, against traces worked by hand (the crate doc
//! walks through the pairwise one).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use eval::Score;
use soup::recipe::Recipe;
use soup::strategy::{Accept, PairwiseOptions, greedy, pairwise, uniform};

fn s(mr: f64) -> Score {
    Score {
        mean_recall: mr,
        r1: mr - 20.0,
        r5: mr,
        r10: mr + 5.0,
    }
}

fn names(n: &[&str]) -> Vec<String> {
    n.iter().map(|s| s.to_string()).collect()
}

/// Scores by recipe; any recipe outside the script fails the strategy (and the test). Records the
/// order of the requests.
struct Script {
    table: Vec<(Vec<(usize, f64)>, f64)>,
    asked: Vec<Vec<(usize, f64)>>,
}

impl Script {
    fn new(table: &[(&[(usize, f64)], f64)]) -> Self {
        Script {
            table: table.iter().map(|(r, v)| (r.to_vec(), *v)).collect(),
            asked: Vec::new(),
        }
    }

    fn eval(&mut self, r: &Recipe) -> Result<Score, String> {
        self.asked.push(r.weights().to_vec());
        self.table
            .iter()
            .find(|(w, _)| w.as_slice() == r.weights())
            .map(|(_, v)| s(*v))
            .ok_or_else(|| format!("unscripted recipe {:?}", r.weights()))
    }
}

// Four runs whose valid scores lie within 0.6 of each other: a = 83.41 the best single run.
const A: usize = 0;
const B: usize = 1;
const C: usize = 2;
const D: usize = 3;

fn seed_candidates() -> (Vec<String>, Vec<Score>) {
    (
        names(&["a", "b", "c", "d"]),
        vec![s(83.41), s(83.30), s(83.10), s(82.90)],
    )
}

fn seed_script() -> Script {
    Script::new(&[
        (&[(A, 0.5), (B, 0.5)], 83.55),
        (&[(A, 0.75), (B, 0.25)], 83.48),
        (&[(A, 0.625), (B, 0.375)], 83.69),
        (&[(A, 0.5625), (B, 0.4375)], 83.50),
    ])
}

#[test]
fn pairwise_follows_the_hand_worked_trace() {
    let (names, scores) = seed_candidates();
    let mut script = seed_script();
    let out = pairwise(&names, &scores, &PairwiseOptions::default(), |r| {
        script.eval(r)
    })
    .unwrap();
    // Round 1: a + b → M1 83.55 beats b (and a): kept, replaces the pool's worst, d.
    // Round 2: the two best are M1 and a → M2 = ¾a + ¼b, 83.48: beats a (the weaker member): kept,
    //          replaces c.
    // Round 3: M1 + M2 → M3 = ⅝a + ⅜b, 83.69: kept, replaces b.
    // Round 4: M3 + M1 → M4 = 9/16 a + 7/16 b, 83.50: beats neither (83.69, 83.55): stop.
    assert_eq!(
        script.asked,
        vec![
            vec![(A, 0.5), (B, 0.5)],
            vec![(A, 0.75), (B, 0.25)],
            vec![(A, 0.625), (B, 0.375)],
            vec![(A, 0.5625), (B, 0.4375)],
        ]
    );
    let t = &out.trials;
    assert_eq!(t.len(), 4);
    assert_eq!(
        (t[0].parents.clone(), t[0].kept),
        (names_of(&["a", "b"]), true)
    );
    assert!(t[0].note.contains("replaces d"), "{}", t[0].note);
    assert_eq!(
        (t[1].parents.clone(), t[1].kept),
        (names_of(&["M1", "a"]), true)
    );
    assert!(t[1].note.contains("replaces c"), "{}", t[1].note);
    assert_eq!(
        (t[2].parents.clone(), t[2].kept),
        (names_of(&["M1", "M2"]), true)
    );
    assert!(t[2].note.contains("replaces b"), "{}", t[2].note);
    assert_eq!(
        (t[3].parents.clone(), t[3].kept),
        (names_of(&["M3", "M1"]), false)
    );
    assert_eq!(out.result_label, "M3");
    assert_eq!(out.result.weights(), &[(A, 0.625), (B, 0.375)]);
    assert_eq!(out.result_score.mean_recall, 83.69);
    assert!(out.stop.contains("M4 beats neither"), "{}", out.stop);
}

fn names_of(n: &[&str]) -> Vec<String> {
    names(n)
}

#[test]
fn pairwise_beats_both_stops_earlier() {
    let (names, scores) = seed_candidates();
    let mut script = seed_script();
    let options = PairwiseOptions {
        accept: Accept::BeatsBoth,
        ..Default::default()
    };
    let out = pairwise(&names, &scores, &options, |r| script.eval(r)).unwrap();
    // M1 83.55 beats both; M2 = M1 + a at 83.48 beats a but not M1: stop with M1.
    assert_eq!(script.asked.len(), 2);
    assert_eq!(out.result_label, "M1");
    assert_eq!(out.result.weights(), &[(A, 0.5), (B, 0.5)]);
    assert_eq!(
        out.trials.iter().map(|t| t.kept).collect::<Vec<_>>(),
        [true, false]
    );
}

#[test]
fn pairwise_stops_at_once_when_the_first_merge_does_not_help_and_on_ties() {
    let (names, scores) = seed_candidates();
    // Equal to b is not better than b: the loop runs "until no merge helps".
    let mut script = Script::new(&[(&[(A, 0.5), (B, 0.5)], 83.30)]);
    let out = pairwise(&names, &scores, &PairwiseOptions::default(), |r| {
        script.eval(r)
    })
    .unwrap();
    assert_eq!(out.trials.len(), 1);
    assert!(!out.trials[0].kept);
    assert_eq!(out.result_label, "a");
    assert_eq!(out.result.as_single(), Some(A));
    // Ties between candidates: the earlier one ranks first (c and d tie for the best here).
    let tied = vec![s(80.0), s(80.0), s(90.0), s(90.0)];
    let mut script = Script::new(&[(&[(C, 0.5), (D, 0.5)], 10.0)]);
    let out = pairwise(&names, &tied, &PairwiseOptions::default(), |r| {
        script.eval(r)
    })
    .unwrap();
    assert_eq!(out.trials[0].parents, names_of(&["c", "d"]));
    assert_eq!(out.result_label, "c");
    // One candidate: nothing to merge, no evaluation.
    let out = pairwise(
        &names[..1],
        &scores[..1],
        &PairwiseOptions::default(),
        |_| Err::<Score, _>("must not be called"),
    )
    .unwrap();
    assert!(out.trials.is_empty());
    assert_eq!(out.result.as_single(), Some(A));
}

#[test]
fn pairwise_guards_against_endless_improvement() {
    let (names, scores) = seed_candidates();
    // Every merge is a little better: the loop would never end by itself.
    let mut n = 0;
    let options = PairwiseOptions {
        max_rounds: 7,
        ..Default::default()
    };
    let out = pairwise(&names, &scores, &options, |_| {
        n += 1;
        Ok::<_, String>(s(90.0 + n as f64))
    })
    .unwrap();
    assert_eq!(n, 7);
    assert_eq!(out.trials.len(), 7);
    assert!(out.stop.contains("limit of 7"), "{}", out.stop);
    assert_eq!(out.result_label, "M7");
    // An evaluation error stops the strategy with that error.
    let err = pairwise(&names, &scores, &options, |_| Err::<Score, _>("boom")).unwrap_err();
    assert_eq!(err, "boom");
}

#[test]
fn greedy_follows_the_hand_worked_trace() {
    // Given out of order: greedy sorts by score (a 83.41, b 83.30, c 83.10, d 82.90).
    let names = names(&["c", "a", "d", "b"]);
    let scores = vec![s(83.10), s(83.41), s(82.90), s(83.30)];
    let (c, a, d, b) = (0, 1, 2, 3);
    let third = 1.0 / 3.0;
    let mut script = Script::new(&[
        (&[(a, 0.5), (b, 0.5)], 83.50),
        // Equal to the soup's 83.50 is not strictly better: c is skipped.
        (&[(c, third), (a, third), (b, third)], 83.50),
        (&[(a, third), (d, third), (b, third)], 83.60),
    ]);
    let out = greedy(&names, &scores, |r| script.eval(r)).unwrap();
    let mut asked = script.asked.clone();
    for r in &mut asked {
        r.sort_by_key(|&(i, _)| i);
    }
    assert_eq!(
        asked,
        vec![
            vec![(a, 0.5), (b, 0.5)],
            vec![(c, third), (a, third), (b, third)],
            vec![(a, third), (d, third), (b, third)],
        ]
    );
    assert_eq!(
        out.trials.iter().map(|t| t.kept).collect::<Vec<_>>(),
        [true, false, true]
    );
    assert_eq!(out.trials[0].parents, names_of(&["a", "b"]));
    assert_eq!(out.trials[1].parents, names_of(&["M1", "c"]));
    assert_eq!(out.trials[2].parents, names_of(&["M1", "d"]));
    assert_eq!(out.result_label, "M3");
    assert_eq!(out.result.weights(), &[(a, third), (d, third), (b, third)]);
    assert_eq!(out.result_score.mean_recall, 83.60);
    // Nothing helps: the best candidate alone.
    let mut script = Script::new(&[
        (&[(a, 0.5), (b, 0.5)], 1.0),
        (&[(c, 0.5), (a, 0.5)], 1.0),
        (&[(a, 0.5), (d, 0.5)], 1.0),
    ]);
    let out = greedy(&names, &scores, |r| script.eval(r)).unwrap();
    assert_eq!(out.result.as_single(), Some(a));
    assert_eq!(out.result_label, "a");
}

#[test]
fn uniform_averages_everything_once() {
    let (names, scores) = seed_candidates();
    let mut script = Script::new(&[(&[(A, 0.25), (B, 0.25), (C, 0.25), (D, 0.25)], 83.20)]);
    let out = uniform(&names, &scores, |r| script.eval(r)).unwrap();
    assert_eq!(script.asked.len(), 1);
    assert_eq!(out.trials.len(), 1);
    assert!(out.trials[0].kept);
    assert!(
        out.trials[0]
            .note
            .contains("not above the best candidate a"),
        "{}",
        out.trials[0].note
    );
    assert_eq!(out.result.weights().len(), 4);
    assert_eq!(out.result_score.mean_recall, 83.20);
}
