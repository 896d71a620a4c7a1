//! The host side of the card: a Linux tap interface (`/dev/net/tun`,
//! `IFF_TAP | IFF_NO_PI`: whole Ethernet frames, no extra header). One
//! thread reads it and queues frames for the recorder; frames the guest
//! sends are written to it by whoever the output rule lets (`TapWriter`).

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{Receiver, TrySendError};

use super::{FrameSink, NetError, MAX_FRAME};

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
/// Frames the reader queues before it drops (the guest is not taking
/// them: no buffers, or a backup that is not live); also the most frames
/// [`NetInput`] keeps waiting for the guest.
pub const QUEUE_FRAMES: usize = 1024;

#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// `struct ifreq` with a hardware address (`SIOCSIFHWADDR`).
#[repr(C)]
struct IfReqHw {
    name: [u8; 16],
    family: libc::c_ushort,
    addr: [u8; 14],
    _pad: [u8; 8],
}

const SIOCSIFHWADDR: libc::c_ulong = 0x8924;
const ARPHRD_ETHER: libc::c_ushort = 1;

/// The host-side address of a tap ftvm creates: `fe:` first, as libvirt
/// does, so that a bridge never takes it. A Linux bridge without an
/// address of its own takes the lowest of its ports'; when that port
/// goes (a killed primary's tap) or a lower one joins (a new backup's),
/// the bridge's address changes under its neighbours' ARP caches and the
/// guest's frames to the host go nowhere until the guest asks again
/// (measured in the lab: failovers stalled 60-180 s). The rest is from
/// the name, so the same tap gets the same address.
pub fn host_side_mac(name: &str) -> [u8; 6] {
    let h = super::frame_digest(name.as_bytes()).to_le_bytes();
    [0xfe, h[0], h[1], h[2], h[3], h[4]]
}

/// Sets `name`'s hardware address (a tap allows it while up).
fn set_mac(name: &str, mac: [u8; 6]) -> std::io::Result<()> {
    let mut req = IfReqHw { name: [0; 16], family: ARPHRD_ETHER, addr: [0; 14], _pad: [0; 8] };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    req.addr[..6].copy_from_slice(&mac);
    // SAFETY: a plain datagram socket, closed below; no memory is shared.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: SIOCSIFHWADDR reads one `struct ifreq` (40 bytes on x86-64,
    // the layout of `IfReqHw`), which lives across the call.
    let r = unsafe { libc::ioctl(fd, SIOCSIFHWADDR, &mut req as *mut IfReqHw) };
    let err = std::io::Error::last_os_error();
    // SAFETY: `fd` is the socket opened above, closed once.
    unsafe { libc::close(fd) };
    if r < 0 {
        return Err(err);
    }
    Ok(())
}

/// An open tap.
pub struct Tap {
    file: Arc<File>,
    pub name: String,
}

impl Tap {
    /// Attaches to the tap `name`, creating it if it does not exist
    /// (which needs CAP_NET_ADMIN).
    pub fn open(name: &str) -> Result<Tap, NetError> {
        let file = OpenOptions::new().read(true).write(true).open("/dev/net/tun").map_err(NetError::NoTun)?;
        let mut req = IfReq { name: [0; 16], flags: IFF_TAP | IFF_NO_PI, _pad: [0; 22] };
        super::check_tap_name(name)?;
        let existed = std::path::Path::new("/sys/class/net").join(name).exists();
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads and writes one `struct ifreq` (40 bytes
        // on x86-64, the layout of `IfReq`), which lives across the call.
        let r = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req as *mut IfReq) };
        if r < 0 {
            return Err(NetError::Tap { name: name.into(), err: std::io::Error::last_os_error() });
        }
        if !existed {
            // A tap someone else made keeps the address they gave it.
            let mac = host_side_mac(name);
            if let Err(e) = set_mac(name, mac) {
                log::warn!("network: could not give tap {name} the address {}: {e}", super::format_mac(&mac));
            }
        }
        log::info!("network: attached to tap {name}");
        Ok(Tap { file: Arc::new(file), name: name.into() })
    }

    /// Where the guest's frames go when they may leave.
    pub fn writer(&self) -> TapWriter {
        TapWriter { file: self.file.clone(), errors: 0 }
    }

    /// Starts the thread that reads the tap.
    pub fn spawn_reader(&self) -> NetInput {
        let (tx, rx) = crossbeam_channel::bounded(QUEUE_FRAMES);
        let dropped = Arc::new(AtomicU64::new(0));
        let d = dropped.clone();
        let file = self.file.clone();
        let name = self.name.clone();
        std::thread::Builder::new()
            .name("ftvm-tap".into())
            .spawn(move || {
                let mut buf = vec![0u8; 65536];
                loop {
                    match (&*file).read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => match tx.try_send(buf[..n].to_vec()) {
                            Ok(()) => {}
                            Err(TrySendError::Full(_)) => {
                                d.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(TrySendError::Disconnected(_)) => break,
                        },
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                        Err(e) => {
                            log::warn!("network: reading tap {name}: {e}");
                            std::thread::sleep(Duration::from_millis(100));
                        }
                    }
                }
            })
            .expect("spawning the tap reader");
        NetInput { rx: Some(rx), pending: VecDeque::new(), dropped, oversize: 0 }
    }
}

/// Writes frames to the tap. A failed write is a lost frame, as on a wire.
pub struct TapWriter {
    file: Arc<File>,
    errors: u64,
}

impl FrameSink for TapWriter {
    fn transmit(&mut self, frame: &[u8]) {
        if let Err(e) = (&*self.file).write(frame) {
            self.errors += 1;
            if self.errors.is_power_of_two() {
                log::warn!("network: writing to the tap failed ({} times): {e}", self.errors);
            }
        }
    }
}

/// Received frames waiting for the guest: what the reader thread queued,
/// moved here by the recorder. A clone reads the same queue (a backup
/// hands it to each membership's live recorder).
#[derive(Clone)]
pub struct NetInput {
    rx: Option<Receiver<Vec<u8>>>,
    pending: VecDeque<Vec<u8>>,
    /// Dropped because the queue was full: by the reader (its channel
    /// was full) and by [`NetInput::poll`] (the oldest waiting frames, once
    /// [`QUEUE_FRAMES`] wait for a guest that posts no buffers).
    pub dropped: Arc<AtomicU64>,
    /// Dropped here: longer than any frame the card passes.
    pub oversize: u64,
}

impl NetInput {
    /// Frames from a channel (tests, or a reader of another kind).
    pub fn from_channel(rx: Receiver<Vec<u8>>) -> Self {
        NetInput { rx: Some(rx), pending: VecDeque::new(), dropped: Arc::default(), oversize: 0 }
    }

    pub fn receiver(&self) -> Option<&Receiver<Vec<u8>>> {
        self.rx.as_ref()
    }

    /// Moves what arrived into the pending queue (oversize frames are
    /// dropped and counted here, never logged). The pending queue holds at
    /// most [`QUEUE_FRAMES`]: a guest with no receive buffers posted
    /// (booting, resetting its driver, or hostile) must not make traffic
    /// grow ftvm's memory. Past that the oldest frames are dropped and
    /// counted in `dropped`, as a full NIC would; the channel is still
    /// emptied, so the idle wait (which wakes on it) does not spin.
    pub fn poll(&mut self) {
        while let Some(rx) = &self.rx {
            match rx.try_recv() {
                Ok(f) if f.len() > MAX_FRAME => self.oversize += 1,
                Ok(f) => {
                    if self.pending.len() >= QUEUE_FRAMES {
                        self.pending.pop_front();
                        self.dropped.fetch_add(1, Ordering::Relaxed);
                    }
                    self.pending.push_back(f);
                }
                Err(crossbeam_channel::TryRecvError::Empty) => break,
                Err(crossbeam_channel::TryRecvError::Disconnected) => self.rx = None,
            }
        }
    }

    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    pub fn take(&mut self) -> Option<Vec<u8>> {
        self.pending.pop_front()
    }

    /// Forgets what is queued (a backup: its inputs come from the log).
    pub fn discard(&mut self) -> usize {
        self.poll();
        let n = self.pending.len();
        self.pending.clear();
        n
    }
}
