//! How the cuDNN convolution chooses its algorithm for a new shape: cuDNN's heuristics (no cost,
//! the default) or a benchmark of every algorithm on the card, as PyTorch's
//! `torch.backends.cudnn.benchmark = True` does (and as `../shared/bench/torch_ref.py` runs).
//!
//! Either way the choice is made once per (shape, dtype, math, search, determinism) and cached,
//! with the math type cuDNN reports for it. On the CPU nothing changes: the setting is accepted
//! and ignored.
//!
//! [`require_deterministic`] keeps the search to algorithms cuDNN marks deterministic, as
//! PyTorch's `torch.backends.cudnn.deterministic = True`: some backward algorithms add partial
//! sums with atomics, in whatever order the card runs them, so two runs of one seed drift apart
//! in the last bits and then further. kd's own kernels and candle's reductions sum in a fixed
//! order, so with it a seed fixes a GPU run's numbers too.
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};

/// The algorithm search of the cuDNN convolution.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum ConvAlgoSearch {
    /// cuDNN's heuristics (`cudnnGetConvolution*Algorithm_v7`): the first algorithm they rank.
    #[default]
    Heuristic,
    /// `cudnnFindConvolution*Algorithm`: every algorithm run once on the card, the fastest kept.
    /// Costs a few milliseconds per new shape; the first steps of a run pay it.
    Benchmark,
}

static SEARCH: AtomicU8 = AtomicU8::new(0);
static DETERMINISTIC: AtomicBool = AtomicBool::new(false);

/// Makes the cuDNN convolution choose only deterministic algorithms (`true`) or any (`false`,
/// the default) for shapes not chosen yet, process-wide.
pub fn require_deterministic(on: bool) {
    DETERMINISTIC.store(on, Ordering::Relaxed);
}

/// Whether only deterministic algorithms may be chosen ([`require_deterministic`]).
pub fn deterministic_required() -> bool {
    DETERMINISTIC.load(Ordering::Relaxed)
}

impl ConvAlgoSearch {
    /// All values, for help texts.
    pub const ALL: [ConvAlgoSearch; 2] = [ConvAlgoSearch::Heuristic, ConvAlgoSearch::Benchmark];

    /// Makes this the process-wide search for shapes not chosen yet.
    pub fn apply(self) {
        SEARCH.store(self as u8, Ordering::Relaxed);
    }

    /// The process-wide search (set by [`ConvAlgoSearch::apply`]).
    pub fn current() -> Self {
        match SEARCH.load(Ordering::Relaxed) {
            0 => ConvAlgoSearch::Heuristic,
            _ => ConvAlgoSearch::Benchmark,
        }
    }

    /// The name used on the command line and in configs.
    pub fn as_str(self) -> &'static str {
        match self {
            ConvAlgoSearch::Heuristic => "heuristic",
            ConvAlgoSearch::Benchmark => "benchmark",
        }
    }
}

impl std::fmt::Display for ConvAlgoSearch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ConvAlgoSearch {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        ConvAlgoSearch::ALL
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| {
                format!("unknown conv algorithm search {s:?}: expected heuristic or benchmark")
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_names_are_refused() {
        for s in ConvAlgoSearch::ALL {
            assert_eq!(s.as_str().parse::<ConvAlgoSearch>().unwrap(), s);
            assert_eq!(s.to_string(), s.as_str());
        }
        let err = "fastest".parse::<ConvAlgoSearch>().unwrap_err();
        assert!(
            err.contains("\"fastest\"") && err.contains("heuristic or benchmark"),
            "{err}"
        );
    }

    #[test]
    fn determinism_is_a_process_wide_switch() {
        assert!(!deterministic_required());
        require_deterministic(true);
        assert!(deterministic_required());
        require_deterministic(false);
        assert!(!deterministic_required());
    }

    #[test]
    fn apply_sets_the_process_wide_search() {
        ConvAlgoSearch::Benchmark.apply();
        assert_eq!(ConvAlgoSearch::current(), ConvAlgoSearch::Benchmark);
        ConvAlgoSearch::Heuristic.apply();
        assert_eq!(ConvAlgoSearch::current(), ConvAlgoSearch::Heuristic);
    }
}
