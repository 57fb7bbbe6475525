//! twillctl: network policy for people. Reads and writes the objects twilld enforces, in etcd
//! (`<prefix>/policies/<ns>/<name>`, `namespaces/<name>`, `pods/<ns>/<name>`), and explains a
//! verdict with the same engine twilld programs the kernel with.

mod explain;
mod objects;

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use twill_daemon::registry::etcd::EtcdRegistry;
use twill_daemon::registry::EtcdOptions;

#[derive(Debug, Parser)]
#[command(
    name = "twillctl",
    version,
    about = "Manage the network policies, namespaces and pod labels twilld enforces (etcd mode)",
    long_about = "twillctl reads and writes what twilld enforces: Kubernetes NetworkPolicy \
(networking.k8s.io/v1) objects at <prefix>/policies/<namespace>/<name>, Namespaces (their labels) \
at <prefix>/namespaces/<name>, and pod records at <prefix>/pods/<namespace>/<name> (written by \
twilld; their labels may be edited). `explain` says whether a connection is allowed and by which \
policy and rule, computed by the engine twilld compiles its nftables rules with.\n\n\
The etcd flags take the same environment variables as twilld's (TWILLD_ETCD_*), so \
`set -a; . /etc/twill/twilld.env` configures both."
)]
struct Cli {
    #[command(flatten)]
    etcd: EtcdArgs,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Args)]
struct EtcdArgs {
    /// etcd endpoints, comma separated.
    #[arg(
        long,
        env = "TWILLD_ETCD_ENDPOINTS",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:2379",
        global = true
    )]
    etcd_endpoints: Vec<String>,
    /// The key prefix twilld uses.
    #[arg(
        long,
        env = "TWILLD_ETCD_PREFIX",
        default_value = "/coreos.com/network",
        global = true
    )]
    etcd_prefix: String,
    #[arg(long, env = "TWILLD_ETCD_CAFILE", global = true)]
    etcd_cafile: Option<PathBuf>,
    #[arg(long, env = "TWILLD_ETCD_CERTFILE", global = true)]
    etcd_certfile: Option<PathBuf>,
    #[arg(long, env = "TWILLD_ETCD_KEYFILE", global = true)]
    etcd_keyfile: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Create or replace NetworkPolicies and Namespaces from YAML or JSON (several documents,
    /// `---` separated, or a `kind: List`). Every document is validated first; nothing is
    /// written if one is invalid.
    Apply {
        /// A file, or - for standard input.
        #[arg(short = 'f', long = "filename")]
        file: String,
    },
    /// List policies, pods or namespaces.
    Get {
        kind: Kind,
        /// Only this namespace (policies, pods).
        #[arg(short = 'n', long)]
        namespace: Option<String>,
        /// Only this object.
        name: Option<String>,
        #[arg(short = 'o', long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Delete a policy, namespace or pod record by name, or what a file describes.
    Delete {
        kind: Option<Kind>,
        name: Option<String>,
        #[arg(short = 'n', long, default_value = "default")]
        namespace: String,
        #[arg(short = 'f', long = "filename", conflicts_with_all = ["kind", "name"])]
        file: Option<String>,
    },
    /// Set (key=value) or remove (key-) labels of a pod or namespace.
    Label {
        kind: LabelKind,
        name: String,
        #[arg(required = true)]
        labels: Vec<String>,
        #[arg(short = 'n', long, default_value = "default")]
        namespace: String,
        /// Allow changing a label that is already set.
        #[arg(long)]
        overwrite: bool,
    },
    /// Is a connection allowed, and by which policy and rule (or which isolate it)?
    Explain {
        /// Source: <namespace>/<pod>, or an IP address (a pod's, or one outside the cluster).
        #[arg(long)]
        from: String,
        /// Destination: <namespace>/<pod> or an IP address.
        #[arg(long)]
        to: String,
        #[arg(long, default_value_t = 80)]
        port: u16,
        #[arg(long, default_value = "TCP")]
        protocol: String,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Kind {
    #[value(
        alias = "policy",
        alias = "networkpolicy",
        alias = "networkpolicies",
        alias = "netpol"
    )]
    Policies,
    #[value(alias = "pod")]
    Pods,
    #[value(alias = "namespace", alias = "ns")]
    Namespaces,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum LabelKind {
    Pod,
    #[value(alias = "ns")]
    Namespace,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Output {
    Table,
    Json,
    Yaml,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("twillctl: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("twillctl: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<()> {
    let reg = EtcdRegistry::connect(&EtcdOptions {
        endpoints: cli.etcd.etcd_endpoints.clone(),
        prefix: cli.etcd.etcd_prefix.clone(),
        ca_file: cli.etcd.etcd_cafile.clone(),
        cert_file: cli.etcd.etcd_certfile.clone(),
        key_file: cli.etcd.etcd_keyfile.clone(),
    })
    .await
    .context("etcd")?;
    let store = objects::Store::new(reg);
    match cli.cmd {
        Cmd::Apply { file } => {
            let docs = objects::read_documents(&file)?;
            for line in store.apply(docs).await? {
                println!("{line}");
            }
        }
        Cmd::Get {
            kind,
            namespace,
            name,
            output,
        } => {
            let out = store
                .get(kind, namespace.as_deref(), name.as_deref())
                .await?;
            print!(
                "{}",
                match output {
                    Output::Table => objects::table(kind, &out),
                    Output::Json => serde_json::to_string_pretty(&objects::list_doc(&out))? + "\n",
                    Output::Yaml => serde_norway::to_string(&objects::list_doc(&out))?,
                }
            );
        }
        Cmd::Delete {
            kind,
            name,
            namespace,
            file,
        } => {
            let targets = match (file, kind, name) {
                (Some(f), _, _) => objects::targets_of(objects::read_documents(&f)?)?,
                (None, Some(k), Some(n)) => vec![(k, namespace, n)],
                _ => bail!("name what to delete (KIND NAME) or give -f FILE"),
            };
            for line in store.delete(targets).await? {
                println!("{line}");
            }
        }
        Cmd::Label {
            kind,
            name,
            labels,
            namespace,
            overwrite,
        } => {
            let changes = objects::parse_label_args(&labels)?;
            println!(
                "{}",
                store
                    .label(
                        kind == LabelKind::Pod,
                        &namespace,
                        &name,
                        &changes,
                        overwrite
                    )
                    .await?
            );
        }
        Cmd::Explain {
            from,
            to,
            port,
            protocol,
        } => {
            let cluster = store.cluster().await?;
            print!(
                "{}",
                explain::explain(&cluster, &from, &to, port, &protocol)?
            );
        }
    }
    Ok(())
}
