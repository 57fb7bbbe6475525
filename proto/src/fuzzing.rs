//! Fuzz harness for the frame decoder, shared by the cargo-fuzz target `frame` (`fuzz/`) and the
//! regression test that replays its corpus (`proto/tests/fuzz_corpus.rs`); and the corpus
//! replay every crate's regression test uses. Not an API.

use crate::{encode_frame, read_frame, FrameError, Request, Response, MAX_FRAME};

/// Reads `data` as the bytes a peer sent on the socket: a Request (what twilld decodes) and a
/// Response (what the plugin decodes). Must not panic; asserts what the decoder promises.
pub fn frame(data: &[u8]) {
    let declared = data
        .get(..4)
        .map(|h| u32::from_be_bytes([h[0], h[1], h[2], h[3]]) as usize);
    let req = read_frame::<Request, _>(&mut &data[..]);
    // A header over the limit is refused before anything else is read or allocated.
    if declared.is_some_and(|n| n > MAX_FRAME) {
        assert!(matches!(req, Err(FrameError::TooLarge(_))), "{req:?}");
        return;
    }
    if let Ok(req) = req {
        round_trip(&req);
        // The plugin sends these fields to the daemon as they are; the version accessor must
        // cope with any config value.
        let _ = req.cni_version();
    }
    if let Ok(resp) = read_frame::<Response, _>(&mut &data[..]) {
        round_trip(&resp);
    }
}

/// What was decoded encodes to a frame that decodes to the same message.
fn round_trip<T>(msg: &T)
where
    T: serde::Serialize + for<'de> serde::Deserialize<'de> + PartialEq + std::fmt::Debug,
{
    let frame = match encode_frame(msg) {
        Ok(f) => f,
        // Re-encoding may grow a body decoded just under the limit (`1E5` becomes `100000.0`).
        Err(FrameError::TooLarge(_)) => return,
        Err(e) => panic!("a decoded message does not encode: {e}"),
    };
    let back: T = read_frame(&mut frame.as_slice()).expect("an encoded frame decodes");
    assert_eq!(&back, msg);
}

/// Feeds every file of `<fuzz>/corpus/<target>/` and `<fuzz>/artifacts/<target>/` (the crashes
/// the fuzzer found, kept as reproducers) to the target's harness; panics naming the file that
/// fails, or when there is nothing to replay. `fuzz` is the workspace's `fuzz/` directory.
pub fn replay_corpus(fuzz: &std::path::Path, target: &str, harness: fn(&[u8])) {
    let mut replayed = 0;
    for dir in ["corpus", "artifacts"] {
        let Ok(entries) = std::fs::read_dir(fuzz.join(dir).join(target)) else {
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
        fuzz.display()
    );
}
