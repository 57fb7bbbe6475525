//! `twill`: the CNI plugin. Validates what the runtime passed, then forwards one request to the
//! node's twilld over a Unix socket and prints its answer. VERSION and every input error are
//! answered here without the daemon. No async runtime: one blocking connection is all it needs.
//!
//! Config keys of its own (besides the standard ones): `socket` (path of twilld's CNI socket,
//! default /run/twill/cni.sock) and `timeout` (seconds to wait for twilld, default 30). `dns` is
//! copied into the ADD result.

use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use twill_proto::{
    codes, frame_len, is_supported_version, validate, version_has_gc_status, CniError, Command,
    Request, Response, DEFAULT_SOCKET, PROTOCOL, SUPPORTED_VERSIONS,
};

/// Seconds to wait for twilld's answer unless the config's `timeout` says otherwise. ADD can
/// wait behind bridge creation, so be generous, but never unbounded.
const DEFAULT_TIMEOUT_SECS: f64 = 30.0;
/// Version used in error output when the config does not name one.
const FALLBACK_VERSION: &str = "1.1.0";

const HELP: &str = "\
twill: the CNI plugin of the twill pod network.

Container runtimes run this binary, not people: they set CNI_COMMAND (ADD, DEL, CHECK, GC,
STATUS, VERSION), CNI_CONTAINERID, CNI_NETNS, CNI_IFNAME, CNI_ARGS and CNI_PATH, pass the
network config on stdin, and read the result from stdout. The plugin forwards each request to
the node's twilld over the Unix socket named by the config key `socket` (default
/run/twill/cni.sock) and prints twilld's answer. Optional config key `timeout`: seconds to wait
for twilld (default 30).

Conflist entry: {\"type\": \"twill\", \"socket\": \"/run/twill/cni.sock\"}
CNI spec versions: 0.4.0, 1.0.0, 1.1.0
";

fn main() -> ExitCode {
    let env = |k: &str| std::env::var(k).ok();
    // People asking for help get it; runtimes never pass arguments.
    if let Some(arg) = std::env::args().nth(1) {
        if arg == "--version" || arg == "-V" {
            println!(
                "twill {} (CNI 0.4.0, 1.0.0, 1.1.0)",
                env!("CARGO_PKG_VERSION")
            );
        } else {
            print!("{HELP}");
        }
        return if matches!(arg.as_str(), "--help" | "-h" | "--version" | "-V") {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        };
    }
    let mut stdin = Vec::new();
    // A read error leaves stdin empty; decoding reports it below.
    let _ = std::io::stdin()
        .take(twill_proto::MAX_FRAME as u64 + 1)
        .read_to_end(&mut stdin);
    let (out, ok) = run(&env, &stdin);
    if let Some(v) = out {
        let mut o = std::io::stdout().lock();
        let _ = writeln!(o, "{v}");
        let _ = o.flush();
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Returns what to print and whether it is a success.
fn run(env: &dyn Fn(&str) -> Option<String>, stdin: &[u8]) -> (Option<Value>, bool) {
    let parsed: Result<Value, String> = if stdin.len() > twill_proto::MAX_FRAME {
        Err(format!(
            "the configuration on stdin exceeds the limit of {} bytes",
            twill_proto::MAX_FRAME
        ))
    } else {
        serde_json::from_slice::<Value>(stdin)
            .map_err(|e| e.to_string())
            .and_then(|v| {
                if v.is_object() {
                    Ok(v)
                } else {
                    Err("the network configuration is not a JSON object".into())
                }
            })
    };
    let asked = parsed
        .as_ref()
        .ok()
        .and_then(|v| v.get("cniVersion"))
        .and_then(Value::as_str)
        .map(str::to_string);
    let err_version = asked.clone().unwrap_or_else(|| FALLBACK_VERSION.into());
    let fail = |e: CniError| (Some(e.to_json(&err_version)), false);

    let command = match env("CNI_COMMAND").filter(|s| !s.is_empty()) {
        None => {
            return fail(CniError::new(
                codes::INVALID_ENV,
                "missing environment variables: CNI_COMMAND",
            ))
        }
        Some(c) => match Command::parse(&c) {
            Some(c) => c,
            None => {
                return fail(CniError::new(
                    codes::INVALID_ENV,
                    format!(
                    "invalid CNI_COMMAND {c:?}: expected ADD, DEL, CHECK, VERSION, GC or STATUS"
                ),
                ))
            }
        },
    };

    if command == Command::Version {
        let asked = match &parsed {
            Ok(_) => asked.unwrap_or_else(|| FALLBACK_VERSION.into()),
            // Some callers send no config at all to VERSION.
            Err(_) if stdin.iter().all(u8::is_ascii_whitespace) => FALLBACK_VERSION.into(),
            Err(e) => {
                return fail(CniError::new(
                    codes::DECODE_FAILED,
                    format!("failed to decode the network configuration on stdin: {e}"),
                ))
            }
        };
        return (
            Some(json!({"cniVersion": asked, "supportedVersions": SUPPORTED_VERSIONS})),
            true,
        );
    }

    let missing: Vec<&str> = command
        .required_env()
        .iter()
        .copied()
        .filter(|k| env(k).is_none_or(|v| v.is_empty()))
        .collect();
    if !missing.is_empty() {
        return fail(CniError::new(
            codes::INVALID_ENV,
            format!(
                "missing environment variables for {}: {}",
                command.as_str(),
                missing.join(", ")
            ),
        ));
    }

    let config = match parsed {
        Ok(v) => v,
        Err(e) => {
            return fail(CniError::new(
                codes::DECODE_FAILED,
                format!("failed to decode the network configuration on stdin: {e}"),
            ))
        }
    };
    let version = match config.get("cniVersion") {
        Some(Value::String(v)) => v.clone(),
        _ => {
            return fail(CniError::new(
                codes::INVALID_CONFIG,
                "the network configuration has no cniVersion string",
            ))
        }
    };
    if !is_supported_version(&version) {
        return fail(CniError::new(
            codes::INCOMPATIBLE_VERSION,
            format!(
                "unsupported cniVersion {version:?}; twill supports {}",
                SUPPORTED_VERSIONS.join(", ")
            ),
        ));
    }
    if matches!(command, Command::Gc | Command::Status) && !version_has_gc_status(&version) {
        return fail(CniError::new(
            codes::INCOMPATIBLE_VERSION,
            format!(
                "{} needs cniVersion 1.1.0, the configuration asks for {version}",
                command.as_str()
            ),
        ));
    }

    let container_id = env("CNI_CONTAINERID").unwrap_or_default();
    let ifname = env("CNI_IFNAME").unwrap_or_default();
    if matches!(command, Command::Add | Command::Check | Command::Del) {
        if let Err(e) = validate::container_id(&container_id) {
            return fail(e);
        }
        if let Err(e) = validate::ifname(&ifname) {
            return fail(e);
        }
    }
    let name = config.get("name").and_then(Value::as_str).unwrap_or("");
    if let Err(e) = validate::network_name(name) {
        return fail(e);
    }

    let socket = match config.get("socket") {
        None => PathBuf::from(DEFAULT_SOCKET),
        Some(Value::String(s)) if !s.is_empty() => PathBuf::from(s),
        Some(_) => {
            return fail(CniError::new(
                codes::INVALID_CONFIG,
                "config key \"socket\" must be a non-empty path string",
            ))
        }
    };
    let timeout = match config.get("timeout") {
        None => Duration::from_secs_f64(DEFAULT_TIMEOUT_SECS),
        Some(v) => match v.as_f64() {
            Some(s) if s > 0.0 && s <= 3600.0 => Duration::from_secs_f64(s),
            _ => {
                return fail(CniError::new(
                    codes::INVALID_CONFIG,
                    "config key \"timeout\" must be a number of seconds in (0, 3600]",
                ))
            }
        },
    };

    let req = Request {
        protocol: PROTOCOL,
        command,
        container_id,
        netns: env("CNI_NETNS").unwrap_or_default(),
        ifname,
        args: env("CNI_ARGS").unwrap_or_default(),
        path: env("CNI_PATH").unwrap_or_default(),
        config,
    };
    // Refused here, with the reason, rather than as an unreachable daemon.
    let frame = match twill_proto::encode_frame(&req) {
        Ok(f) => f,
        Err(e) => {
            return fail(CniError::new(
                codes::INVALID_CONFIG,
                format!(
                "cannot send the request to twilld: {e} (the network configuration is too large)"
            ),
            ))
        }
    };
    match exchange(&socket, &frame, timeout) {
        Ok(Response::Ok(out)) => (out, true),
        Ok(Response::Err(e)) => fail(e),
        Err(e) => {
            // The daemon being away means "not ready" for STATUS and "retry" for the rest.
            let code = if command == Command::Status {
                codes::NOT_AVAILABLE
            } else {
                codes::TRY_AGAIN_LATER
            };
            fail(
                CniError::new(code, e)
                    .with_details("is twilld running on this node? it serves the twill CNI socket"),
            )
        }
    }
}

/// One request, one response, every step bounded by `timeout`.
fn exchange(socket: &Path, frame: &[u8], timeout: Duration) -> Result<Response, String> {
    let deadline = Instant::now() + timeout;
    let shown = socket.display().to_string();
    let mut stream =
        connect(socket, timeout).map_err(|e| format!("cannot reach twilld at {shown}: {e}"))?;
    let sent = stream
        .set_write_timeout(Some(timeout))
        .and_then(|_| stream.write_all(frame));
    if let Err(e) = sent {
        // twilld may refuse before reading (e.g. a non-root caller) and close: its answer is
        // still in our receive buffer and says more than EPIPE does.
        return read_response(&mut stream, deadline, timeout, &shown)
            .map_err(|_| io_msg(&e, "sending the request to", &shown, timeout));
    }
    read_response(&mut stream, deadline, timeout, &shown)
}

fn read_response(
    stream: &mut UnixStream,
    deadline: Instant,
    timeout: Duration,
    shown: &str,
) -> Result<Response, String> {
    let mut header = [0u8; 4];
    read_until(stream, &mut header, deadline)
        .map_err(|e| io_msg(&e, "waiting for an answer from", shown, timeout))?;
    let n = frame_len(header).map_err(|e| format!("bad answer from twilld at {shown}: {e}"))?;
    let mut body = vec![0u8; n];
    read_until(stream, &mut body, deadline)
        .map_err(|e| io_msg(&e, "reading the answer from", shown, timeout))?;
    twill_proto::decode_body(&body).map_err(|e| format!("bad answer from twilld at {shown}: {e}"))
}

fn io_msg(e: &std::io::Error, doing: &str, socket: &str, timeout: Duration) -> String {
    match e.kind() {
        ErrorKind::WouldBlock | ErrorKind::TimedOut => format!(
            "timed out after {:.1}s {doing} twilld at {socket}",
            timeout.as_secs_f64()
        ),
        ErrorKind::UnexpectedEof => {
            format!("twilld at {socket} closed the connection without an answer")
        }
        _ => format!("{doing} twilld at {socket}: {e}"),
    }
}

/// `read_exact` with an overall deadline (a socket read timeout alone restarts on every byte).
fn read_until(stream: &mut UnixStream, buf: &mut [u8], deadline: Instant) -> std::io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(ErrorKind::TimedOut.into());
        }
        stream.set_read_timeout(Some(left))?;
        match stream.read(&mut buf[done..]) {
            Ok(0) => return Err(ErrorKind::UnexpectedEof.into()),
            Ok(n) => done += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// A Unix connect blocks while the listener's backlog is full (a wedged daemon). The kernel
/// bounds that wait by the socket's send timeout, so the socket gets it before connecting: no
/// helper thread, whose start-up alone used to cost more than the rest of the exchange.
fn connect(socket: &Path, timeout: Duration) -> std::io::Result<UnixStream> {
    let path = socket.as_os_str().as_bytes();
    // SAFETY: all-zero is a valid sockaddr_un.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if path.is_empty() || path.len() >= addr.sun_path.len() || path.contains(&0) {
        return Err(std::io::Error::new(
            ErrorKind::InvalidInput,
            "not a usable Unix socket path",
        ));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in addr.sun_path.iter_mut().zip(path) {
        *d = *s as libc::c_char;
    }
    // SAFETY: plain socket(2); the fd is owned by the UnixStream at once.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh socket nothing else owns.
    let stream = unsafe { UnixStream::from_raw_fd(fd) };
    stream.set_write_timeout(Some(timeout))?; // SO_SNDTIMEO, which connect(2) waits by
    let len = std::mem::size_of::<libc::sa_family_t>() + path.len() + 1;
    loop {
        // SAFETY: addr is a valid sockaddr_un of at least `len` bytes.
        let rc = unsafe {
            libc::connect(
                stream.as_raw_fd(),
                (&addr as *const libc::sockaddr_un).cast(),
                len as libc::socklen_t,
            )
        };
        if rc == 0 {
            return Ok(stream);
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            // The send timeout ran out with the backlog still full.
            Some(libc::EAGAIN) => {
                return Err(std::io::Error::new(
                    ErrorKind::TimedOut,
                    format!("connect timed out after {:.1}s", timeout.as_secs_f64()),
                ))
            }
            _ => return Err(e),
        }
    }
}
