//! Replays the fuzz seeds and every crash input committed under `fuzz/regressions/` through the
//! same checks the fuzz targets run (`fuzz/checks.rs`).

#[path = "../fuzz/checks.rs"]
mod checks;

use std::path::Path;

fn replay(target: &str, check: fn(&[u8])) -> usize {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut replayed = 0;
    for dir in ["seeds", "regressions"] {
        let Ok(entries) = std::fs::read_dir(root.join(dir).join(target)) else {
            continue;
        };
        for entry in entries {
            let path = entry.unwrap().path();
            check(&std::fs::read(&path).unwrap());
            replayed += 1;
        }
    }
    replayed
}

#[test]
fn deaggregate_inputs_found_by_fuzzing_stay_fixed() {
    assert!(replay("deaggregate", checks::deaggregate) >= 2);
}

#[test]
fn jsonl_inputs_found_by_fuzzing_stay_fixed() {
    assert!(replay("jsonl", checks::jsonl) >= 2);
}
