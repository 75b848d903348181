//! Byte-level mutations for the property-based fuzz tests (included with `#[path]` by each
//! crate's `tests/fuzz.rs`): a valid seed from `tools/fuzz-corpus/` is truncated, has bytes
//! flipped, inserted or overwritten, and the parser must return a value or an error — never panic.
use proptest::prelude::*;

/// One edit of a byte string.
#[derive(Clone, Debug)]
pub enum Mutation {
    /// Keep the bytes before this position.
    Truncate(prop::sample::Index),
    /// XOR the byte at this position.
    Flip(prop::sample::Index, u8),
    /// Insert bytes before this position.
    Insert(prop::sample::Index, Vec<u8>),
    /// Overwrite bytes from this position.
    Overwrite(prop::sample::Index, Vec<u8>),
}

/// Up to `max` mutations.
pub fn mutations(max: usize) -> impl Strategy<Value = Vec<Mutation>> {
    let one = prop_oneof![
        any::<prop::sample::Index>().prop_map(Mutation::Truncate),
        (any::<prop::sample::Index>(), 1u8..=255).prop_map(|(i, x)| Mutation::Flip(i, x)),
        (
            any::<prop::sample::Index>(),
            prop::collection::vec(any::<u8>(), 1..16)
        )
            .prop_map(|(i, b)| Mutation::Insert(i, b)),
        (
            any::<prop::sample::Index>(),
            prop::collection::vec(any::<u8>(), 1..16)
        )
            .prop_map(|(i, b)| Mutation::Overwrite(i, b)),
    ];
    prop::collection::vec(one, 1..=max)
}

/// `seed` with `muts` applied in order.
pub fn apply(seed: &[u8], muts: &[Mutation]) -> Vec<u8> {
    let mut b = seed.to_vec();
    for m in muts {
        let n = b.len().max(1);
        match m {
            Mutation::Truncate(i) => b.truncate(i.index(n)),
            Mutation::Flip(i, x) if !b.is_empty() => {
                let k = i.index(b.len());
                b[k] ^= x;
            }
            Mutation::Insert(i, bytes) => {
                let k = i.index(b.len() + 1);
                b.splice(k..k, bytes.iter().copied());
            }
            Mutation::Overwrite(i, bytes) if !b.is_empty() => {
                let k = i.index(b.len());
                for (j, &x) in bytes.iter().enumerate() {
                    if let Some(slot) = b.get_mut(k + j) {
                        *slot = x;
                    }
                }
            }
            _ => {}
        }
    }
    b
}
