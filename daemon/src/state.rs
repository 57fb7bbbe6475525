//! State kept under --state-dir across restarts and reboots.

use std::io;
use std::path::Path;

use crate::mac::MacAddr;

const VTEP_MAC_FILE: &str = "vtep-mac";
/// The IPv6 VXLAN device's MAC (a device of its own, as flannel's `flannel-v6.<VNI>`).
const VTEP_MAC6_FILE: &str = "vtep-mac6";

/// The VTEP MAC: read from the state dir, or generated and persisted (atomically) on first start.
/// A MAC that survives reboots keeps peers from holding stale entries (flannel #533, #1788).
pub fn load_or_create_vtep_mac(dir: &Path) -> io::Result<MacAddr> {
    load_or_adopt_vtep_mac(dir, None)
}

/// Whether the state dir holds a VTEP MAC already.
pub fn has_vtep_mac(dir: &Path) -> bool {
    dir.join(VTEP_MAC_FILE).exists()
}

/// `load_or_create_vtep_mac`, taking `stored` (the MAC the node published before, e.g. by
/// flanneld) instead of a random one when the state dir has none.
pub fn load_or_adopt_vtep_mac(dir: &Path, stored: Option<MacAddr>) -> io::Result<MacAddr> {
    load_or_adopt(dir, VTEP_MAC_FILE, stored)
}

/// The IPv6 device's VTEP MAC, kept like the IPv4 one (`stored`: the one published before).
pub fn load_or_adopt_vtep_mac6(dir: &Path, stored: Option<MacAddr>) -> io::Result<MacAddr> {
    load_or_adopt(dir, VTEP_MAC6_FILE, stored)
}

/// Whether the state dir holds an IPv6 VTEP MAC already.
pub fn has_vtep_mac6(dir: &Path) -> bool {
    dir.join(VTEP_MAC6_FILE).exists()
}

fn load_or_adopt(dir: &Path, file: &str, stored: Option<MacAddr>) -> io::Result<MacAddr> {
    let path = dir.join(file);
    match std::fs::read_to_string(&path) {
        Ok(s) => s.trim().parse().map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: {e}", path.display()),
            )
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let mac = stored.unwrap_or_else(MacAddr::random_local);
            std::fs::create_dir_all(dir)?;
            write_atomic(&path, format!("{mac}\n").as_bytes())?;
            Ok(mac)
        }
        Err(e) => Err(io::Error::new(e.kind(), format!("{}: {e}", path.display()))),
    }
}

/// Write via a temporary file and rename, fsyncing the file, so readers never see a partial file.
pub fn write_atomic(path: &Path, data: &[u8]) -> io::Result<()> {
    write_renamed(path, data, true)
}

/// As `write_atomic`, without fsync: for records of what runs on the node, which a reboot
/// ends anyway (twilld's own death leaves them in the page cache). fsync costs milliseconds on
/// CNI ADD's path.
pub fn write_replace(path: &Path, data: &[u8]) -> io::Result<()> {
    write_renamed(path, data, false)
}

fn write_renamed(path: &Path, data: &[u8], durable: bool) -> io::Result<()> {
    use std::io::Write;
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(
        ".{}.tmp.{}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("file"),
        std::process::id()
    ));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(data)?;
    if durable {
        f.sync_all()?;
    }
    drop(f);
    std::fs::rename(&tmp, path)?;
    if durable {
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_persists() {
        let dir = std::env::temp_dir().join(format!("twill-state-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let a = load_or_create_vtep_mac(&dir).unwrap();
        let b = load_or_create_vtep_mac(&dir).unwrap();
        assert_eq!(a, b);
        std::fs::write(dir.join(VTEP_MAC_FILE), "garbage").unwrap();
        assert!(
            load_or_create_vtep_mac(&dir).is_err(),
            "a corrupt MAC file is an error, not silently replaced"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
