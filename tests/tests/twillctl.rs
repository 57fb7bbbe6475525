//! twillctl against a real etcd: apply (YAML and JSON, several documents), get in every
//! output, label, delete, refusal of invalid documents naming the field, and explain.

use std::io::Write;
use std::process::{Command, Output, Stdio};

use anyhow::{Context, Result};
use serde_json::{json, Value};
use twill_tests::lab::{Lab, LabOptions};

const PREFIX: &str = "/coreos.com/network";

fn lab() -> Result<Lab> {
    Lab::new(LabOptions {
        nodes: 1,
        ..Default::default()
    })
}

/// twillctl inside the node namespace (etcd is on the underlay address), with stdin.
fn ctl(lab: &mut Lab, args: &[&str], stdin: &str) -> Result<Output> {
    let bin = lab.bin("twillctl")?;
    let mut c = Command::new("ip")
        .args(["netns", "exec", &lab.node_ns(1)])
        .arg(&bin)
        .args(["--etcd-endpoints", &lab.etcd_endpoint()])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("run twillctl")?;
    c.stdin.take().unwrap().write_all(stdin.as_bytes())?;
    Ok(c.wait_with_output()?)
}

fn ok(lab: &mut Lab, args: &[&str], stdin: &str) -> Result<String> {
    let out = ctl(lab, args, stdin)?;
    anyhow::ensure!(
        out.status.success(),
        "twillctl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

const DOCS: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: db-from-web
  namespace: shop
spec:
  podSelector:
    matchLabels: {app: db}
  ingress:
  - from:
    - podSelector:
        matchLabels: {app: web}
    ports:
    - port: 5432
---
apiVersion: v1
kind: Namespace
metadata:
  name: shop
  labels: {team: blue}
---
{"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
 "metadata": {"name": "deny-all", "namespace": "shop"},
 "spec": {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}}
"#;

#[test]
fn apply_get_label_delete() -> Result<()> {
    let mut lab = lab()?;
    let out = ok(&mut lab, &["apply", "-f", "-"], DOCS)?;
    assert!(
        out.contains("networkpolicy shop/db-from-web created"),
        "{out}"
    );
    assert!(out.contains("namespace shop created"), "{out}");
    assert!(out.contains("networkpolicy shop/deny-all created"), "{out}");
    // Again: nothing changes.
    let out = ok(&mut lab, &["apply", "-f", "-"], DOCS)?;
    assert_eq!(out.matches("unchanged").count(), 3, "{out}");
    // Stored as the Kubernetes API serialises it.
    let stored: Value = serde_json::from_str(
        &lab.etcd_get(&format!("{PREFIX}/policies/shop/db-from-web"))?
            .context("not stored")?,
    )?;
    assert_eq!(stored["kind"], "NetworkPolicy");
    assert_eq!(stored["spec"]["ingress"][0]["ports"][0]["port"], 5432);

    let table = ok(&mut lab, &["get", "policies", "-n", "shop"], "")?;
    assert!(table.starts_with("NAMESPACE  NAME"), "{table}");
    assert!(
        table.contains("db-from-web") && table.contains("deny-all"),
        "{table}"
    );
    let j: Value = serde_json::from_str(&ok(&mut lab, &["get", "policies", "-o", "json"], "")?)?;
    assert_eq!(j["items"].as_array().map(Vec::len), Some(2));
    let y = ok(&mut lab, &["get", "namespaces", "shop", "-o", "yaml"], "")?;
    assert!(y.contains("kind: List") && y.contains("team: blue"), "{y}");

    ok(&mut lab, &["label", "namespace", "shop", "env=prod"], "")?;
    let refused = ctl(&mut lab, &["label", "namespace", "shop", "team=red"], "")?;
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--overwrite"));
    ok(
        &mut lab,
        &[
            "label",
            "namespace",
            "shop",
            "team=red",
            "--overwrite",
            "env-",
        ],
        "",
    )?;
    let ns: Value = serde_json::from_str(
        &lab.etcd_get(&format!("{PREFIX}/namespaces/shop"))?
            .context("gone")?,
    )?;
    assert_eq!(ns["metadata"]["labels"], json!({"team": "red"}));
    // A namespace without an object gets one.
    ok(&mut lab, &["label", "ns", "other", "a=b"], "")?;
    assert!(lab
        .etcd_get(&format!("{PREFIX}/namespaces/other"))?
        .is_some());

    let out = ok(
        &mut lab,
        &["delete", "policy", "deny-all", "-n", "shop"],
        "",
    )?;
    assert!(out.contains("deleted"), "{out}");
    let out = ok(&mut lab, &["delete", "-f", "-"], DOCS)?;
    assert!(
        out.contains("policie shop/db-from-web deleted")
            || out.contains("shop/db-from-web deleted"),
        "{out}"
    );
    assert!(out.contains("shop/deny-all not found"), "{out}");
    assert!(lab.etcd_keys(&format!("{PREFIX}/policies/"))?.is_empty());
    Ok(())
}

#[test]
fn invalid_documents_are_refused_naming_the_field_and_nothing_is_written() -> Result<()> {
    let mut lab = lab()?;
    let bad = r#"
kind: NetworkPolicy
apiVersion: networking.k8s.io/v1
metadata: {name: good, namespace: x}
spec: {podSelector: {}}
---
kind: NetworkPolicy
apiVersion: networking.k8s.io/v1
metadata: {name: bad, namespace: x}
spec:
  podSelector: {}
  ingress:
  - from:
    - ipBlock: {cidr: 10.1.0.0/16, except: [10.0.0.0/8]}
    ports:
    - port: 80
      endPort: 70
---
kind: Service
metadata: {name: s}
"#;
    let out = ctl(&mut lab, &["apply", "-f", "-"], bad)?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("nothing applied"), "{err}");
    assert!(
        err.contains("spec.ingress[0].from[0].ipBlock.except[0]"),
        "{err}"
    );
    assert!(err.contains("spec.ingress[0].ports[0].endPort"), "{err}");
    assert!(
        err.contains("\"Service\" is not one twillctl applies"),
        "{err}"
    );
    assert!(lab.etcd_keys(&format!("{PREFIX}/policies/"))?.is_empty());
    let out = ctl(&mut lab, &["apply", "-f", "-"], "not: [valid")?;
    assert!(!out.status.success());
    Ok(())
}

#[test]
fn explain_names_the_policy_and_rule_or_the_isolation() -> Result<()> {
    let mut lab = lab()?;
    ok(&mut lab, &["apply", "-f", "-"], DOCS)?;
    ok(
        &mut lab,
        &["delete", "policy", "deny-all", "-n", "shop"],
        "",
    )?;
    let pod = |name: &str, app: &str, ip: &str, node: &str| {
        json!({"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": name, "namespace": "shop", "labels": {"app": app}},
               "spec": {"nodeName": node, "containers": [{"name": "c"}]},
               "status": {"podIP": ip, "podIPs": [{"ip": ip}]}})
    };
    for (n, app, ip, node) in [
        ("db-0", "db", "10.244.1.5", "n1"),
        ("web-0", "web", "10.244.2.5", "n2"),
        ("batch-0", "batch", "10.244.3.5", "n3"),
    ] {
        lab.etcdctl(&[
            "put",
            &format!("{PREFIX}/pods/shop/{n}"),
            "--",
            &pod(n, app, ip, node).to_string(),
        ])?;
    }
    let out = ok(
        &mut lab,
        &[
            "explain",
            "--from",
            "shop/web-0",
            "--to",
            "shop/db-0",
            "--port",
            "5432",
        ],
        "",
    )?;
    assert!(out.contains("shop/db-from-web"), "{out}");
    assert!(
        out.contains("kernel, node n1, ingress: accepted by chain pol-in-"),
        "{out}"
    );
    let out = ok(
        &mut lab,
        &[
            "explain",
            "--from",
            "shop/batch-0",
            "--to",
            "10.244.1.5",
            "--port",
            "5432",
        ],
        "",
    )?;
    assert!(out.contains("shop/db-from-web"), "{out}");
    assert!(out.contains("dropped"), "{out}");
    assert!(!out.contains("WARNING"), "{out}");
    let out = ok(
        &mut lab,
        &[
            "explain",
            "--from",
            "shop/web-0",
            "--to",
            "shop/db-0",
            "--port",
            "80",
        ],
        "",
    )?;
    assert!(out.contains("dropped"), "{out}");
    let bad = ctl(
        &mut lab,
        &["explain", "--from", "shop/nope", "--to", "shop/db-0"],
        "",
    )?;
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("no pod shop/nope"));
    Ok(())
}
