//! A merge described by what it is made of: weights over the original candidates.
//!
//! Strategies never hold merged tensors. A merge of merges is flattened to weights over the
//! originals (`avg(avg(a, b), c) = ¼a + ¼b + ½c`), and every merge is averaged straight from the
//! candidates' files, in fp32, so no intermediate is ever rounded to a checkpoint's dtype or written
//! to disk. (Averaging two stored fp32 merges would differ only by fp32 rounding.)

use serde::{Deserialize, Serialize};

/// Weights over candidate indices, sorted by index, positive, summing to 1.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Recipe {
    weights: Vec<(usize, f64)>,
}

impl Recipe {
    /// Candidate `i` alone.
    pub fn single(i: usize) -> Self {
        Recipe {
            weights: vec![(i, 1.0)],
        }
    }

    /// The uniform average of `members` (repeats count once).
    pub fn uniform(members: &[usize]) -> Self {
        let mut m = members.to_vec();
        m.sort_unstable();
        m.dedup();
        let w = 1.0 / m.len().max(1) as f64;
        Recipe {
            weights: m.into_iter().map(|i| (i, w)).collect(),
        }
    }

    /// `(a + b) / 2`, flattened over the candidates.
    pub fn midpoint(a: &Recipe, b: &Recipe) -> Self {
        let mut weights: Vec<(usize, f64)> = Vec::new();
        for &(i, w) in a.weights.iter().chain(&b.weights) {
            match weights.iter_mut().find(|(j, _)| *j == i) {
                Some((_, acc)) => *acc += 0.5 * w,
                None => weights.push((i, 0.5 * w)),
            }
        }
        weights.sort_by_key(|&(i, _)| i);
        Recipe { weights }
    }

    pub fn weights(&self) -> &[(usize, f64)] {
        &self.weights
    }

    pub fn members(&self) -> impl Iterator<Item = usize> + '_ {
        self.weights.iter().map(|&(i, _)| i)
    }

    pub fn contains(&self, candidate: usize) -> bool {
        self.weights.iter().any(|&(i, _)| i == candidate)
    }

    /// Exactly one candidate with weight 1: no averaging needed.
    pub fn as_single(&self) -> Option<usize> {
        match self.weights.as_slice() {
            [(i, w)] if *w == 1.0 => Some(*i),
            _ => None,
        }
    }

    /// A stable text form (weights as exact f64 bits), for identity and cache keys.
    pub fn key(&self) -> String {
        self.weights
            .iter()
            .map(|(i, w)| format!("{i}:{:016x}", w.to_bits()))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// `0.25·a + 0.75·b` with the candidates' names.
    pub fn describe(&self, names: &[String]) -> String {
        self.weights
            .iter()
            .map(|&(i, w)| {
                let name = names.get(i).map(String::as_str).unwrap_or("?");
                format!("{}·{name}", trim_float(w))
            })
            .collect::<Vec<_>>()
            .join(" + ")
    }
}

/// Shortest decimal that reads back as `w` (Rust's `Display`), e.g. `0.5`, `0.3333333333333333`.
fn trim_float(w: f64) -> String {
    format!("{w}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn midpoint_flattens() {
        let ab = Recipe::midpoint(&Recipe::single(0), &Recipe::single(1));
        assert_eq!(ab.weights(), &[(0, 0.5), (1, 0.5)]);
        let abc = Recipe::midpoint(&Recipe::single(2), &ab);
        assert_eq!(abc.weights(), &[(0, 0.25), (1, 0.25), (2, 0.5)]);
        let again = Recipe::midpoint(&abc, &Recipe::single(0));
        assert_eq!(again.weights(), &[(0, 0.625), (1, 0.125), (2, 0.25)]);
        assert_eq!(Recipe::uniform(&[3, 1, 3]).weights(), &[(1, 0.5), (3, 0.5)]);
        assert_eq!(Recipe::single(4).as_single(), Some(4));
        assert_eq!(ab.as_single(), None);
        assert_ne!(ab.key(), abc.key());
    }
}
