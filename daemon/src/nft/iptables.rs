//! iptables' and ip6tables' FORWARD chains, changed with their commands (legacy or nf_tables
//! flavour) so they keep understanding their own tables. Used only for the accept rules twill
//! needs ahead of a FORWARD policy of DROP (Docker sets one).

use std::path::PathBuf;
use std::process::Stdio;

use ipnet::IpNet;

use super::model::Family;
use super::NftError;

pub struct Iptables {
    bin: PathBuf,
    family: Family,
    nft: bool,
}

impl Iptables {
    /// The command for `family` (iptables for `Ip`, ip6tables for `Ip6`), if installed.
    pub fn find(family: Family) -> Option<Iptables> {
        let name = match family {
            Family::Ip => "iptables",
            Family::Ip6 => "ip6tables",
            Family::Inet | Family::Bridge => return None,
        };
        let path = std::env::var_os("PATH").unwrap_or_default();
        let bin = std::env::split_paths(&path)
            .chain(["/usr/sbin".into(), "/sbin".into()])
            .map(|d| d.join(name))
            .find(|p| p.is_file())?;
        let version = std::process::Command::new(&bin)
            .arg("-V")
            .stderr(Stdio::null())
            .output()
            .ok()?;
        let nft = String::from_utf8_lossy(&version.stdout).contains("nf_tables");
        Some(Iptables { bin, family, nft })
    }

    /// The nftables family whose packets this command's FORWARD chain sees.
    pub fn family(&self) -> Family {
        self.family
    }

    /// `iptables` or `ip6tables`.
    pub fn command(&self) -> &'static str {
        match self.family {
            Family::Ip6 => "ip6tables",
            _ => "iptables",
        }
    }

    /// The nf_tables flavour: its FORWARD chain is nftables' `ip|ip6 filter FORWARD`.
    pub fn is_nft(&self) -> bool {
        self.nft
    }

    async fn run(&self, args: &[&str]) -> Result<String, NftError> {
        let mut cmd = tokio::process::Command::new(&self.bin);
        cmd.args(["-w", "5"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let out = super::spawn_ours(&mut cmd)
            .map_err(NftError::Spawn)?
            .wait_with_output()
            .await
            .map_err(NftError::Spawn)?;
        if !out.status.success() {
            return Err(NftError::Refused {
                what: format!("{} {}", self.command(), args.join(" ")),
                message: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// With a DROP policy, `-s/-d <net> ACCEPT` for each of `nets` at FORWARD's top; our rules
    /// for other networks (or all, without a DROP policy or with `nets` empty) are deleted.
    /// Returns (FORWARD's policy is DROP, a rule was added).
    pub async fn ensure_forward_accept(
        &self,
        nets: &[IpNet],
        comment: &str,
    ) -> Result<(bool, bool), NftError> {
        let listing = self.run(&["-S", "FORWARD"]).await?;
        let drops = listing.lines().any(|l| l.trim() == "-P FORWARD DROP");
        let rule = |flag: &str, net: &IpNet| -> Vec<String> {
            [
                flag,
                &net.to_string(),
                "-m",
                "comment",
                "--comment",
                comment,
                "-j",
                "ACCEPT",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect()
        };
        let want: Vec<Vec<String>> = if drops {
            nets.iter()
                .flat_map(|n| [rule("-s", n), rule("-d", n)])
                .collect()
        } else {
            Vec::new()
        };
        // Ours as `iptables -S` prints them: `-A FORWARD -s 10.244.0.0/16 -m comment ...`.
        let have: Vec<Vec<String>> = listing
            .lines()
            .filter(|l| l.contains(&format!("--comment {comment} ")))
            .filter_map(|l| l.strip_prefix("-A FORWARD "))
            .map(|l| l.split_whitespace().map(str::to_string).collect())
            .collect();
        for r in have.iter().filter(|r| !want.contains(r)) {
            let mut args = vec!["-D", "FORWARD"];
            args.extend(r.iter().map(String::as_str));
            self.run(&args).await?;
        }
        let mut added = false;
        for r in want.iter().rev().filter(|r| !have.contains(r)) {
            let mut args = vec!["-I", "FORWARD", "1"];
            args.extend(r.iter().map(String::as_str));
            self.run(&args).await?;
            added = true;
        }
        Ok((drops, added))
    }
}
