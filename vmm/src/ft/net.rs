//! The network card under fault tolerance: its frames go through the
//! gate (`gate.rs`, the output rule), released frames go to the tap; a
//! backup's card never transmits, its tap's frames are not its inputs
//! (those come from the log); when it goes live it forgets what its tap
//! queued meanwhile (the sender retransmits), takes frames from its tap
//! from then on, and announces the guest's MAC with a gratuitous ARP so
//! that the bridge sends the guest's traffic to its tap.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use super::gate::{Gate, GateFrames};
use crate::machine::Machine;
use crate::net::tap::{NetInput, Tap};
use crate::net::gratuitous_arp;

/// A role's network: the tap, opened once, and its reader, whose queue a
/// backup hands over to its live recorder when it takes over.
pub struct FtNet {
    pub tap: Tap,
    pub input: NetInput,
}

impl FtNet {
    pub fn open(name: &str) -> Result<FtNet, crate::net::NetError> {
        let tap = Tap::open(name)?;
        let input = tap.spawn_reader();
        Ok(FtNet { tap, input })
    }

    /// Puts the machine's card under `gate`: its frames are tagged with
    /// `ordinal` and held there, released ones go to the tap.
    pub fn protect(&self, m: &Machine, gate: &Arc<Gate>, ordinal: Arc<AtomicU64>) {
        if let Some(card) = &m.net {
            card.lock().unwrap().set_sink(Box::new(GateFrames { gate: gate.clone(), ordinal }));
            gate.set_frame_out(Box::new(self.tap.writer()));
        }
    }
}

/// The IPv4 address of `ftvm.ip=A.B.C.D/N` on a guest command line.
pub fn guest_ip(cmdline: &str) -> Option<[u8; 4]> {
    let v = cmdline.split_whitespace().find_map(|w| w.strip_prefix("ftvm.ip="))?;
    let addr = v.split('/').next()?;
    let parts: Vec<u8> = addr.split('.').map(|p| p.parse().ok()).collect::<Option<_>>()?;
    parts.try_into().ok()
}

/// A backup going live at exit `ordinal`: forget what the tap queued
/// while it was a backup, and send a gratuitous ARP for the guest (through
/// the gate, so only under a live lease).
pub fn go_live(input: &mut NetInput, m: &Machine, gate: &Gate, ordinal: u64, cmdline: &str) {
    let n = input.discard();
    if let Some(card) = &m.net {
        let mac = card.lock().unwrap().mac();
        let arp = gratuitous_arp(mac, guest_ip(cmdline).unwrap_or([0; 4]));
        gate.send_frame(ordinal, &arp);
        log::info!("network: live; forgot {n} frames queued while a backup, announced {}", crate::net::format_mac(&mac));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_guest_address_comes_from_its_command_line() {
        assert_eq!(guest_ip("quiet ftvm.ip=169.254.0.2/16 x=1"), Some([169, 254, 0, 2]));
        assert_eq!(guest_ip("ftvm.ip=10.0.0.1"), Some([10, 0, 0, 1]));
        assert_eq!(guest_ip("ftvm.ip=10.0.0/8"), None);
        assert_eq!(guest_ip("ftvm.ip=300.0.0.1/8"), None);
        assert_eq!(guest_ip("quiet"), None);
    }
}
