//! Reading environment variables through a trait, so tests pass a map and never change the
//! process environment.

use std::collections::HashMap;

/// Where environment variables come from.
pub trait Environment: Send + Sync {
    /// The variable's value, `None` when unset or empty.
    fn var(&self, name: &str) -> Option<String>;
}

/// The real process environment.
#[derive(Debug, Default, Clone, Copy)]
pub struct ProcessEnvironment;

impl Environment for ProcessEnvironment {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name)
            .ok()
            .filter(|value| !value.trim().is_empty())
    }
}

/// A fixed set of variables, for tests.
#[derive(Debug, Default, Clone)]
pub struct MapEnvironment(pub HashMap<String, String>);

impl MapEnvironment {
    pub fn from_pairs<const N: usize>(pairs: [(&str, &str); N]) -> MapEnvironment {
        MapEnvironment(
            pairs
                .iter()
                .map(|(name, value)| ((*name).to_owned(), (*value).to_owned()))
                .collect(),
        )
    }
}

impl Environment for MapEnvironment {
    fn var(&self, name: &str) -> Option<String> {
        self.0
            .get(name)
            .filter(|value| !value.trim().is_empty())
            .cloned()
    }
}
