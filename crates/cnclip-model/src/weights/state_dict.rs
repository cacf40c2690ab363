use std::collections::{HashMap, HashSet};
use tch::Tensor;

/// Named tensors in file order, with lookup by name: what a checkpoint holds and what a model
/// loads by matching its variable paths against the keys.
///
/// Inserting an existing key replaces its tensor and keeps its position (Python dict semantics).
#[derive(Debug, Default)]
pub struct StateDict {
    entries: Vec<(String, Tensor)>,
    index: HashMap<String, usize>,
}

/// The outcome of matching a state dict's keys against the keys a model expects.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyReport {
    /// Expected but absent, in the order expected.
    pub missing: Vec<String>,
    /// Present but not expected, in state-dict order.
    pub unexpected: Vec<String>,
}

impl KeyReport {
    pub fn is_exact(&self) -> bool {
        self.missing.is_empty() && self.unexpected.is_empty()
    }
}

impl std::fmt::Display for KeyReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let list = |keys: &[String]| {
            let shown: Vec<&str> = keys.iter().take(10).map(String::as_str).collect();
            let more = keys.len().saturating_sub(10);
            if more > 0 {
                format!("{} (and {more} more)", shown.join(", "))
            } else {
                shown.join(", ")
            }
        };
        match (self.missing.is_empty(), self.unexpected.is_empty()) {
            (true, true) => write!(f, "all keys match"),
            (false, true) => write!(f, "missing keys: {}", list(&self.missing)),
            (true, false) => write!(f, "unexpected keys: {}", list(&self.unexpected)),
            (false, false) => {
                write!(
                    f,
                    "missing keys: {}; unexpected keys: {}",
                    list(&self.missing),
                    list(&self.unexpected)
                )
            }
        }
    }
}

impl StateDict {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn with_capacity(n: usize) -> Self {
        Self {
            entries: Vec::with_capacity(n),
            index: HashMap::with_capacity(n),
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Adds or replaces `key`; returns the tensor it replaced.
    pub fn insert(&mut self, key: impl Into<String>, tensor: Tensor) -> Option<Tensor> {
        let key = key.into();
        match self.index.get(&key) {
            Some(&i) => Some(std::mem::replace(&mut self.entries[i].1, tensor)),
            None => {
                self.index.insert(key.clone(), self.entries.len());
                self.entries.push((key, tensor));
                None
            }
        }
    }

    pub fn get(&self, key: &str) -> Option<&Tensor> {
        self.index.get(key).map(|&i| &self.entries[i].1)
    }

    pub fn get_mut(&mut self, key: &str) -> Option<&mut Tensor> {
        self.index.get(key).map(|&i| &mut self.entries[i].1)
    }

    pub fn contains_key(&self, key: &str) -> bool {
        self.index.contains_key(key)
    }

    /// Removes `key`, keeping the order of the others (O(n)).
    pub fn remove(&mut self, key: &str) -> Option<Tensor> {
        let i = self.index.remove(key)?;
        let (_, tensor) = self.entries.remove(i);
        for v in self.index.values_mut() {
            if *v > i {
                *v -= 1;
            }
        }
        Some(tensor)
    }

    /// Keeps the entries for which `keep(key, tensor)` is true.
    pub fn retain(&mut self, mut keep: impl FnMut(&str, &Tensor) -> bool) {
        self.entries.retain(|(k, t)| keep(k, t));
        self.reindex();
    }

    /// Renames every key with `f` (entries whose new name repeats an earlier one replace it).
    pub fn map_keys(self, mut f: impl FnMut(&str) -> String) -> Self {
        self.entries.into_iter().map(|(k, t)| (f(&k), t)).collect()
    }

    pub fn keys(&self) -> impl ExactSizeIterator<Item = &str> {
        self.entries.iter().map(|(k, _)| k.as_str())
    }

    pub fn iter(&self) -> impl ExactSizeIterator<Item = (&str, &Tensor)> {
        self.entries.iter().map(|(k, t)| (k.as_str(), t))
    }

    /// Total number of elements over all tensors.
    pub fn num_elements(&self) -> usize {
        self.entries.iter().map(|(_, t)| t.numel()).sum()
    }

    /// A copy sharing every tensor's storage.
    pub fn shallow_clone(&self) -> Self {
        self.entries
            .iter()
            .map(|(k, t)| (k.clone(), t.shallow_clone()))
            .collect()
    }

    /// Matches the keys against `expected` (as `load_state_dict(strict=True)` reports them).
    pub fn key_report<'a>(&self, expected: impl IntoIterator<Item = &'a str>) -> KeyReport {
        let mut seen = HashSet::new();
        let mut missing = Vec::new();
        for key in expected {
            if !self.contains_key(key) {
                missing.push(key.to_string());
            }
            seen.insert(key);
        }
        let unexpected = self
            .keys()
            .filter(|k| !seen.contains(k))
            .map(str::to_string)
            .collect();
        KeyReport {
            missing,
            unexpected,
        }
    }

    fn reindex(&mut self) {
        self.index = self
            .entries
            .iter()
            .enumerate()
            .map(|(i, (k, _))| (k.clone(), i))
            .collect();
    }
}

impl FromIterator<(String, Tensor)> for StateDict {
    fn from_iter<I: IntoIterator<Item = (String, Tensor)>>(iter: I) -> Self {
        let mut sd = StateDict::new();
        for (k, t) in iter {
            sd.insert(k, t);
        }
        sd
    }
}

impl IntoIterator for StateDict {
    type Item = (String, Tensor);
    type IntoIter = std::vec::IntoIter<(String, Tensor)>;
    fn into_iter(self) -> Self::IntoIter {
        self.entries.into_iter()
    }
}

impl<'a> IntoIterator for &'a StateDict {
    type Item = (&'a str, &'a Tensor);
    type IntoIter = std::iter::Map<
        std::slice::Iter<'a, (String, Tensor)>,
        fn(&'a (String, Tensor)) -> (&'a str, &'a Tensor),
    >;
    fn into_iter(self) -> Self::IntoIter {
        self.entries.iter().map(|(k, t)| (k.as_str(), t))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insert_replaces_in_place_and_remove_keeps_order() {
        let mut sd = StateDict::new();
        sd.insert("a", Tensor::from(1i64));
        sd.insert("b", Tensor::from(2i64));
        sd.insert("c", Tensor::from(3i64));
        assert!(sd.insert("a", Tensor::from(10i64)).is_some());
        assert_eq!(sd.keys().collect::<Vec<_>>(), ["a", "b", "c"]);
        assert_eq!(sd.get("a").unwrap().int64_value(&[]), 10);
        sd.remove("b");
        assert_eq!(sd.keys().collect::<Vec<_>>(), ["a", "c"]);
        assert_eq!(sd.get("c").unwrap().int64_value(&[]), 3);
        let report = sd.key_report(["a", "x"]);
        assert_eq!(report.missing, ["x"]);
        assert_eq!(report.unexpected, ["c"]);
        assert!(report.to_string().contains("missing keys: x"));
    }
}
