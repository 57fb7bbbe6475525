//! Everything in deploy/ that can be checked on this machine: the conflist is accepted by the
//! plugin and works against a daemon, the systemd units verify, the env file names real flags,
//! the etcd sample config starts a real etcd, the TLS recipe works end to end with twilld, and
//! the Vagrant provisioning script parses. (VMs cannot run here, so the Vagrantfile itself is
//! only syntax-checked, and only where ruby is installed.)

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::Value;
use twill_tests::{netns, wait_until, Lab, LabOptions};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// The env var names twilld's --help documents (`[env: TWILLD_X=...]`).
fn twilld_env_names(lab: &mut Lab) -> Result<BTreeSet<String>> {
    let twilld = lab.bin("twilld")?;
    let out = Command::new(&twilld).arg("--help").output()?;
    let help = String::from_utf8_lossy(&out.stdout);
    let names: BTreeSet<String> = help
        .split("[env: ")
        .skip(1)
        .filter_map(|s| s.split(['=', ']']).next().map(str::to_string))
        .collect();
    if names.len() < 10 {
        bail!("twilld --help lists only {names:?}");
    }
    Ok(names)
}

#[test]
fn env_file_and_readme_cover_exactly_the_real_flags() -> Result<()> {
    let mut lab = Lab::new(LabOptions {
        nodes: 1,
        etcd: false,
        ..Default::default()
    })?;
    let known = twilld_env_names(&mut lab)?;
    let env_file = read("deploy/systemd/twilld.env");
    let in_file: BTreeSet<String> = env_file
        .lines()
        .map(|l| l.trim_start_matches('#'))
        .filter_map(|l| l.split_once('=').map(|(k, _)| k.trim().to_string()))
        .filter(|k| k.starts_with("TWILLD_"))
        .collect();
    let unknown: Vec<_> = in_file.difference(&known).collect();
    assert!(
        unknown.is_empty(),
        "twilld.env names variables twilld does not know: {unknown:?}"
    );
    let missing: Vec<_> = known.difference(&in_file).collect();
    assert!(
        missing.is_empty(),
        "twilld.env does not document: {missing:?}"
    );
    // The README's flag table lists every flag.
    let readme = read("README.md");
    for env in &known {
        let flag = format!(
            "--{}",
            env.trim_start_matches("TWILLD_")
                .to_lowercase()
                .replace('_', "-")
        );
        assert!(
            readme.contains(&format!("`{flag}`")),
            "README does not document {flag}"
        );
    }
    Ok(())
}

#[test]
fn systemd_units_verify() -> Result<()> {
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("systemd-analyze is not installed: unit verification skipped");
        return Ok(());
    }
    let mut lab = Lab::new(LabOptions {
        nodes: 1,
        etcd: false,
        ..Default::default()
    })?;
    let twilld = lab.bin("twilld")?;
    // Point ExecStart at the binary we built: verify checks that it exists and is executable.
    let dir = lab.dir().join("units");
    std::fs::create_dir_all(&dir)?;
    let unit = read("deploy/systemd/twilld.service")
        .replace("/usr/local/bin/twilld", &twilld.display().to_string());
    std::fs::write(dir.join("twilld.service"), unit)?;
    std::fs::write(
        dir.join("twill-etcd.service"),
        read("deploy/etcd/etcd.service"),
    )?;
    for u in ["twilld.service", "twill-etcd.service"] {
        let out = Command::new("systemd-analyze")
            .arg("verify")
            .arg(dir.join(u))
            .output()?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        // Only complaints about our file count (the host's own units may be noisy).
        let ours: Vec<&str> = stderr.lines().filter(|l| l.contains(u)).collect();
        assert!(
            out.status.success() && ours.is_empty(),
            "systemd-analyze verify {u}: {stderr}"
        );
    }
    // The check can fail: a unit whose binary does not exist is refused.
    let bad = read("deploy/systemd/twilld.service")
        .replace("/usr/local/bin/twilld", "/nonexistent/twilld");
    std::fs::write(dir.join("bad.service"), bad)?;
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(dir.join("bad.service"))
        .output()?;
    assert!(
        !out.status.success(),
        "verify accepted a unit with a missing binary"
    );
    Ok(())
}

#[test]
fn vagrant_provisioning_parses() -> Result<()> {
    let out = Command::new("bash")
        .arg("-n")
        .arg(root().join("deploy/vagrant/provision.sh"))
        .output()?;
    assert!(
        out.status.success(),
        "provision.sh: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new("bash")
        .arg("-n")
        .arg(root().join("deploy/tls/make-certs.sh"))
        .output()?;
    assert!(
        out.status.success(),
        "make-certs.sh: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    match Command::new("ruby")
        .arg("-c")
        .arg(root().join("deploy/vagrant/Vagrantfile"))
        .output()
    {
        Ok(out) => assert!(
            out.status.success(),
            "Vagrantfile: {}",
            String::from_utf8_lossy(&out.stderr)
        ),
        Err(_) => eprintln!(
            "ruby is not installed: Vagrantfile syntax check skipped (VMs cannot run here)"
        ),
    }
    Ok(())
}

/// Whether an ELF executable names a dynamic loader (a PT_INTERP program header).
fn has_interpreter(elf: &[u8]) -> bool {
    assert_eq!(&elf[..5], b"\x7fELF\x02", "not a 64-bit ELF file");
    let u16_at = |o: usize| u16::from_le_bytes([elf[o], elf[o + 1]]) as usize;
    let phoff = u64::from_le_bytes(elf[0x20..0x28].try_into().unwrap()) as usize;
    let (phentsize, phnum) = (u16_at(0x36), u16_at(0x38));
    (0..phnum).any(|i| {
        let o = phoff + i * phentsize;
        u32::from_le_bytes(elf[o..o + 4].try_into().unwrap()) == 3 // PT_INTERP
    })
}

#[test]
fn shipped_plugin_is_static_and_works() -> Result<()> {
    // scripts/build is what the lab, the bench and deploy/README use; the dev profile and a
    // target dir of its own keep this quick and away from the suite's binaries.
    let target = root().join("target/static-plugin");
    let out = Command::new(root().join("scripts/build"))
        .args(["--profile", "dev", "--plugin-only"])
        .env("CARGO_TARGET_DIR", &target)
        .output()?;
    assert!(
        out.status.success(),
        "scripts/build: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let twill = target.join("debug/twill");
    assert!(
        !has_interpreter(&std::fs::read(&twill)?),
        "{} is dynamically linked",
        twill.display()
    );
    // The dynamic test build is the control: the check can tell the two apart.
    assert!(has_interpreter(&std::fs::read(env!(
        "CARGO_BIN_EXE_twill-lab"
    ))?));

    // It runs: VERSION is answered by the plugin itself, and an ADD reaches for the socket.
    let run = |cmd: &str, conf: &str| -> Result<(bool, Value)> {
        let mut child = Command::new(&twill)
            .env_clear()
            .env("CNI_COMMAND", cmd)
            .env("CNI_CONTAINERID", "static1")
            .env("CNI_NETNS", "/proc/self/ns/net")
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", "/opt/cni/bin")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()?;
        use std::io::Write;
        child.stdin.take().unwrap().write_all(conf.as_bytes())?;
        let out = child.wait_with_output()?;
        Ok((out.status.success(), serde_json::from_slice(&out.stdout)?))
    };
    let (ok, v) = run("VERSION", r#"{"cniVersion":"1.1.0"}"#)?;
    assert!(
        ok && v["supportedVersions"]
            .as_array()
            .is_some_and(|a| a.len() == 3),
        "{v}"
    );
    let gone = target.join("no-such.sock");
    let conf = serde_json::json!({"cniVersion": "1.0.0", "name": "n", "type": "twill",
                                  "socket": gone, "timeout": 1});
    let (ok, v) = run("ADD", &conf.to_string())?;
    assert!(!ok && v["code"] == 11, "{v}");
    assert!(
        v["msg"].as_str().unwrap().contains("cannot reach twilld"),
        "{v}"
    );
    Ok(())
}

/// The conflist's twill entry, as a runtime hands it to the plugin.
fn conflist_entry() -> Value {
    let conflist: Value =
        serde_json::from_str(&read("deploy/cni/10-twill.conflist")).expect("conflist is JSON");
    let mut entry = conflist["plugins"][0].clone();
    assert_eq!(entry["type"], "twill");
    entry["cniVersion"] = conflist["cniVersion"].clone();
    entry["name"] = conflist["name"].clone();
    entry
}

#[test]
fn conflist_is_accepted_by_the_plugin_and_works() -> Result<()> {
    let mut lab = Lab::new(LabOptions {
        nodes: 1,
        ..Default::default()
    })?;
    let entry = conflist_entry();
    let version = entry["cniVersion"].as_str().unwrap_or_default().to_string();
    // VERSION: the conflist's version is supported (podman drops networks where it is not).
    let out = lab.cni(1, "VERSION", "", "", "", &entry)?;
    assert!(out.success, "VERSION: {}", out.stdout);
    let supported = out.json()?["supportedVersions"].clone();
    assert!(
        supported
            .as_array()
            .is_some_and(|a| a.iter().any(|v| v == version.as_str())),
        "conflist cniVersion {version} not in {supported}"
    );
    // The `socket` key is what the plugin dials: with the daemon absent, ADD names it.
    let out = lab.cni(1, "ADD", "deploytest", "/run/netns/none", "eth0", &entry)?;
    assert!(!out.success);
    let err = out.json()?;
    assert_eq!(err["code"], 11, "{err}");
    let socket = entry["socket"].as_str().unwrap_or_default();
    assert!(
        err.to_string().contains(socket),
        "error does not name {socket}: {err}"
    );
    // Against a running daemon (socket pointed at the lab node's), ADD and DEL work.
    lab.put_config(&read("deploy/etcd/network-config.json"))?;
    lab.start_daemon(1)?;
    lab.wait_ready(1, Duration::from_secs(30))?;
    let mut entry = entry;
    entry["socket"] = lab.cni_socket(1).display().to_string().into();
    let ns = lab.pod_ns(1, "dep");
    netns::add(&ns)?;
    let path = format!("/run/netns/{ns}");
    let out = lab.cni(1, "ADD", "deploytest", &path, "eth0", &entry)?;
    assert!(out.success, "ADD: {} {}", out.stdout, out.stderr);
    let result = out.json()?;
    assert_eq!(result["cniVersion"], version.as_str());
    let out = lab.cni(1, "DEL", "deploytest", &path, "eth0", &entry)?;
    assert!(out.success, "DEL: {} {}", out.stdout, out.stderr);
    Ok(())
}

/// Kills a process started outside the harness's bookkeeping (the lab kills it too, on drop).
struct Kill(Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn etcd_ctl(lab: &Lab, args: &[&str]) -> Result<String> {
    let mut full = vec!["env", "ETCDCTL_API=3", "etcdctl", "--dial-timeout", "3s"];
    full.extend_from_slice(args);
    let out = netns::exec_cmd(&lab.underlay_ns(), &full).output()?;
    netns::check(&full, out)
}

#[test]
fn etcd_sample_and_tls_recipe_work_with_twilld() -> Result<()> {
    let mut lab = Lab::new(LabOptions {
        nodes: 1,
        etcd: false,
        ..Default::default()
    })?;
    let pki = lab.dir().join("pki");
    // The recipe, exactly as deploy/tls/README.md runs it, for the underlay address.
    let out = Command::new(root().join("deploy/tls/make-certs.sh"))
        .arg(&pki)
        .arg("198.18.0.1")
        .output()?;
    assert!(
        out.status.success(),
        "make-certs.sh: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The sample is secure as shipped: TLS on the management address only, client
    // certificates required, and twilld set up to present one.
    let sample = read("deploy/etcd/etcd.env");
    let setting = |k: &str| {
        sample
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{k}=")))
            .unwrap_or_default()
            .to_string()
    };
    assert_eq!(setting("ETCD_LISTEN_CLIENT_URLS"), "https://10.0.0.11:2379");
    assert_eq!(setting("ETCD_CLIENT_CERT_AUTH"), "true");
    let env = read("deploy/systemd/twilld.env");
    for want in [
        "TWILLD_ETCD_ENDPOINTS=https://",
        "\nTWILLD_ETCD_CAFILE=",
        "\nTWILLD_ETCD_CERTFILE=",
        "\nTWILLD_ETCD_KEYFILE=",
    ] {
        assert!(env.contains(want), "twilld.env lacks {want:?}");
    }

    // etcd from deploy/etcd/etcd.env as shipped, in the underlay: only the address, the port,
    // the data dir and the certificate dir are this lab's.
    let port = 23000 + (std::process::id() % 1000) as u16 * 2;
    let url = format!("https://198.18.0.1:{port}");
    let data = lab.dir().join("etcd-data");
    let mut cmd = netns::exec_cmd(&lab.underlay_ns(), &["etcd"]);
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default());
    for line in sample.lines() {
        let Some((k, v)) = line.split_once('=') else {
            continue;
        };
        if k.starts_with('#') {
            continue;
        }
        let v = v
            .replace("https://10.0.0.11:2379", &url)
            .replace("127.0.0.1:2380", &format!("127.0.0.1:{}", port + 1))
            .replace("/var/lib/etcd/twill", &data.display().to_string())
            .replace("/etc/twill/pki", &pki.display().to_string());
        cmd.env(k, v);
    }
    let p = |f: &str| pki.join(f).display().to_string();
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(lab.dir().join("etcd-tls.log"))?);
    let _etcd = Kill(cmd.spawn().context("start etcd")?);
    let underlay = lab.underlay_ns();
    let ctl_as = |user: &str, args: &[&str]| -> Result<String> {
        let (cert, key) = (p(&format!("{user}.pem")), p(&format!("{user}-key.pem")));
        let mut full = vec![
            "env",
            "ETCDCTL_API=3",
            "etcdctl",
            "--dial-timeout",
            "3s",
            "--endpoints",
            &url,
            "--cacert",
        ];
        let ca = p("ca.pem");
        full.extend([ca.as_str(), "--cert", &cert, "--key", &key]);
        full.extend_from_slice(args);
        netns::check(&full, netns::exec_cmd(&underlay, &full).output()?)
    };
    wait_until(Duration::from_secs(20), || {
        ctl_as("root", &["endpoint", "health"]).is_ok()
    })
    .with_context(|| std::fs::read_to_string(lab.dir().join("etcd-tls.log")).unwrap_or_default())?;
    // Without a client certificate etcd refuses: client-cert auth is really on.
    assert!(etcd_ctl(
        &lab,
        &["--endpoints", &url, "--cacert", &p("ca.pem"), "get", "x"]
    )
    .is_err());

    // Who may write what (deploy/etcd/roles.sh, as deploy/README.md runs it).
    let out = netns::exec_cmd(
        &lab.underlay_ns(),
        &[
            root().join("deploy/etcd/roles.sh").to_str().unwrap(),
            &url,
            pki.to_str().unwrap(),
        ],
    )
    .output()?;
    assert!(
        out.status.success(),
        "roles.sh: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let config = read("deploy/etcd/network-config.json");
    ctl_as("twilld", &["put", "/coreos.com/network/config", &config])?;
    ctl_as(
        "twill-admin",
        &["put", "/coreos.com/network/policies/x/p", "{}"],
    )?;
    assert!(
        ctl_as(
            "twill-admin",
            &["put", "/coreos.com/network/subnets/10.244.9.0-24", "{}"]
        )
        .is_err(),
        "the policy admin may write leases"
    );
    assert!(
        ctl_as("twill-admin", &["put", "/elsewhere", "x"]).is_err(),
        "the policy admin may write outside the prefix"
    );
    ctl_as("twill-admin", &["del", "/coreos.com/network/policies/x/p"])?;

    // twilld with the env file's settings (its node certificate), under auth.
    let (ca, cert, key) = (p("ca.pem"), p("twilld.pem"), p("twilld-key.pem"));
    lab.start_daemon_with_env(
        1,
        &["--etcd-endpoints", &url],
        &[
            ("TWILLD_ETCD_CAFILE", &ca),
            ("TWILLD_ETCD_CERTFILE", &cert),
            ("TWILLD_ETCD_KEYFILE", &key),
        ],
    )?;
    lab.wait_ready(1, Duration::from_secs(30))?;
    let status = lab.status(1)?;
    assert_eq!(status["network"], "10.244.0.0/16", "{status}");
    let keys = ctl_as(
        "twilld",
        &[
            "get",
            "--prefix",
            "--keys-only",
            "/coreos.com/network/subnets/",
        ],
    )?;
    let subnet = status["node"]["subnet"]
        .as_str()
        .unwrap_or_default()
        .replace('/', "-");
    assert!(keys.contains(&subnet), "lease {subnet} not in etcd: {keys}");
    Ok(())
}
