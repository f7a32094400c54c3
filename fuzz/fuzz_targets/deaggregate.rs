//! See `checks::deaggregate`.
#![no_main]

// Each target runs one of the shared checks.
#[allow(dead_code)]
#[path = "../checks.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|input: &[u8]| checks::deaggregate(input));
