//! twill's test harness: multi-node clusters ("labs") of network namespaces on one machine,
//! with a real etcd and real twilld processes, plus helpers to inspect them.
//!
//! Used by the integration tests in `tests/`, the lab CLI and the benchmarks. Synchronous on
//! purpose: tests drive real processes and the `ip` tool; in-process networking (HTTP to twilld,
//! TCP probes, the measured UDP stream of `stream`) runs on threads inside the namespaces.

pub mod bins;
pub mod etcd;
pub mod fakeapi;
pub mod faults;
pub mod http;
pub mod kernel;
pub mod lab;
pub mod labcli;
pub mod netns;
pub mod netpol;
pub mod pod;
pub mod proc;
pub mod runtime;
pub mod stall;
pub mod stream;
pub mod wait;

pub use kernel::DeviceEntries;
pub use lab::{cleanup_stale, Lab, LabOptions, LabState};
pub use pod::{pod_to_pod, tcp_probe, CniOutput, Pod, TcpProbe};
pub use stream::{StreamOptions, StreamReport, UdpStream};
pub use wait::{wait_for, wait_until};
