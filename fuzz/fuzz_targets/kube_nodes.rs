#![no_main]

// The harness lives in the crate under test, where the corpus regression test runs it too.
libfuzzer_sys::fuzz_target!(|data: &[u8]| twill_daemon::fuzzing::kube_nodes(data));
