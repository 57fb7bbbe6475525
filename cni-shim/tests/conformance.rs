//! Drives the real `twill` binary exactly as a container runtime does: environment, config on
//! stdin, result or error JSON on stdout, exit code. The daemon side here is either absent, a
//! listener that never answers, or a scripted stand-in speaking the socket protocol.

use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use twill_proto::{read_frame, write_frame, CniError, Request, Response};

const BIN: &str = env!("CARGO_BIN_EXE_twill");

struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "twill-conf-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

struct Out {
    json: Option<Value>,
    raw: String,
    ok: bool,
}

/// Runs the plugin with exactly `env` (nothing inherited) and `stdin`; kills it if it has not
/// finished within `limit` (the plugin must bound its own waits, so this only catches hangs).
fn run_with_limit(env: &[(&str, &str)], stdin: &[u8], limit: Duration) -> Out {
    let mut cmd = Command::new(BIN);
    cmd.env_clear()
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    let deadline = Instant::now() + limit;
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("twill did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    let raw = String::from_utf8(out.stdout).unwrap();
    let json = if raw.trim().is_empty() {
        None
    } else {
        Some(serde_json::from_str(&raw).unwrap_or_else(|e| panic!("stdout not JSON ({e}): {raw}")))
    };
    Out {
        json,
        raw,
        ok: out.status.success(),
    }
}

fn run(env: &[(&str, &str)], stdin: &Value) -> Out {
    run_with_limit(env, stdin.to_string().as_bytes(), Duration::from_secs(60))
}

fn err_code(o: &Out) -> u64 {
    assert!(!o.ok, "expected failure, got success: {}", o.raw);
    o.json.as_ref().expect("error JSON")["code"]
        .as_u64()
        .expect("code")
}

fn msg(o: &Out) -> String {
    o.json.as_ref().unwrap()["msg"]
        .as_str()
        .unwrap()
        .to_string()
}

fn conf(version: &str, socket: &str) -> Value {
    json!({"cniVersion": version, "name": "twill", "type": "twill", "socket": socket})
}

fn add_env(cmd: &str) -> Vec<(&str, &str)> {
    vec![
        ("CNI_COMMAND", cmd),
        ("CNI_CONTAINERID", "ctr1"),
        ("CNI_NETNS", "/run/netns/x"),
        ("CNI_IFNAME", "eth0"),
        ("CNI_PATH", "/opt/cni/bin"),
    ]
}

#[test]
fn version_answers_each_supported_version() {
    for v in ["0.4.0", "1.0.0", "1.1.0"] {
        let o = run(&[("CNI_COMMAND", "VERSION")], &json!({"cniVersion": v}));
        assert!(o.ok, "{}", o.raw);
        assert_eq!(
            o.json.unwrap(),
            json!({"cniVersion": v, "supportedVersions": ["0.4.0", "1.0.0", "1.1.0"]})
        );
    }
    // podman sends VERSION with CNI_NETNS=dummy and nothing else required.
    let o = run(
        &[("CNI_COMMAND", "VERSION"), ("CNI_NETNS", "dummy")],
        &json!({"cniVersion": "0.4.0", "name": "n", "type": "twill"}),
    );
    assert!(o.ok);
    assert_eq!(o.json.unwrap()["cniVersion"], "0.4.0");
}

#[test]
fn missing_env_names_every_missing_variable() {
    let c = conf("1.0.0", "/nonexistent/twill.sock");
    let o = run(&[], &c);
    assert_eq!(err_code(&o), 4);
    assert!(msg(&o).contains("CNI_COMMAND"));

    for cmd in ["ADD", "CHECK"] {
        let o = run(&[("CNI_COMMAND", cmd)], &c);
        assert_eq!(err_code(&o), 4);
        let m = msg(&o);
        for v in ["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"] {
            assert!(m.contains(v), "{cmd}: {m}");
        }
        assert_eq!(o.json.as_ref().unwrap()["cniVersion"], "1.0.0");
    }
    // DEL does not need CNI_NETNS.
    let o = run(&[("CNI_COMMAND", "DEL"), ("CNI_CONTAINERID", "c")], &c);
    assert_eq!(err_code(&o), 4);
    assert!(msg(&o).contains("CNI_IFNAME"));
    assert!(!msg(&o).contains("CNI_NETNS"), "{}", msg(&o));

    let o = run(&[("CNI_COMMAND", "FROB")], &c);
    assert_eq!(err_code(&o), 4);
    assert!(msg(&o).contains("FROB"));

    let mut env = add_env("ADD");
    env[1].1 = "-bad id";
    let o = run(&env, &c);
    assert_eq!(err_code(&o), 4);
    assert!(msg(&o).contains("CNI_CONTAINERID"));
}

/// libcni's rules, plus no control characters, checked before anything reaches the daemon:
/// the container ID, ifname and network name end up in twilld's records one per line.
#[test]
fn identifiers_are_checked_as_libcni_checks_them() {
    let c = conf("1.0.0", "/nonexistent/twill.sock");
    for id in ["ctr\n1", " ctr1", "ctr1 ", "ctr\u{7}1"] {
        let mut env = add_env("ADD");
        env[1].1 = id;
        let o = run(&env, &c);
        assert_eq!(err_code(&o), 4, "{id:?}");
        assert!(msg(&o).contains("CNI_CONTAINERID"), "{id:?}: {}", msg(&o));
    }
    for ifname in ["eth0\n", " eth0", "eth0 ", "et\u{1}h0"] {
        let mut env = add_env("DEL");
        env[3].1 = ifname;
        let o = run(&env, &c);
        assert_eq!(err_code(&o), 4, "{ifname:?}");
        assert!(msg(&o).contains("CNI_IFNAME"), "{ifname:?}: {}", msg(&o));
    }
    for name in [
        json!("bad name"),
        json!("net\n"),
        json!(" net"),
        json!(""),
        Value::Null,
    ] {
        let mut c = c.clone();
        c["name"] = name.clone();
        let o = run(&add_env("ADD"), &c);
        assert_eq!(err_code(&o), 7, "{name}");
        assert!(msg(&o).contains("network name"), "{name}: {}", msg(&o));
    }
}

#[test]
fn undecodable_stdin_is_code_6() {
    for garbage in [&b"{not json"[..], b"[1,2]", b"", b"\xff\xfe"] {
        let o = run_with_limit(&add_env("ADD"), garbage, Duration::from_secs(60));
        assert_eq!(err_code(&o), 6, "{:?}", String::from_utf8_lossy(garbage));
    }
    let o = run_with_limit(
        &[("CNI_COMMAND", "VERSION")],
        b"{oops",
        Duration::from_secs(60),
    );
    assert_eq!(err_code(&o), 6);
}

#[test]
fn unsupported_version_is_code_1() {
    for v in ["0.3.1", "0.2.0", "2.0.0"] {
        let o = run(&add_env("ADD"), &conf(v, "/nonexistent/twill.sock"));
        assert_eq!(err_code(&o), 1, "{v}");
        assert!(msg(&o).contains(v));
    }
    // GC and STATUS exist from 1.1.0 on.
    for cmd in ["GC", "STATUS"] {
        let o = run(
            &[("CNI_COMMAND", cmd)],
            &conf("1.0.0", "/nonexistent/twill.sock"),
        );
        assert_eq!(err_code(&o), 1, "{cmd}");
    }
}

#[test]
fn daemon_unreachable() {
    let d = TempDir::new();
    let sock = d.0.join("cni.sock");
    let s = sock.to_str().unwrap();
    let o = run(&add_env("ADD"), &conf("1.0.0", s));
    assert_eq!(err_code(&o), 11);
    assert!(msg(&o).contains(s), "{}", msg(&o));

    let o = run(&[("CNI_COMMAND", "STATUS")], &conf("1.1.0", s));
    assert_eq!(err_code(&o), 50);

    let o = run(
        &[
            ("CNI_COMMAND", "DEL"),
            ("CNI_CONTAINERID", "c1"),
            ("CNI_IFNAME", "eth0"),
        ],
        &conf("0.4.0", s),
    );
    assert_eq!(err_code(&o), 11);
    assert!(msg(&o).contains(s));
    assert_eq!(o.json.unwrap()["cniVersion"], "0.4.0");
}

/// An ADD against `sock` with the config's `timeout` at 0.5 s (the test allows it 20 s).
fn add_with_half_second_timeout(sock: &std::path::Path) -> (Value, Out) {
    let mut c = conf("1.0.0", sock.to_str().unwrap());
    c["timeout"] = json!(0.5);
    let o = run_with_limit(
        &add_env("ADD"),
        c.to_string().as_bytes(),
        Duration::from_secs(20),
    );
    (c, o)
}

#[test]
fn hung_daemon_gives_a_bounded_error() {
    let d = TempDir::new();
    let sock = d.0.join("cni.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    // Accepts and holds every connection, never answers.
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for c in listener.incoming() {
            held.push(c);
        }
    });
    let (mut c, o) = add_with_half_second_timeout(&sock);
    assert_eq!(err_code(&o), 11);
    assert!(msg(&o).contains("timed out"), "{}", msg(&o));

    c["cniVersion"] = json!("1.1.0");
    let o = run_with_limit(
        &[("CNI_COMMAND", "STATUS")],
        c.to_string().as_bytes(),
        Duration::from_secs(20),
    );
    assert_eq!(err_code(&o), 50);

    c["timeout"] = json!("soon");
    let o = run(&add_env("ADD"), &c);
    assert_eq!(err_code(&o), 7);
}

#[test]
fn a_daemon_that_stopped_accepting_times_out_the_connect() {
    // A listener with a backlog of 0 and one connection already waiting has a full queue:
    // connect(2) blocks until the plugin's own timeout ends it.
    let d = TempDir::new();
    let sock = d.0.join("cni.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    // SAFETY: listen(2) again on our own listening socket only shrinks its backlog.
    assert_eq!(unsafe { libc::listen(listener.as_raw_fd(), 0) }, 0);
    let _waiting = UnixStream::connect(&sock).unwrap();
    let (_, o) = add_with_half_second_timeout(&sock);
    assert_eq!(err_code(&o), 11);
    assert!(
        msg(&o).contains("connect timed out after 0.5s"),
        "{}",
        msg(&o)
    );
}

/// A scripted daemon: answers each connection with the next response, returns the requests.
fn scripted(
    sock: &std::path::Path,
    answers: Vec<Response>,
) -> std::thread::JoinHandle<Vec<Request>> {
    let listener = UnixListener::bind(sock).unwrap();
    std::thread::spawn(move || {
        let mut seen = Vec::new();
        for a in answers {
            let (mut s, _) = listener.accept().unwrap();
            seen.push(read_frame::<Request, _>(&mut s).unwrap());
            write_frame(&mut s, &a).unwrap();
        }
        seen
    })
}

#[test]
fn forwards_request_and_prints_the_answer() {
    let d = TempDir::new();
    let sock = d.0.join("cni.sock");
    let result = json!({"cniVersion":"1.0.0","interfaces":[],"ips":[],"routes":[],"dns":{}});
    let daemon = scripted(
        &sock,
        vec![
            Response::Ok(Some(result.clone())),
            Response::Err(CniError::new(100, "subnet full").with_details("253 in use")),
            Response::Ok(None),
        ],
    );
    let mut c = conf("1.0.0", sock.to_str().unwrap());
    c["runtimeConfig"] = json!({"portMappings": []});
    c["capabilities"] = json!({"portMappings": true});
    let mut env = add_env("ADD");
    env.push(("CNI_ARGS", "IgnoreUnknown=1;K8S_POD_NAME=p"));
    let o = run(&env, &c);
    assert!(o.ok, "{}", o.raw);
    assert_eq!(o.json.unwrap(), result);

    let o = run(&env, &c);
    assert_eq!(err_code(&o), 100);
    assert_eq!(
        o.json.unwrap(),
        json!({"cniVersion":"1.0.0","code":100,"msg":"subnet full","details":"253 in use"})
    );

    let o = run(
        &[
            ("CNI_COMMAND", "DEL"),
            ("CNI_CONTAINERID", "ctr1"),
            ("CNI_IFNAME", "eth0"),
        ],
        &c,
    );
    assert!(o.ok);
    assert!(o.raw.trim().is_empty(), "DEL prints nothing: {}", o.raw);

    let seen = daemon.join().unwrap();
    assert_eq!(seen[0].command, twill_proto::Command::Add);
    assert_eq!(seen[0].container_id, "ctr1");
    assert_eq!(seen[0].netns, "/run/netns/x");
    assert_eq!(seen[0].ifname, "eth0");
    assert_eq!(seen[0].args, "IgnoreUnknown=1;K8S_POD_NAME=p");
    assert_eq!(seen[0].path, "/opt/cni/bin");
    assert_eq!(seen[0].config, c, "the raw config is forwarded untouched");
    assert_eq!(seen[2].command, twill_proto::Command::Del);
    assert_eq!(seen[2].netns, "");
}

#[test]
fn help_and_version_for_people() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_twill"))
        .arg("--help")
        .env_remove("CNI_COMMAND")
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("CNI_COMMAND") && text.contains("/run/twill/cni.sock"),
        "{text}"
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_twill"))
        .arg("--version")
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("twill "));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_twill"))
        .arg("--bogus")
        .output()
        .unwrap();
    assert!(!out.status.success(), "unknown arguments are an error");
}
