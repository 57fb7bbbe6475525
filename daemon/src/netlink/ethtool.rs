//! Transmit checksum offload, through the ethtool ioctl: rtnetlink has no call for device
//! features, and this is the one feature twilld sets.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use super::NetlinkError;

/// From linux/ethtool.h.
const ETHTOOL_GTXCSUM: u32 = 0x16;
const ETHTOOL_STXCSUM: u32 = 0x17;

/// `struct ethtool_value`.
#[repr(C)]
struct EthtoolValue {
    cmd: u32,
    data: u32,
}

fn ethtool(dev: &str, cmd: u32, data: u32) -> io::Result<u32> {
    if dev.is_empty() || dev.len() >= libc::IFNAMSIZ {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not an interface name",
        ));
    }
    // SAFETY: socket(2) with constant arguments; the fd is owned right away.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh, valid descriptor nobody else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut value = EthtoolValue { cmd, data };
    // SAFETY: ifreq is plain data; all zeroes is a valid (empty) request.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in ifr.ifr_name.iter_mut().zip(dev.bytes()) {
        *d = s as libc::c_char;
    }
    ifr.ifr_ifru.ifru_data = (&mut value as *mut EthtoolValue).cast();
    // SAFETY: SIOCETHTOOL reads ifr and the ethtool_value it points to, both alive for the call.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCETHTOOL, &mut ifr) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(value.data)
}

fn err(context: String, e: io::Error) -> NetlinkError {
    match e.raw_os_error() {
        Some(errno) => NetlinkError::Errno { context, errno },
        None => NetlinkError::failed(context, e),
    }
}

/// Whether transmit checksum offload is on for `dev`.
pub fn tx_checksum(dev: &str) -> Result<bool, NetlinkError> {
    ethtool(dev, ETHTOOL_GTXCSUM, 0)
        .map(|v| v != 0)
        .map_err(|e| err(format!("reading tx checksum offload of {dev}"), e))
}

/// Turns transmit checksum offload of `dev` on or off (the kernel turns off what depends on it,
/// e.g. TSO). Returns whether anything changed.
pub fn set_tx_checksum(dev: &str, on: bool) -> Result<bool, NetlinkError> {
    if tx_checksum(dev)? == on {
        return Ok(false);
    }
    ethtool(dev, ETHTOOL_STXCSUM, u32::from(on)).map_err(|e| {
        err(
            format!("turning tx checksum offload of {dev} {}", onoff(on)),
            e,
        )
    })?;
    Ok(true)
}

fn onoff(on: bool) -> &'static str {
    if on {
        "on"
    } else {
        "off"
    }
}
