//! The `frame` fuzz target's corpus and crash reproducers, replayed through its harness.

use std::path::Path;

#[test]
fn frame_corpus() {
    replay("frame", twill_proto::fuzzing::frame);
}

/// Feeds every file of `fuzz/corpus/<target>/` and `fuzz/artifacts/<target>/` (the crashes the
/// fuzzer found, kept as reproducers) to the target's harness, naming the file that fails.
fn replay(target: &str, harness: fn(&[u8])) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    let mut replayed = 0;
    for dir in ["corpus", "artifacts"] {
        let Ok(entries) = std::fs::read_dir(root.join(dir).join(target)) else {
            continue;
        };
        let mut files: Vec<_> = entries
            .map(|e| e.expect("a directory entry").path())
            .collect();
        files.sort();
        for f in files {
            let data = std::fs::read(&f).expect("a corpus file");
            if std::panic::catch_unwind(|| harness(&data)).is_err() {
                panic!("{} fails the {target} harness", f.display());
            }
            replayed += 1;
        }
    }
    assert!(
        replayed > 0,
        "no corpus for {target} under {}",
        root.display()
    );
}
