//! See `checks::jsonl`.
#![no_main]

// Each target runs one of the shared checks.
#[allow(dead_code)]
#[path = "../checks.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|line: &[u8]| checks::jsonl(line));
