//! The guest's network card (virtio-net over PCI) and its host side.
//!
//! Received frames are nondeterministic input: a host thread reads the tap
//! and queues them ([`tap::TapReader`]); the recorder hands one to the
//! guest only at an exit where the card has a buffer for it, as a `NetRx`
//! record applied by `apply.rs`. Transmitted frames are output: the card
//! gives them to a [`FrameSink`] during the exit that sent them, and they
//! are logged as `NetTx` (length, digest) so that replay can compare.
//! Where a frame goes is the sink's business: the tap at once (run,
//! record), nowhere but a count (replay), or the FT gate, which holds it
//! until the backup has the log through its exit (`ft/gate.rs`).

pub mod device;
pub mod tap;
pub mod transport;
#[cfg(test)]
mod failover_tests;
#[cfg(test)]
mod record_tests;
#[cfg(test)]
mod tests;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// The longest frame the card passes either way: a 1500-byte MTU plus the
/// Ethernet header, and a VLAN tag.
pub const MAX_FRAME: usize = 1518;
/// The card's BAR 0, above guest RAM (at most 3 GiB) and below 4 GiB.
pub const NET_BAR_ADDR: u32 = 0xe000_0000;
/// The ISA interrupt INTA# of the card is wired to (free on the PC: 0
/// timer, 1 keyboard, 2 cascade, 4 COM1, 8 RTC, 12 mouse).
pub const NET_IRQ: u8 = 11;
/// The card's PCI slot on bus 0.
pub const NET_SLOT: usize = 1;

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("malformed MAC address '{0}': expected six hex bytes like 52:54:00:12:34:56")]
    BadMac(String),
    #[error("MAC address {0} is a multicast address (the low bit of its first byte is set)")]
    MulticastMac(String),
    #[error("MAC address {0} is all zeros, which is no card's address (choose another, e.g. 52:54:00:12:34:56)")]
    ZeroMac(String),
    #[error("malformed --net '{0}': expected tap=NAME")]
    BadSpec(String),
    #[error("tap name '{0}' is empty or longer than 15 bytes")]
    BadTapName(String),
    #[error("tap name {name:?} contains {what}, which Linux does not allow in an interface name")]
    TapNameChar { name: String, what: &'static str },
    #[error("tap name '{0}' is not allowed as an interface name ('.' and '..' are directory names)")]
    TapNameDots(String),
    #[error("cannot open /dev/net/tun: {0}{hint}", hint = tun_hint(.0))]
    NoTun(std::io::Error),
    #[error("cannot attach to tap '{name}': {err}{hint}", hint = tap_hint(.err))]
    Tap { name: String, err: std::io::Error },
}

fn tun_hint(e: &std::io::Error) -> &'static str {
    match e.raw_os_error() {
        Some(libc::ENOENT) | Some(libc::ENODEV) => " (load the tun module: modprobe tun)",
        Some(libc::EACCES) | Some(libc::EPERM) => " (permission denied: run as root or give ftvm CAP_NET_ADMIN)",
        _ => "",
    }
}

fn tap_hint(e: &std::io::Error) -> &'static str {
    match e.raw_os_error() {
        Some(libc::EBUSY) => " (another process has it open)",
        Some(libc::EPERM) | Some(libc::EACCES) => {
            " (create it for this user first: ip tuntap add NAME mode tap user $USER, or run as root)"
        }
        Some(libc::EINVAL) => " (an interface of that name exists and is not a tap)",
        _ => "",
    }
}

/// `--net tap=NAME`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetSpec {
    pub tap: String,
}

impl std::str::FromStr for NetSpec {
    type Err = NetError;
    fn from_str(s: &str) -> Result<Self, NetError> {
        let name = s.strip_prefix("tap=").ok_or_else(|| NetError::BadSpec(s.into()))?;
        check_tap_name(name)?;
        Ok(NetSpec { tap: name.into() })
    }
}

/// What Linux's `dev_valid_name` accepts (1 to 15 bytes; no '/', ':' or
/// whitespace; not "." or ".."), each failure said precisely, so that
/// `--net` is refused before anything is opened.
pub fn check_tap_name(name: &str) -> Result<(), NetError> {
    if name.is_empty() || name.len() > 15 {
        return Err(NetError::BadTapName(name.into()));
    }
    if name == "." || name == ".." {
        return Err(NetError::TapNameDots(name.into()));
    }
    let what = name.chars().find_map(|c| match c {
        '/' => Some("a '/'"),
        ':' => Some("a ':'"),
        '\0' => Some("a NUL byte"),
        c if c.is_whitespace() => Some("whitespace"),
        _ => None,
    });
    match what {
        Some(what) => Err(NetError::TapNameChar { name: name.into(), what }),
        None => Ok(()),
    }
}

/// `52:54:00:12:34:56` (or with '-'): a unicast MAC, not all zeros (no
/// card has that address; Linux's virtio_net would take it as is and the
/// bridge would learn a MAC every misconfigured host shares).
pub fn parse_mac(s: &str) -> Result<[u8; 6], NetError> {
    let parts: Vec<&str> = s.split([':', '-']).collect();
    let mut mac = [0u8; 6];
    if parts.len() != 6 {
        return Err(NetError::BadMac(s.into()));
    }
    for (m, p) in mac.iter_mut().zip(&parts) {
        if p.len() != 2 {
            return Err(NetError::BadMac(s.into()));
        }
        *m = u8::from_str_radix(p, 16).map_err(|_| NetError::BadMac(s.into()))?;
    }
    if mac[0] & 1 != 0 {
        return Err(NetError::MulticastMac(s.into()));
    }
    if mac == [0; 6] {
        return Err(NetError::ZeroMac(s.into()));
    }
    Ok(mac)
}

pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

/// The MAC a card gets without `--mac`: QEMU's prefix.
pub const DEFAULT_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];

/// FNV-1a (64-bit, bytewise) of a frame: the `NetTx` digest (FORMAT.md).
pub fn frame_digest(frame: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in frame {
        h = (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Where the frames the guest transmits go.
pub trait FrameSink: Send {
    fn transmit(&mut self, frame: &[u8]);
}

/// Replay (and a card with no backend): frames are counted, not sent.
#[derive(Default, Clone)]
pub struct CountingSink(pub Arc<AtomicU64>);

impl FrameSink for CountingSink {
    fn transmit(&mut self, _: &[u8]) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

/// A gratuitous ARP announcing `mac` (no IP known: sender and target
/// address 0.0.0.0 would be ignored by many stacks, so the frame is a
/// broadcast ARP request from `mac` with the guest's address if known).
/// Sent by a backup that goes live so the bridge learns where the MAC is.
pub fn gratuitous_arp(mac: [u8; 6], ip: [u8; 4]) -> Vec<u8> {
    let mut f = Vec::with_capacity(60);
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&[0x08, 0x06]); // ARP
    f.extend_from_slice(&[0x00, 0x01, 0x08, 0x00, 6, 4, 0x00, 0x01]); // Ethernet/IPv4, request
    f.extend_from_slice(&mac);
    f.extend_from_slice(&ip);
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&ip);
    f.resize(60, 0);
    f
}
