//! twill's fake Kubernetes API server as a program, for trying things by hand (kubectl, a
//! twilld run outside the tests). See tests/src/fakeapi for what it serves and what it does not.
//!
//!   twill-fakeapi --listen 127.0.0.1:6443 --kubeconfig-dir /tmp/fake [--netns NS] [--seed objs.yaml]
//!   kubectl --kubeconfig /tmp/fake/admin.kubeconfig get nodes
//!
//! It writes `admin.kubeconfig` (every right) and one `<serviceaccount>.kubeconfig` for each
//! ServiceAccount the manifest's ClusterRoleBindings name (twill's: `twill.kubeconfig`). Faults,
//! with the admin's token: POST /fake/v1/drop-watches, /fake/v1/stall?seconds=N,
//! /fake/v1/fail?count=N&code=500|503|429[&retryAfter=S], /fake/v1/compact[?to=RV],
//! /fake/v1/down?seconds=N; GET /fake/v1/requests lists what clients did.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Parser;
use nix::sys::signal::{SigSet, Signal};
use serde::Deserialize;
use twill_tests::fakeapi::{FakeApi, FakeApiOptions, Kind};

#[derive(Parser)]
#[command(
    name = "twill-fakeapi",
    about = "twill's fake Kubernetes API server (for tests and manual use)"
)]
struct Args {
    /// Address to listen on (port 0: any free port, printed at start).
    #[arg(long, default_value = "127.0.0.1:6443")]
    listen: SocketAddr,
    /// Listen inside this named network namespace (/run/netns/<name>).
    #[arg(long)]
    netns: Option<String>,
    /// Manifest whose ClusterRoles and bindings decide what each ServiceAccount may do.
    #[arg(long)]
    manifest: Option<PathBuf>,
    /// Where to write the kubeconfigs (admin.kubeconfig, <serviceaccount>.kubeconfig).
    #[arg(long)]
    kubeconfig_dir: Option<PathBuf>,
    /// YAML documents (Namespace, Node, Pod, NetworkPolicy) to create at start.
    #[arg(long)]
    seed: Option<PathBuf>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    // Block the stop signals before any thread starts, so only the wait below receives them.
    let mut stop = SigSet::empty();
    stop.add(Signal::SIGINT);
    stop.add(Signal::SIGTERM);
    stop.thread_block()?;

    let mut opts = FakeApiOptions {
        addr: args.listen,
        netns: args.netns.clone(),
        ..Default::default()
    };
    if let Some(m) = args.manifest {
        opts.manifest = Some(m);
    }
    let manifest = opts.manifest.clone();
    let fake = FakeApi::start(opts)?;
    if let Some(seed) = &args.seed {
        let text =
            std::fs::read_to_string(seed).with_context(|| format!("read {}", seed.display()))?;
        for doc in serde_norway::Deserializer::from_str(&text) {
            let v = serde_json::Value::deserialize(doc)?;
            if v.is_null() {
                continue;
            }
            let (av, k) = (
                v["apiVersion"].as_str().unwrap_or_default(),
                v["kind"].as_str().unwrap_or_default(),
            );
            let Some(kind) = Kind::from_api_version(av, k) else {
                bail!("{}: cannot serve {av} {k}", seed.display());
            };
            fake.create_value(kind, v)?;
        }
    }
    println!("twill-fakeapi: serving {}", fake.url());
    if let Some(dir) = &args.kubeconfig_dir {
        std::fs::create_dir_all(dir)?;
        let write = |name: &str, token: &str| -> Result<()> {
            let path = dir.join(format!("{name}.kubeconfig"));
            // Written whole under another name first: a reader never sees half a file.
            let tmp = dir.join(format!(".{name}.kubeconfig.tmp"));
            std::fs::write(&tmp, fake.kubeconfig(token))?;
            std::fs::rename(&tmp, &path)?;
            println!("  {}", path.display());
            Ok(())
        };
        write("admin", fake.admin_token())?;
        if let Some(m) = &manifest {
            for id in twill_tests::fakeapi::rbac::service_accounts_from_manifest(m)? {
                let name = id.user.rsplit(':').next().unwrap_or("sa").to_string();
                if let Some(t) = fake.token_for(&id.user) {
                    write(&name, &t)?;
                }
            }
        }
    }
    let sig = stop.wait()?;
    println!("twill-fakeapi: {sig:?}, stopping");
    drop(fake);
    Ok(())
}
