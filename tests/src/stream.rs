//! A measured traffic stream between two namespaces (pods): UDP datagrams with sequence numbers
//! at a fixed rate, sent from a thread inside one namespace to a receiver thread inside the
//! other, which records every arrival. At the end: how many were sent and received, which
//! sequence numbers were lost, and the longest time the receiver went without a datagram.
//!
//! Real sockets through the real data path (pod veth, bridge, VXLAN, underlay), nothing
//! simulated. Bounded: the sender stops by itself after `StreamOptions::duration`, the
//! receiver a moment later; dropping the stream stops both threads and waits for them.

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde::Serialize;

use crate::netns::spawn_in_netns;
use crate::pod::Pod;

const MAGIC: [u8; 4] = *b"TWFS";
/// magic, stream id, sequence number, send time (ns since the stream's start).
const HEADER: usize = 4 + 4 + 8 + 8;
/// How long the receiver waits for datagrams still in flight once the sender has stopped.
const DRAIN: Duration = Duration::from_secs(1);
/// The receiver's poll interval for its stop flag.
const RECV_POLL: Duration = Duration::from_millis(20);
/// Longest stream a caller may ask for: every stream ends by itself.
pub const MAX_DURATION: Duration = Duration::from_secs(900);

#[derive(Clone, Debug)]
pub struct StreamOptions {
    /// Datagrams per second.
    pub rate: u32,
    /// The sender stops by itself after this long (`finish` may stop it earlier).
    pub duration: Duration,
    /// The receiver's UDP port.
    pub port: u16,
    /// Bytes per datagram (at least the 24-byte header).
    pub payload: usize,
}

impl Default for StreamOptions {
    fn default() -> Self {
        StreamOptions {
            rate: 200,
            duration: Duration::from_secs(120),
            port: 7600,
            payload: 64,
        }
    }
}

/// What a finished stream measured.
#[derive(Clone, Debug, Serialize)]
pub struct StreamReport {
    pub rate: u32,
    /// Datagrams the sender tried to send (every sequence number it used).
    pub sent: u64,
    /// Of those, sends the local stack refused (no route, unreachable, ...): lost too.
    pub send_errors: u64,
    /// Distinct sequence numbers that arrived.
    pub received: u64,
    /// Sequence numbers that never arrived, in order.
    pub lost: Vec<u64>,
    pub duplicates: u64,
    /// Arrivals with a lower sequence number than an earlier arrival.
    pub reordered: u64,
    /// The longest time without an arrival while datagrams were due: between consecutive
    /// arrivals, and from the first send / to the last send. At 200/s a clean stream shows a
    /// few ms; every lost datagram widens it by 1/rate.
    pub longest_gap_ms: f64,
    /// The sequence number that arrived last before that gap (None: before the first arrival).
    pub longest_gap_after: Option<u64>,
    /// The sender's own longest pause between two sends: when it approaches `longest_gap_ms`,
    /// the gap was this machine not running the sender, not the network.
    pub longest_send_gap_ms: f64,
    /// Highest one-way delay of any datagram (both ends share this process's clock).
    pub max_latency_ms: f64,
    /// UDP receive errors (buffer overflows) in the receiver's namespace while the stream ran:
    /// datagrams the network delivered that the receiving socket dropped.
    pub rcvbuf_errors: u64,
    pub seconds: f64,
    /// The sender stopped at `duration` rather than at `finish`: the stream ended before the
    /// caller wanted it to, so the tail of what it measured is missing.
    pub ran_out: bool,
}

impl StreamReport {
    pub fn lost_count(&self) -> u64 {
        self.lost.len() as u64
    }

    /// One line for logs and failure messages.
    pub fn summary(&self) -> String {
        let lost = if self.lost.len() > 20 {
            format!("{:?}... ({} in all)", &self.lost[..20], self.lost.len())
        } else {
            format!("{:?}", self.lost)
        };
        format!(
            "{} sent at {}/s in {:.1} s, {} received, lost {lost}, {} send errors, {} duplicates, \
             {} reordered, longest gap {:.1} ms (after seq {:?}; sender's longest pause {:.1} ms), \
             max latency {:.2} ms, receive buffer errors {}{}",
            self.sent,
            self.rate,
            self.seconds,
            self.received,
            self.send_errors,
            self.duplicates,
            self.reordered,
            self.longest_gap_ms,
            self.longest_gap_after,
            self.longest_send_gap_ms,
            self.max_latency_ms,
            self.rcvbuf_errors,
            if self.ran_out { ", RAN OUT" } else { "" }
        )
    }
}

struct SenderOut {
    sent: u64,
    send_errors: u64,
    longest_send_gap: Duration,
    first_send: Option<Duration>,
    last_send: Option<Duration>,
    ran_out: bool,
}

struct Arrival {
    seq: u64,
    /// Since the stream's start.
    at: Duration,
    sent_at: Duration,
}

struct ReceiverOut {
    arrivals: Vec<Arrival>,
    rcvbuf_errors: u64,
}

/// A running stream. `finish` stops it and reports; dropping it stops it without a report.
pub struct UdpStream {
    opts: StreamOptions,
    start: Instant,
    stop_sender: Arc<AtomicBool>,
    stop_receiver: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    received: Arc<AtomicU64>,
    sender: Option<JoinHandle<Result<std::io::Result<SenderOut>>>>,
    receiver: Option<JoinHandle<Result<std::io::Result<ReceiverOut>>>>,
}

impl UdpStream {
    /// Stream from pod `from` to pod `to` (to its pod IP).
    pub fn start(from: &Pod, to: &Pod, opts: StreamOptions) -> Result<UdpStream> {
        Self::start_ns(&from.ns, &to.ns, to.ip, opts)
            .with_context(|| format!("stream from pod {} to pod {}", from.id, to.id))
    }

    /// Stream from namespace `from_ns` to a receiver bound to `to_ip` inside `to_ns`.
    pub fn start_ns(
        from_ns: &str,
        to_ns: &str,
        to_ip: Ipv4Addr,
        opts: StreamOptions,
    ) -> Result<UdpStream> {
        if opts.rate == 0 || opts.rate > 100_000 {
            bail!("stream rate {} is not in 1..=100000", opts.rate);
        }
        if opts.duration.is_zero() || opts.duration > MAX_DURATION {
            bail!(
                "stream duration {:?} is not in (0, {MAX_DURATION:?}]",
                opts.duration
            );
        }
        if opts.payload < HEADER || opts.payload > 1400 {
            bail!("stream payload {} is not in {HEADER}..=1400", opts.payload);
        }
        let id: u32 = rand::random();
        let start = Instant::now();
        let stop_sender = Arc::new(AtomicBool::new(false));
        let stop_receiver = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let received = Arc::new(AtomicU64::new(0));
        let dst = SocketAddr::from((to_ip, opts.port));

        // The receiver binds first (reported back), so no datagram finds a closed port.
        let (bound_tx, bound_rx) = std::sync::mpsc::channel::<std::io::Result<()>>();
        let (stop, count) = (stop_receiver.clone(), received.clone());
        // Stops by itself well after the sender's deadline even if nobody sets the flag.
        let hard_stop = start + opts.duration + DRAIN * 30;
        let receiver = spawn_in_netns(to_ns, "stream-rx", move || {
            receive(dst, id, start, hard_stop, &stop, &count, bound_tx)
        })?;
        let mut stream = UdpStream {
            opts: opts.clone(),
            start,
            stop_sender: stop_sender.clone(),
            stop_receiver,
            sent: sent.clone(),
            received,
            sender: None,
            receiver: Some(receiver),
        };
        match bound_rx.recv_timeout(Duration::from_secs(10)) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => bail!("receiver: bind {dst} in {to_ns}: {e}"),
            Err(_) => bail!("receiver in {to_ns} did not start"),
        }
        let sender = spawn_in_netns(from_ns, "stream-tx", move || {
            send(dst, id, start, &opts, &stop_sender, &sent)
        })?;
        stream.sender = Some(sender);
        Ok(stream)
    }

    /// Datagrams sent so far.
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    /// Datagrams received so far (duplicates included).
    pub fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }

    /// Wait until datagrams arrive (the path is up and resolved); an error after `timeout`.
    pub fn wait_flowing(&self, timeout: Duration) -> Result<()> {
        let before = self.received();
        crate::wait::wait_until(timeout, || self.received() > before).with_context(|| {
            format!(
                "no datagram arrived within {timeout:?} ({} sent)",
                self.sent()
            )
        })
    }

    /// Stop sending now, give datagrams in flight a moment to arrive, stop receiving, report.
    pub fn finish(mut self) -> Result<StreamReport> {
        self.stop_sender.store(true, Ordering::Relaxed);
        let sender = join(self.sender.take(), "sender")?;
        // Wait for what is still in flight, not longer than DRAIN.
        let expected = sender.sent - sender.send_errors;
        let drain_until = Instant::now() + DRAIN;
        while self.received() < expected && Instant::now() < drain_until {
            std::thread::sleep(RECV_POLL);
        }
        self.stop_receiver.store(true, Ordering::Relaxed);
        let receiver = join(self.receiver.take(), "receiver")?;
        Ok(report(&self.opts, sender, receiver, self.start.elapsed()))
    }
}

impl Drop for UdpStream {
    fn drop(&mut self) {
        self.stop_sender.store(true, Ordering::Relaxed);
        self.stop_receiver.store(true, Ordering::Relaxed);
        if let Some(h) = self.sender.take() {
            let _ = h.join();
        }
        if let Some(h) = self.receiver.take() {
            let _ = h.join();
        }
    }
}

fn join<T>(h: Option<JoinHandle<Result<std::io::Result<T>>>>, what: &str) -> Result<T> {
    let h = h.ok_or_else(|| anyhow!("stream {what} already joined"))?;
    h.join()
        .map_err(|_| anyhow!("stream {what} panicked"))??
        .with_context(|| format!("stream {what}"))
}

fn send(
    dst: SocketAddr,
    id: u32,
    start: Instant,
    opts: &StreamOptions,
    stop: &AtomicBool,
    sent: &AtomicU64,
) -> std::io::Result<SenderOut> {
    let sock = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
    sock.connect(dst)?;
    let interval = Duration::from_secs(1) / opts.rate;
    let mut buf = vec![0u8; opts.payload];
    buf[..4].copy_from_slice(&MAGIC);
    buf[4..8].copy_from_slice(&id.to_be_bytes());
    let mut out = SenderOut {
        sent: 0,
        send_errors: 0,
        longest_send_gap: Duration::ZERO,
        first_send: None,
        last_send: None,
        ran_out: false,
    };
    // A fixed schedule (seq k is due at k * interval): a late send does not shift the rest.
    let t0 = Instant::now();
    for seq in 0u64.. {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let due = t0 + interval * seq as u32;
        if due - t0 >= opts.duration {
            out.ran_out = true;
            break;
        }
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
        let at = start.elapsed();
        buf[8..16].copy_from_slice(&seq.to_be_bytes());
        buf[16..24].copy_from_slice(&(at.as_nanos() as u64).to_be_bytes());
        // The sequence number is used whether or not the stack takes the datagram: a send
        // refused for want of a route is a lost datagram.
        if sock.send(&buf).is_err() {
            out.send_errors += 1;
        }
        out.sent += 1;
        sent.store(out.sent, Ordering::Relaxed);
        if let Some(last) = out.last_send {
            out.longest_send_gap = out.longest_send_gap.max(at - last);
        }
        out.first_send.get_or_insert(at);
        out.last_send = Some(at);
    }
    Ok(out)
}

fn receive(
    bind: SocketAddr,
    id: u32,
    start: Instant,
    hard_stop: Instant,
    stop: &AtomicBool,
    count: &AtomicU64,
    bound: std::sync::mpsc::Sender<std::io::Result<()>>,
) -> std::io::Result<ReceiverOut> {
    let sock = match UdpSocket::bind(bind).and_then(|s| {
        s.set_read_timeout(Some(RECV_POLL))?;
        Ok(s)
    }) {
        Ok(s) => s,
        Err(e) => {
            let _ = bound.send(Err(std::io::Error::new(e.kind(), e.to_string())));
            return Err(e);
        }
    };
    // A roomy buffer: a receiver thread the machine did not run for a moment must not drop.
    set_rcvbuf(&sock, 4 << 20);
    let errors_before = udp_receive_errors();
    let _ = bound.send(Ok(()));
    let mut arrivals = Vec::new();
    let mut buf = [0u8; 2048];
    while !stop.load(Ordering::Relaxed) && Instant::now() < hard_stop {
        let n = match sock.recv(&mut buf) {
            Ok(n) => n,
            // A socket with a receive timeout fails with EINTR on any handled signal, SA_RESTART
            // or not (signal(7)); one ended a bench run in CI. Keep receiving.
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::Interrupted
                ) =>
            {
                continue
            }
            Err(e) => return Err(e),
        };
        let at = start.elapsed();
        if n < HEADER || buf[..4] != MAGIC || buf[4..8] != id.to_be_bytes() {
            continue; // not ours
        }
        let seq = u64::from_be_bytes(buf[8..16].try_into().expect("8 bytes"));
        let sent_ns = u64::from_be_bytes(buf[16..24].try_into().expect("8 bytes"));
        arrivals.push(Arrival {
            seq,
            at,
            sent_at: Duration::from_nanos(sent_ns),
        });
        count.fetch_add(1, Ordering::Relaxed);
    }
    let rcvbuf_errors = udp_receive_errors().saturating_sub(errors_before);
    Ok(ReceiverOut {
        arrivals,
        rcvbuf_errors,
    })
}

fn report(opts: &StreamOptions, tx: SenderOut, rx: ReceiverOut, elapsed: Duration) -> StreamReport {
    let mut seen = vec![false; tx.sent as usize];
    let (mut duplicates, mut reordered, mut highest) = (0, 0, None::<u64>);
    let mut max_latency = Duration::ZERO;
    for a in &rx.arrivals {
        match seen.get_mut(a.seq as usize) {
            Some(s) if *s => duplicates += 1,
            Some(s) => *s = true,
            None => continue, // beyond what the sender reports: cannot happen
        }
        if highest.is_some_and(|h| a.seq < h) {
            reordered += 1;
        }
        highest = Some(highest.map_or(a.seq, |h| h.max(a.seq)));
        max_latency = max_latency.max(a.at.saturating_sub(a.sent_at));
    }
    let lost: Vec<u64> = (0..tx.sent).filter(|&s| !seen[s as usize]).collect();

    // Gaps: from the first send to the first arrival, between arrivals, from the last arrival
    // to the last send (datagrams lost at the end).
    let mut longest = Duration::ZERO;
    let mut after = None;
    let mut prev: (Option<u64>, Option<Duration>) = (None, tx.first_send);
    for a in &rx.arrivals {
        if let Some(p) = prev.1 {
            let gap = a.at.saturating_sub(p);
            if gap > longest {
                longest = gap;
                after = prev.0;
            }
        }
        prev = (Some(a.seq), Some(a.at));
    }
    if let (Some(p), Some(last)) = (prev.1, tx.last_send) {
        let gap = last.saturating_sub(p);
        if gap > longest {
            longest = gap;
            after = prev.0;
        }
    }
    let received = seen.iter().filter(|s| **s).count() as u64;
    StreamReport {
        rate: opts.rate,
        sent: tx.sent,
        send_errors: tx.send_errors,
        received,
        lost,
        duplicates,
        reordered,
        longest_gap_ms: longest.as_secs_f64() * 1e3,
        longest_gap_after: after,
        longest_send_gap_ms: tx.longest_send_gap.as_secs_f64() * 1e3,
        max_latency_ms: max_latency.as_secs_f64() * 1e3,
        rcvbuf_errors: rx.rcvbuf_errors,
        seconds: elapsed.as_secs_f64(),
        ran_out: tx.ran_out,
    }
}

fn set_rcvbuf(sock: &UdpSocket, bytes: libc::c_int) {
    use std::os::fd::AsRawFd;
    // SAFETY: a valid socket and an int option of the size passed. FORCE (we are root) goes
    // past net.core.rmem_max; if it fails the default buffer stays, which is only smaller.
    unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&bytes as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

/// RcvbufErrors of the calling thread's network namespace (/proc/thread-self: /proc/self/net
/// would show the process's, not this thread's, namespace). 0 if unreadable.
fn udp_receive_errors() -> u64 {
    std::fs::read_to_string("/proc/thread-self/net/snmp")
        .ok()
        .and_then(|t| snmp_field(&t, "Udp:", "RcvbufErrors"))
        .unwrap_or(0)
}

/// A field of /proc/net/snmp: a header line and a value line share their first word.
fn snmp_field(text: &str, proto: &str, field: &str) -> Option<u64> {
    let mut lines = text.lines().filter(|l| l.starts_with(proto));
    let names = lines.next()?;
    let values = lines.next()?;
    let i = names.split_whitespace().position(|n| n == field)?;
    values.split_whitespace().nth(i)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_snmp_fields() {
        let t = "Ip: Forwarding DefaultTTL\nIp: 1 64\nUdp: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors\nUdp: 10 0 3 12 2\n";
        assert_eq!(snmp_field(t, "Udp:", "RcvbufErrors"), Some(2));
        assert_eq!(snmp_field(t, "Udp:", "InErrors"), Some(3));
        assert_eq!(snmp_field(t, "Udp:", "Missing"), None);
    }

    fn tx(sent: u64) -> SenderOut {
        SenderOut {
            sent,
            send_errors: 0,
            longest_send_gap: Duration::from_millis(5),
            first_send: Some(Duration::ZERO),
            last_send: Some(Duration::from_millis(5 * (sent - 1))),
            ran_out: false,
        }
    }

    fn arrival(seq: u64, at_ms: u64) -> Arrival {
        Arrival {
            seq,
            at: Duration::from_millis(at_ms),
            sent_at: Duration::from_millis(5 * seq),
        }
    }

    #[test]
    fn counts_losses_gaps_duplicates_and_reordering() {
        let opts = StreamOptions::default();
        // 10 sent every 5 ms; 3 and 4 lost, 7 arrives twice, 9 before 8.
        let arrivals = vec![
            arrival(0, 1),
            arrival(1, 6),
            arrival(2, 11),
            arrival(5, 26),
            arrival(6, 31),
            arrival(7, 36),
            arrival(7, 37),
            arrival(9, 46),
            arrival(8, 47),
        ];
        let r = report(
            &opts,
            tx(10),
            ReceiverOut {
                arrivals,
                rcvbuf_errors: 0,
            },
            Duration::from_secs(1),
        );
        assert_eq!(r.sent, 10);
        assert_eq!(r.received, 8);
        assert_eq!(r.lost, vec![3, 4]);
        assert_eq!(r.duplicates, 1);
        assert_eq!(r.reordered, 1);
        assert_eq!(r.longest_gap_ms, 15.0);
        assert_eq!(r.longest_gap_after, Some(2));
        // 8 was sent at 40 ms and arrived, after 9, at 47.
        assert_eq!(r.max_latency_ms, 7.0);
    }

    #[test]
    fn losses_at_the_end_widen_the_gap() {
        let opts = StreamOptions::default();
        let r = report(
            &opts,
            tx(10),
            ReceiverOut {
                arrivals: vec![arrival(0, 1), arrival(1, 6)],
                rcvbuf_errors: 0,
            },
            Duration::from_secs(1),
        );
        assert_eq!(r.lost, (2..10).collect::<Vec<_>>());
        assert_eq!(r.longest_gap_ms, 39.0);
        assert_eq!(r.longest_gap_after, Some(1));
    }
}
