//! twill's NetworkPolicy engine, pure: no I/O, no async, no kernel.
//!
//! - [`api`]: networking.k8s.io/v1 NetworkPolicy, core/v1 Namespace and Pod, as serialised.
//! - [`validate`]: API-server-like validation with field paths.
//! - [`selector`]: label selector matching.
//! - [`model`]: the cluster (namespaces, pods, policies) with its indexes.
//! - [`oracle`]: the reference semantics, one flow at a time, with an explanation.
//! - [`program`]: the per-node kernel program (sets, chains, verdict maps), its interpreter and
//!   its diff; twilld renders it to nftables.
//! - [`fixtures`]: the upstream e2e cases as data, shared with the daemon's kernel tests.

pub mod api;
pub mod fixtures;
pub mod model;
pub mod oracle;
pub mod program;
pub mod selector;
pub mod validate;

#[doc(hidden)]
pub mod fuzzing;
