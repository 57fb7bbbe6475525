//! Kubernetes mode (flannel's `--kube-subnet-mgr`): instead of claiming a lease in etcd, each
//! node takes the pod subnet the Kubernetes controller manager assigned to its Node object
//! (`spec.podCIDRs`), publishes its public IP and VTEP MAC as annotations on that Node in
//! flannel's format, and learns its peers by watching all Nodes.
//!
//! This module holds the pure rules (no I/O), so they are table-tested without an API server.

pub mod annotations;
pub mod node;
mod placement;
pub mod slim;
