//! The fuzz targets' corpora and crash reproducers for what twilld parses, replayed through
//! their harnesses.

use std::path::Path;

use twill_daemon::fuzzing;

#[test]
fn cni_request_corpus() {
    replay("cni_request", fuzzing::cni_request);
}

#[test]
fn lease_corpus() {
    replay("lease", fuzzing::lease);
}

#[test]
fn net_config_corpus() {
    replay("net_config", fuzzing::net_config);
}

#[test]
fn peer_view_corpus() {
    replay("peer_view", fuzzing::peer_view);
}

#[test]
fn subnet_key_corpus() {
    replay("subnet_key", fuzzing::subnet_key);
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
