//! The fuzz targets' corpora and crash reproducers for what twilld parses, replayed through
//! their harnesses.

use std::path::Path;

use twill_daemon::fuzzing;

#[test]
fn cni_request_corpus() {
    replay("cni_request", fuzzing::cni_request);
}

#[test]
fn kube_nodes_corpus() {
    replay("kube_nodes", fuzzing::kube_nodes);
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

fn replay(target: &str, harness: fn(&[u8])) {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    twill_proto::fuzzing::replay_corpus(&fuzz, target, harness);
}
