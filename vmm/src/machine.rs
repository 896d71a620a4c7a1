//! The board: which device sits at which port, wired to which interrupt
//! line. Everything here is deterministic given the clock and the input the
//! VMM pushes in.

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use crate::bus::{Bus, BusError};
use crate::clock::VmClock;
use crate::devices::cmos::Cmos;
use crate::devices::debug_exit::DebugExit;
use crate::devices::i8042::I8042;
use crate::devices::pic::{Pic, PicIrqLine, PicPort};
use crate::devices::pit::Pit;
use crate::devices::uart::Uart;
use crate::devices::{Clock, OutputSink, StopSignal};
use crate::layout::*;

pub struct Machine {
    pub pio: Bus,
    pub mmio: Bus,
    pub pic: Arc<Mutex<Pic>>,
    pub pit: Arc<Mutex<Pit>>,
    pub uart: Arc<Mutex<Uart>>,
    pub cmos: Arc<Mutex<Cmos>>,
    pub clock: Arc<VmClock>,
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

        let mut pio = Bus::new();
        pio.insert(Arc::new(Mutex::new(PicPort::new(pic.clone(), false))), PIC_MASTER_BASE.into(), 2)?;
        pio.insert(Arc::new(Mutex::new(PicPort::new(pic.clone(), true))), PIC_SLAVE_BASE.into(), 2)?;
        pio.insert(pit.clone(), PIT_BASE.into(), 4)?;
        pio.insert(Arc::new(Mutex::new(I8042::new(stop.clone()))), I8042_BASE.into(), 5)?;
        pio.insert(cmos.clone(), CMOS_BASE.into(), 2)?;
        pio.insert(Arc::new(Mutex::new(DebugExit::new(stop.clone()))), DEBUG_EXIT_PORT.into(), 1)?;
        pio.insert(uart.clone(), COM1_BASE.into(), 8)?;

        Ok(Machine { pio, mmio: Bus::new(), pic, pit, uart, cmos, clock, stop, ordinal })
    }
}
