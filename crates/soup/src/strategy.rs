//! The three soups as decision procedures over scores. They never touch tensors: a merge is a
//! [`Recipe`] handed to the caller's `evaluate` callback, which returns its validation [`Score`]
//! (in the tool: average into a model and run retrieval + eval; in tests: a scripted table).
//! Comparisons use the mean recall (`Score::mean_recall`) and are strict.
//!
//! See the crate documentation for the rules and a worked example of each.

use crate::recipe::Recipe;
use eval::Score;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Strategy {
    /// The greedy pairwise loop: average the two best, keep the merge if it beats a member (replacing the
    /// pool's worst), repeat.
    Pairwise,
    /// Wortsman et al.'s greedy soup.
    Greedy,
    /// Wortsman et al.'s uniform soup.
    Uniform,
}

impl Strategy {
    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::Pairwise => "pairwise",
            Strategy::Greedy => "greedy",
            Strategy::Uniform => "uniform",
        }
    }
}

impl std::str::FromStr for Strategy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "pairwise" => Ok(Strategy::Pairwise),
            "greedy" => Ok(Strategy::Greedy),
            "uniform" => Ok(Strategy::Uniform),
            _ => Err(format!(
                "unknown strategy {s:?}: expected pairwise, greedy or uniform"
            )),
        }
    }
}

/// When the pairwise loop keeps a merge of the pool's two best, `a` (better) and `b`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Accept {
    /// The merge scores strictly above at least one member, i.e. above `b` ("keep the merge if it is
    /// better than any member").
    BeatsEither,
    /// The merge scores strictly above both, i.e. above `a`.
    BeatsBoth,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PairwiseOptions {
    pub accept: Accept,
    /// Merges to evaluate at most (a guard; real scores are multiples of 1/queries, so the loop
    /// ends on its own — see the crate doc).
    pub max_rounds: usize,
}

impl Default for PairwiseOptions {
    fn default() -> Self {
        PairwiseOptions {
            accept: Accept::BeatsEither,
            max_rounds: 64,
        }
    }
}

/// One merge the strategy evaluated.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Trial {
    /// `M1`, `M2`, … in evaluation order.
    pub label: String,
    /// What was averaged (pool entries or soup members, by label), uniformly.
    pub parents: Vec<String>,
    pub recipe: Recipe,
    #[serde(with = "score_serde")]
    pub score: Score,
    /// Kept by the strategy (entered the pool / the soup; always true for the uniform soup).
    pub kept: bool,
    /// What happened, in words (e.g. `replaced c (83.02)` or `no better than 83.41`).
    pub note: String,
}

/// What a strategy decided.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Outcome {
    pub strategy: Strategy,
    pub trials: Vec<Trial>,
    /// The soup to write: a candidate alone or a merge.
    pub result: Recipe,
    /// `result`'s label: a candidate's name or a trial's label.
    pub result_label: String,
    #[serde(with = "score_serde")]
    pub result_score: Score,
    /// Why the strategy stopped.
    pub stop: String,
}

/// Serde for `eval::Score`, which has no derive (eval has no serde dependency).
pub mod score_serde {
    use eval::Score;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    #[derive(Serialize, Deserialize)]
    struct S {
        r1: f64,
        r5: f64,
        r10: f64,
        mean_recall: f64,
    }

    pub fn serialize<Z: Serializer>(s: &Score, z: Z) -> Result<Z::Ok, Z::Error> {
        S {
            r1: s.r1,
            r5: s.r5,
            r10: s.r10,
            mean_recall: s.mean_recall,
        }
        .serialize(z)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Score, D::Error> {
        let s = S::deserialize(d)?;
        Ok(Score {
            r1: s.r1,
            r5: s.r5,
            r10: s.r10,
            mean_recall: s.mean_recall,
        })
    }
}

fn better(a: &Score, b: &Score) -> bool {
    a.mean_recall > b.mean_recall
}

/// Candidate indices by score, best first; ties keep input order.
fn ranked(scores: &[Score]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&i, &j| scores[j].mean_recall.total_cmp(&scores[i].mean_recall));
    order
}

fn no_candidates(strategy: Strategy) -> Outcome {
    Outcome {
        strategy,
        trials: Vec::new(),
        result: Recipe::uniform(&[]),
        result_label: String::new(),
        result_score: Score {
            mean_recall: 0.0,
            r1: 0.0,
            r5: 0.0,
            r10: 0.0,
        },
        stop: "no candidates".into(),
    }
}

struct PoolEntry {
    label: String,
    recipe: Recipe,
    score: Score,
    /// Entry order, for ties.
    born: usize,
}

/// The greedy pairwise loop (see the crate doc for the rule and a worked trace).
///
/// `names[i]` and `scores[i]` describe candidate `i`. Fails only when `evaluate` fails.
pub fn pairwise<E>(
    names: &[String],
    scores: &[Score],
    options: &PairwiseOptions,
    mut evaluate: impl FnMut(&Recipe) -> Result<Score, E>,
) -> Result<Outcome, E> {
    if scores.is_empty() {
        return Ok(no_candidates(Strategy::Pairwise));
    }
    let mut pool: Vec<PoolEntry> = scores
        .iter()
        .enumerate()
        .map(|(i, s)| PoolEntry {
            label: names.get(i).cloned().unwrap_or_else(|| format!("#{i}")),
            recipe: Recipe::single(i),
            score: *s,
            born: i,
        })
        .collect();
    let mut trials = Vec::new();
    let mut tried: Vec<(String, String)> = Vec::new();
    let mut born = pool.len();
    // Best first; equal scores: the earlier entry first.
    let sort = |pool: &mut Vec<PoolEntry>| {
        pool.sort_by(|x, y| {
            y.score
                .mean_recall
                .total_cmp(&x.score.mean_recall)
                .then(x.born.cmp(&y.born))
        })
    };
    let stop = loop {
        sort(&mut pool);
        if pool.len() < 2 {
            break "a single checkpoint: nothing to merge".to_string();
        }
        if trials.len() >= options.max_rounds {
            break format!("reached the limit of {} merges", options.max_rounds);
        }
        let (a, b) = (&pool[0], &pool[1]);
        let pair = (a.recipe.key(), b.recipe.key());
        if tried.contains(&pair) {
            break format!("{} and {} were already merged", a.label, b.label);
        }
        tried.push(pair);
        let recipe = Recipe::midpoint(&a.recipe, &b.recipe);
        let score = evaluate(&recipe)?;
        let label = format!("M{}", trials.len() + 1);
        let kept = match options.accept {
            Accept::BeatsEither => better(&score, &b.score),
            Accept::BeatsBoth => better(&score, &a.score),
        };
        let parents = vec![a.label.clone(), b.label.clone()];
        if !kept {
            let bar = match options.accept {
                Accept::BeatsEither => &b.score,
                Accept::BeatsBoth => &a.score,
            };
            trials.push(Trial {
                label: label.clone(),
                parents,
                recipe,
                score,
                kept,
                note: format!("not above {:.2}: stop", bar.mean_recall),
            });
            break format!("{label} beats neither member");
        }
        // The pool's worst: the last after sorting (lowest score; of equals, the youngest).
        let worst = pool.len() - 1;
        let note = format!(
            "replaces {} ({:.2})",
            pool[worst].label, pool[worst].score.mean_recall
        );
        pool[worst] = PoolEntry {
            label: label.clone(),
            recipe: recipe.clone(),
            score,
            born,
        };
        born += 1;
        trials.push(Trial {
            label,
            parents,
            recipe,
            score,
            kept,
            note,
        });
    };
    sort(&mut pool);
    let best = &pool[0];
    Ok(Outcome {
        strategy: Strategy::Pairwise,
        result: best.recipe.clone(),
        result_label: best.label.clone(),
        result_score: best.score,
        trials,
        stop,
    })
}

/// Wortsman et al.'s greedy soup: candidates by score, best first; each is added when the uniform
/// average of the soup with it scores strictly higher than the soup without it.
pub fn greedy<E>(
    names: &[String],
    scores: &[Score],
    mut evaluate: impl FnMut(&Recipe) -> Result<Score, E>,
) -> Result<Outcome, E> {
    if scores.is_empty() {
        return Ok(no_candidates(Strategy::Greedy));
    }
    let name = |i: usize| names.get(i).cloned().unwrap_or_else(|| format!("#{i}"));
    let order = ranked(scores);
    let mut soup = vec![order[0]];
    let mut soup_label = name(order[0]);
    let mut soup_score = scores[order[0]];
    let mut trials: Vec<Trial> = Vec::new();
    for &c in &order[1..] {
        let mut members = soup.clone();
        members.push(c);
        let recipe = Recipe::uniform(&members);
        let score = evaluate(&recipe)?;
        let label = format!("M{}", trials.len() + 1);
        let kept = better(&score, &soup_score);
        let note = if kept {
            format!(
                "adds {} ({:.2} > {:.2})",
                name(c),
                score.mean_recall,
                soup_score.mean_recall
            )
        } else {
            format!(
                "skips {} (not above {:.2})",
                name(c),
                soup_score.mean_recall
            )
        };
        trials.push(Trial {
            label: label.clone(),
            parents: vec![soup_label.clone(), name(c)],
            recipe,
            score,
            kept,
            note,
        });
        if kept {
            soup = members;
            soup_label = label;
            soup_score = score;
        }
    }
    Ok(Outcome {
        strategy: Strategy::Greedy,
        result: Recipe::uniform(&soup),
        result_label: soup_label,
        result_score: soup_score,
        trials,
        stop: format!("all {} candidates tried", scores.len()),
    })
}

/// Wortsman et al.'s uniform soup: every candidate, equal weights (scored for the report).
pub fn uniform<E>(
    names: &[String],
    scores: &[Score],
    mut evaluate: impl FnMut(&Recipe) -> Result<Score, E>,
) -> Result<Outcome, E> {
    if scores.is_empty() {
        return Ok(no_candidates(Strategy::Uniform));
    }
    if scores.len() == 1 {
        return Ok(Outcome {
            strategy: Strategy::Uniform,
            trials: Vec::new(),
            result: Recipe::single(0),
            result_label: names.first().cloned().unwrap_or_else(|| "#0".into()),
            result_score: scores[0],
            stop: "a single checkpoint: nothing to merge".into(),
        });
    }
    let all: Vec<usize> = (0..scores.len()).collect();
    let recipe = Recipe::uniform(&all);
    let score = evaluate(&recipe)?;
    let label = "M1".to_string();
    let best = ranked(scores)[0];
    let note = if better(&score, &scores[best]) {
        "above the best candidate".to_string()
    } else {
        format!(
            "not above the best candidate {} ({:.2})",
            names.get(best).map(String::as_str).unwrap_or("?"),
            scores[best].mean_recall
        )
    };
    Ok(Outcome {
        strategy: Strategy::Uniform,
        trials: vec![Trial {
            label: label.clone(),
            parents: (0..scores.len())
                .map(|i| names.get(i).cloned().unwrap_or_else(|| format!("#{i}")))
                .collect(),
            recipe: recipe.clone(),
            score,
            kept: true,
            note,
        }],
        result: recipe,
        result_label: label,
        result_score: score,
        stop: "uniform soup of every candidate".into(),
    })
}

/// Runs `strategy`.
pub fn run<E>(
    strategy: Strategy,
    names: &[String],
    scores: &[Score],
    pairwise_options: &PairwiseOptions,
    evaluate: impl FnMut(&Recipe) -> Result<Score, E>,
) -> Result<Outcome, E> {
    match strategy {
        Strategy::Pairwise => pairwise(names, scores, pairwise_options, evaluate),
        Strategy::Greedy => greedy(names, scores, evaluate),
        Strategy::Uniform => uniform(names, scores, evaluate),
    }
}
