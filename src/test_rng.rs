//! A small deterministic generator for unit tests: xorshift64, so that a failing case can be
//! replayed from its seed.

/// Successive xorshift64 values from `state` (which must not be 0).
pub(crate) fn xorshift64(mut state: u64) -> impl FnMut() -> u64 {
    move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    }
}
