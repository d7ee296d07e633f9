//! Runs the checked-in fuzz corpus (`fuzz/corpus/<target>/seed-*`) through the entry points the
//! cargo-fuzz targets call, so every CI run exercises them on stable Rust.

use std::path::{Path, PathBuf};

fn seeds(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus").join(target);
    let mut seeds: Vec<(PathBuf, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.expect("a readable corpus dir").path())
        .filter(|path| {
            path.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("seed-"))
        })
        .map(|path| {
            let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            (path, bytes)
        })
        .collect();
    seeds.sort();
    assert!(!seeds.is_empty(), "{} holds no seed-* files", dir.display());
    seeds
}

fn run(target: &str, entry: fn(&[u8])) {
    for (path, bytes) in seeds(target) {
        let outcome = std::panic::catch_unwind(|| entry(&bytes));
        assert!(outcome.is_ok(), "{} panicked on {}", target, path.display());
    }
}

#[test]
fn record_corpus() {
    run("record", solo::fuzzing::record);
    // Guard against a corpus that has rotted into nothing but rejected frames.
    let valid = seeds("record")
        .iter()
        .filter(|(_, bytes)| solo::log::frame::decode(bytes).is_ok())
        .count();
    assert!(valid >= 5, "only {valid} record seeds are valid frames");
}

#[test]
fn event_corpus() {
    run("event", solo::fuzzing::event);
}

#[test]
fn snapshot_corpus() {
    run("snapshot", solo::fuzzing::snapshot);
    // Guard against a corpus that has rotted into nothing but refused snapshots (written by
    // builds whose formats are outdated).
    let settings = solo::state::Settings::default();
    let valid = seeds("snapshot")
        .iter()
        .filter(|(_, bytes)| solo::state::State::decode_snapshot(bytes, settings).is_ok())
        .count();
    assert!(valid >= 4, "only {valid} snapshot seeds decode");
}
