//! The board: which device sits at which port, wired to which interrupt
//! line. Everything here is deterministic given the clock and the input the
//! VMM pushes in.

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use crate::bus::{Bus, BusError};
use crate::clock::VmClock;
use crate::devices::cmos::{Cmos, CmosState};
use crate::devices::debug_exit::{DebugExit, DebugExitState};
use crate::devices::i8042::{I8042State, I8042};
use crate::devices::pic::{Pic, PicIrqLine, PicPort, PicState};
use crate::devices::pit::{Pit, PitState};
use crate::devices::uart::{Uart, UartState};
use crate::devices::{Clock, DeviceError, OutputSink, StopSignal};
use crate::layout::*;
use crate::net::device::VirtioNet;
use crate::net::{FrameSink, NET_BAR_ADDR, NET_IRQ, NET_SLOT};
use crate::pci::{PciRoot, CONFIG_PORT, CONFIG_PORT_LEN};

pub struct Machine {
    pub pio: Bus,
    pub mmio: Bus,
    pub pic: Arc<Mutex<Pic>>,
    pub pit: Arc<Mutex<Pit>>,
    pub uart: Arc<Mutex<Uart>>,
    pub cmos: Arc<Mutex<Cmos>>,
    pub i8042: Arc<Mutex<I8042>>,
    pub debug_exit: Arc<Mutex<DebugExit>>,
    pub clock: Arc<VmClock>,
    /// The network card and the PCI bus it sits on, when configured
    /// (`add_net`); a machine without one has no PCI bus at all.
    pub net: Option<Arc<Mutex<VirtioNet>>>,
    pub pci: Option<Arc<Mutex<PciRoot>>>,
    pub stop: StopSignal,
    /// Ordinal of the exit being handled; output sinks tag bytes with it so
    /// fault tolerance can hold output until the log through it is safe.
    pub ordinal: Arc<AtomicU64>,
}

impl Machine {
    pub fn new(
        clock: Arc<VmClock>,
        console: Box<dyn OutputSink>,
        ordinal: Arc<AtomicU64>,
    ) -> Result<Self, BusError> {
        let stop = StopSignal::new();
        let pic = Arc::new(Mutex::new(Pic::new()));
        let dyn_clock: Arc<dyn Clock> = clock.clone();
        let pit = Arc::new(Mutex::new(Pit::new(
            dyn_clock.clone(),
            Box::new(PicIrqLine::new(pic.clone(), PIT_IRQ)),
        )));
        let uart = Arc::new(Mutex::new(Uart::new(
            Box::new(PicIrqLine::new(pic.clone(), COM1_IRQ)),
            console,
        )));
        // The wall-clock base is set at boot from the host (live) or the log
        // (replay).
        let cmos = Arc::new(Mutex::new(Cmos::new(dyn_clock, 0)));

        let i8042 = Arc::new(Mutex::new(I8042::new(stop.clone())));
        let debug_exit = Arc::new(Mutex::new(DebugExit::new(stop.clone())));

        let mut pio = Bus::new();
        pio.insert(Arc::new(Mutex::new(PicPort::new(pic.clone(), false))), PIC_MASTER_BASE.into(), 2)?;
        pio.insert(Arc::new(Mutex::new(PicPort::new(pic.clone(), true))), PIC_SLAVE_BASE.into(), 2)?;
        pio.insert(pit.clone(), PIT_BASE.into(), 4)?;
        pio.insert(i8042.clone(), I8042_BASE.into(), 5)?;
        pio.insert(cmos.clone(), CMOS_BASE.into(), 2)?;
        pio.insert(debug_exit.clone(), DEBUG_EXIT_PORT.into(), 1)?;
        pio.insert(uart.clone(), COM1_BASE.into(), 8)?;

        Ok(Machine { pio, mmio: Bus::new(), pic, pit, uart, cmos, i8042, debug_exit, clock, net: None, pci: None, stop, ordinal })
    }

    /// Adds the PCI bus and a virtio-net card with this MAC on it: BAR 0
    /// on the MMIO bus, INTA# on the PIC's `NET_IRQ`. The card reads and
    /// writes guest memory `mem` (its rings and buffers) and hands the
    /// frames the guest sends to `sink`.
    pub fn add_net(&mut self, mac: [u8; 6], mem: vm_memory::GuestMemoryMmap, sink: Box<dyn FrameSink>) -> Result<(), BusError> {
        let irq = Box::new(PicIrqLine::new(self.pic.clone(), NET_IRQ));
        let net = Arc::new(Mutex::new(VirtioNet::new(mac, NET_BAR_ADDR, NET_IRQ, mem, irq, sink)));
        let mut root = PciRoot::new();
        root.plug(NET_SLOT, net.clone());
        let root = Arc::new(Mutex::new(root));
        self.pio.insert(root.clone(), CONFIG_PORT.into(), CONFIG_PORT_LEN)?;
        self.mmio.insert(net.clone(), NET_BAR_ADDR.into(), crate::net::transport::BAR_SIZE.into())?;
        self.net = Some(net);
        self.pci = Some(root);
        Ok(())
    }

    /// The board's state at an exit boundary: every device and the clock.
    /// The stop signal is not in it: a stop ends the run, so a state is
    /// only ever taken while none is pending.
    pub fn state(&self) -> MachineState {
        MachineState {
            clock_ns: self.clock.value(),
            pic: self.pic.lock().unwrap().state(),
            pit: self.pit.lock().unwrap().state(),
            uart: self.uart.lock().unwrap().state(),
            cmos: self.cmos.lock().unwrap().state(),
            i8042: self.i8042.lock().unwrap().state(),
            debug_exit: self.debug_exit.lock().unwrap().state(),
            net: self.net.as_ref().zip(self.pci.as_ref()).map(|(n, p)| NetMachineState {
                pci: p.lock().unwrap().state(),
                card: n.lock().unwrap().state(),
            }),
        }
    }

    /// Puts every device and the clock in `s`, keeping the wiring. Either
    /// all of it is restored or, if any device refuses its part, nothing.
    pub fn restore(&self, s: &MachineState) -> Result<(), DeviceError> {
        s.check()?;
        // The card first: it can refuse (another card, or none).
        match (&s.net, &self.net, &self.pci) {
            (None, None, _) => {}
            (Some(ns), Some(net), Some(pci)) => {
                let (mut card, mut root) = (net.lock().unwrap(), pci.lock().unwrap());
                let (card_was, root_was) = (card.state(), root.state());
                if let Err(e) = card.restore(&ns.card).and_then(|_| root.restore(&ns.pci)) {
                    card.restore(&card_was)?;
                    root.restore(&root_was)?;
                    return Err(e);
                }
            }
            (Some(_), _, _) => return Err(DeviceError::bad("machine", "the state has a network card, this machine none")),
            (None, Some(_), _) => return Err(DeviceError::bad("machine", "this machine has a network card, the state none")),
        }
        self.pic.lock().unwrap().restore(&s.pic)?;
        self.pit.lock().unwrap().restore(&s.pit)?;
        self.uart.lock().unwrap().restore(&s.uart)?;
        self.cmos.lock().unwrap().restore(&s.cmos)?;
        self.i8042.lock().unwrap().restore(&s.i8042)?;
        self.clock.restore(s.clock_ns);
        Ok(())
    }
}

/// The board's devices and clock as plain data (see `Machine::state`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MachineState {
    /// The last time value the guest was given (ns of guest time).
    pub clock_ns: u64,
    pub pic: PicState,
    pub pit: PitState,
    pub uart: UartState,
    pub cmos: CmosState,
    pub i8042: I8042State,
    pub debug_exit: DebugExitState,
    /// The PCI bus and the network card, if the machine has them.
    pub net: Option<NetMachineState>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetMachineState {
    pub pci: crate::pci::PciRootState,
    pub card: crate::net::device::NetState,
}

impl MachineState {
    /// Refuses a state any device refuses.
    pub fn check(&self) -> Result<(), DeviceError> {
        self.pic.check()?;
        self.pit.check()?;
        self.uart.check()?;
        self.cmos.check()?;
        self.i8042.check()
    }
}
