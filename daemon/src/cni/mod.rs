//! The daemon's side of the `twill` CNI plugin.
//! Listens on the CNI socket from start; until `node` holds a value, ADD answers "try again
//! later" (11) and STATUS answers 50.

mod flows;
pub mod hostlocal;
pub mod ipam;
mod ops;
mod peer;

pub(crate) use ops::{check_result_fits, dns_of, expected_of, valid_attachments, validate_request};
pub use ops::{host_veth_name, is_host_veth_name};

use std::net::Ipv4Addr;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ipnet::Ipv4Net;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{watch, Semaphore};
use twill_proto::{codes, CniError, FrameError, Request, Response, PROTOCOL};

use crate::metrics::{GaugeGuard, Metrics};
use crate::netlink::pod::{PodNetlink, ThreadLimit};

#[derive(Clone, Debug)]
pub struct CniOptions {
    pub socket: PathBuf,
    pub bridge: String,
    pub state_dir: PathBuf,
    /// host-local's data dir (flannel's CNI), whose addresses in our subnet stay taken.
    pub host_local_dir: Option<PathBuf>,
    /// Network policy: every pod is programmed before ADD answers (None: policy off).
    pub policy: Option<crate::policy::PolicyHandle>,
    pub limits: CniLimits,
}

/// What a burst of CNI requests may take at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CniLimits {
    /// Connections served at once; more clients wait in the socket's backlog. Each holds its
    /// decoded request (up to 16 times the frame, `twill_proto::MAX_FRAME`).
    pub max_connections: usize,
    /// Threads pod operations run on at once (see `netlink::pod::ThreadLimit`).
    pub max_threads: usize,
}

impl Default for CniLimits {
    fn default() -> Self {
        CniLimits {
            max_connections: 16,
            max_threads: 32,
        }
    }
}

/// The node's pod network, known once the lease is held and the overlay is up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeNet {
    /// The node's IPv4 subnet; none on an IPv6-only network.
    pub subnet: Option<Ipv4Net>,
    /// A dual-stack or IPv6-only node's IPv6 subnet: pods get an address of each family.
    pub subnet6: Option<ipnet::Ipv6Net>,
    /// MTU for pod interfaces: the overlay MTU (the smaller one, on a dual-stack node).
    pub mtu: u32,
}

impl NodeNet {
    /// The node's subnets, IPv4 first.
    pub fn nets(&self) -> Vec<ipnet::IpNet> {
        self.subnet
            .map(ipnet::IpNet::V4)
            .into_iter()
            .chain(self.subnet6.map(ipnet::IpNet::V6))
            .collect()
    }

    /// The bridge's IPv4 address, the pods' IPv4 gateway: the subnet's first address.
    pub fn gateway(&self) -> Option<Ipv4Net> {
        let s = self.subnet?;
        let gw = Ipv4Addr::from(u32::from(s.network()) + 1);
        Ipv4Net::new(gw, s.prefix_len()).ok()
    }

    /// The bridge's IPv6 address, the pods' IPv6 gateway: the v6 subnet's first address.
    pub fn gateway6(&self) -> Option<ipnet::Ipv6Net> {
        let s = self.subnet6?;
        let gw = std::net::Ipv6Addr::from(u128::from(s.network()) + 1);
        ipnet::Ipv6Net::new(gw, s.prefix_len()).ok()
    }
}

/// How long a client may take to send its request.
const REQUEST_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long we wait for a client to take the answer.
const RESPONSE_WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// The CNI server with its socket bound and IPAM loaded, not yet serving.
pub struct Server {
    ctx: Arc<ops::Ctx>,
    listener: UnixListener,
}

impl Server {
    /// Everything that needs a usable state dir and socket path: IPAM loaded, the socket bound.
    /// twilld does this before it talks to etcd, so a problem here stops it before it has
    /// taken a lease or set up a device. Errors name the path.
    pub async fn bind(
        opts: CniOptions,
        node: watch::Receiver<Option<NodeNet>>,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<Server> {
        let (state_dir, host_local) = (opts.state_dir.clone(), opts.host_local_dir.clone());
        let ipam = tokio::task::spawn_blocking(move || {
            ipam::Ipam::open(&state_dir)
                .map(|i| i.with_host_local(hostlocal::HostLocal::new(host_local)))
        })
        .await
        .map_err(std::io::Error::other)?
        .map_err(std::io::Error::other)?;
        let threads = ThreadLimit::new(opts.limits.max_threads, metrics.clone());
        let nl = PodNetlink::new(threads).map_err(std::io::Error::other)?;
        let listener = bind(&opts.socket)?;
        Ok(Server {
            ctx: Arc::new(ops::Ctx::new(opts, node, metrics, ipam, nl)),
            listener,
        })
    }

    /// Serves until the process exits.
    pub async fn serve(self) -> std::io::Result<()> {
        let ctx = self.ctx;
        tracing::info!(socket = %ctx.opts.socket.display(), bridge = %ctx.opts.bridge,
            limits = ?ctx.opts.limits, "serving CNI requests");
        tokio::spawn(ops::report_outside(ctx.clone()));
        let slots = Arc::new(Semaphore::new(ctx.opts.limits.max_connections.max(1)));
        loop {
            let slot = match slots.clone().try_acquire_owned() {
                Ok(s) => s,
                Err(_) => {
                    // Every slot busy: further clients wait in the socket's backlog (the
                    // plugin's deadline covers that), not as tasks holding decoded requests.
                    Metrics::inc(&ctx.metrics.cni_connections_at_limit);
                    slots
                        .clone()
                        .acquire_owned()
                        .await
                        .expect("the connection semaphore is never closed")
                }
            };
            match self.listener.accept().await {
                Ok((stream, _)) => {
                    let ctx = ctx.clone();
                    tokio::spawn(async move {
                        handle_conn(ctx, stream).await;
                        drop(slot);
                    });
                }
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accepting a CNI connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
}

/// Binds and serves until the process exits. Errors only if the socket cannot be served.
pub async fn serve(
    opts: CniOptions,
    node: watch::Receiver<Option<NodeNet>>,
    metrics: Arc<Metrics>,
) -> std::io::Result<()> {
    Server::bind(opts, node, metrics).await?.serve().await
}

/// Creates the parent directory (which only root may write, see `paths`), replaces a stale
/// socket (never a non-socket file, never one another process still serves), mode 0600.
fn bind(path: &Path) -> std::io::Result<UnixListener> {
    crate::paths::private_parent(path).map_err(std::io::Error::other)?;
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            // The state dir's lock stops a second twilld on the same state dir only; one with
            // another state dir but this socket must not take the live one away.
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::AddrInUse,
                    format!(
                        "{} is served by another process (another twilld?)",
                        path.display()
                    ),
                ));
            }
            std::fs::remove_file(path)?
        }
        Ok(_) => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket", path.display()),
            ))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let l = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
}

async fn handle_conn(ctx: Arc<ops::Ctx>, mut stream: UnixStream) {
    let _busy = GaugeGuard::new(&ctx.metrics.cni_connections);
    // Only root may drive pod networking; checked before reading a byte.
    let peer = match peer::Peer::of(&stream) {
        Ok(p) if p.uid == 0 => p,
        Ok(p) => {
            tracing::warn!(uid = p.uid, "refused a CNI connection from a non-root peer");
            let e = CniError::new(
                codes::PERMISSION_DENIED,
                format!("permission denied: peer uid {} is not root", p.uid),
            );
            write_response(&mut stream, &Response::Err(e)).await;
            return;
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot read CNI peer credentials");
            return;
        }
    };
    let req = match tokio::time::timeout(REQUEST_READ_TIMEOUT, read_request(&mut stream)).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            let code = match e {
                FrameError::Io(_) => codes::IO_FAILURE,
                _ => codes::DECODE_FAILED,
            };
            Metrics::inc(&ctx.metrics.cni_requests);
            Metrics::inc(&ctx.metrics.cni_errors);
            tracing::warn!(error = %e, "bad CNI request");
            let e = CniError::new(code, format!("bad request: {e}"));
            write_response(&mut stream, &Response::Err(e)).await;
            return;
        }
        Err(_) => {
            tracing::warn!("CNI client sent no complete request in time");
            return;
        }
    };
    Metrics::inc(&ctx.metrics.cni_requests);
    // Deferred policy work waits until the answer is out (see `PolicyHandle::request`).
    let _running = ctx.opts.policy.as_ref().map(|p| p.request());
    let resp = if req.protocol != PROTOCOL {
        Err(CniError::new(
            codes::INCOMPATIBLE_VERSION,
            format!(
                "socket protocol {} not supported by this twilld (speaks {PROTOCOL}); upgrade the twill plugin and twilld together",
                req.protocol
            ),
        ))
    } else {
        ops::dispatch(&ctx, req, peer.root()).await
    };
    let resp = match resp {
        Ok(v) => Response::Ok(v),
        Err(e) => {
            Metrics::inc(&ctx.metrics.cni_errors);
            Response::Err(e)
        }
    };
    write_response(&mut stream, &resp).await;
}

async fn read_request(stream: &mut UnixStream) -> Result<Request, FrameError> {
    let mut header = [0u8; 4];
    stream.read_exact(&mut header).await?;
    let n = twill_proto::frame_len(header)?;
    let mut body = vec![0u8; n];
    stream.read_exact(&mut body).await?;
    twill_proto::decode_body(&body)
}

async fn write_response(stream: &mut UnixStream, resp: &Response) {
    let frame = match twill_proto::encode_frame(resp) {
        Ok(f) => f,
        Err(e) => {
            // The client gets an error, not a closed connection that reads as "try again".
            tracing::error!(error = %e, "cannot encode a CNI response");
            let err = CniError::new(
                codes::INTERNAL,
                format!("twilld's answer does not fit the socket protocol: {e}"),
            );
            match twill_proto::encode_frame(&Response::Err(err)) {
                Ok(f) => f,
                Err(_) => return,
            }
        }
    };
    let write = async {
        stream.write_all(&frame).await?;
        stream.shutdown().await
    };
    match tokio::time::timeout(RESPONSE_WRITE_TIMEOUT, write).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::debug!(error = %e, "CNI client went away before the answer"),
        Err(_) => tracing::warn!("CNI client did not take the answer in time"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_live_socket_is_never_replaced_a_stale_one_is() {
        let d = std::env::temp_dir().join(format!("twill-cni-bind-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
        let sock = d.join("cni.sock");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let live = bind(&sock).unwrap();
            let e = bind(&sock).unwrap_err();
            assert_eq!(e.kind(), std::io::ErrorKind::AddrInUse, "{e}");
            assert!(e.to_string().contains("cni.sock"), "{e}");
            // Still the first listener's socket: a client reaches it.
            let _c = std::os::unix::net::UnixStream::connect(&sock).unwrap();
            assert!(live.accept().await.is_ok());
            drop(live);
            // Nobody serves it any more: replaced.
            bind(&sock).unwrap();
        });
        std::fs::remove_dir_all(d).unwrap();
    }
}
