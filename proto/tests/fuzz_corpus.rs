//! The `frame` fuzz target's corpus and crash reproducers, replayed through its harness.

use std::path::Path;

#[test]
fn frame_corpus() {
    replay("frame", twill_proto::fuzzing::frame);
}

fn replay(target: &str, harness: fn(&[u8])) {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    twill_proto::fuzzing::replay_corpus(&fuzz, target, harness);
}
