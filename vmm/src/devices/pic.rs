//! The PC's cascaded pair of 8259A interrupt controllers.
//!
//! With no in-kernel irqchip, this model decides which vector the VMM
//! injects, so it is on the record/replay path: all of its inputs are IRQ
//! line changes made by other devices and port accesses by the guest, both
//! of which replay reproduces, so its state follows without being logged.
//!
//! Only edge-triggered, fully nested operation is modelled in depth, since
//! that is how PC firmware and Linux program it. Rotation and special mask
//! are implemented because they are cheap; special fully nested mode is
//! accepted and ignored.

use std::sync::{Arc, Mutex};

use super::{BusDevice, DeviceError, IrqLine};

/// Master input the slave's INT output is wired to.
const CASCADE_IRQ: u8 = 2;

/// One 8259A.
#[derive(Debug, Default, Clone)]
struct Chip {
    irr: u8,
    isr: u8,
    imr: u8,
    /// Input levels as last driven, so a line held high latches IRR once.
    levels: u8,
    base: u8,
    /// Which ICW the next data-port write is (0 = none: data writes are OCW1).
    init_step: u8,
    icw4_expected: bool,
    single: bool,
    auto_eoi: bool,
    rotate_on_aeoi: bool,
    /// IR line with the lowest priority is `priority_add - 1` (mod 8).
    priority_add: u8,
    read_isr: bool,
    poll: bool,
    special_mask: bool,
}

impl Chip {
    fn set_line(&mut self, line: u8, high: bool) {
        let bit = 1u8 << line;
        if high && self.levels & bit == 0 {
            self.irr |= bit;
        }
        if high {
            self.levels |= bit;
        } else {
            self.levels &= !bit;
        }
    }

    /// Priority (0 = highest) of the best bit in `mask`, given rotation;
    /// 8 when `mask` is empty.
    fn priority(&self, mask: u8) -> u8 {
        (0..8)
            .find(|p| mask & (1 << ((p + self.priority_add) & 7)) != 0)
            .unwrap_or(8)
    }

    /// The IR line this chip would signal now, if any.
    fn pending(&self) -> Option<u8> {
        let req = self.priority(self.irr & !self.imr);
        if req == 8 {
            return None;
        }
        let mut in_service = self.isr;
        if self.special_mask {
            // Special mask lets masked in-service levels stop blocking
            // lower priorities, so a handler can allow them selectively.
            in_service &= !self.imr;
        }
        if req < self.priority(in_service) {
            Some((req + self.priority_add) & 7)
        } else {
            None
        }
    }

    fn ack(&mut self, line: u8) {
        let bit = 1u8 << line;
        if self.auto_eoi {
            if self.rotate_on_aeoi {
                self.priority_add = (line + 1) & 7;
            }
        } else {
            self.isr |= bit;
        }
        // Edge mode: the latched request is consumed by the acknowledge.
        self.irr &= !bit;
    }

    fn write_command(&mut self, v: u8) {
        if v & 0x10 != 0 {
            // ICW1. The edge detectors are re-armed (IRR cleared) but input
            // levels are kept: a line already high needs a new edge.
            *self = Chip {
                levels: self.levels,
                init_step: 2,
                icw4_expected: v & 0x01 != 0,
                single: v & 0x02 != 0,
                ..Chip::default()
            };
        } else if v & 0x08 != 0 {
            // OCW3.
            if v & 0x04 != 0 {
                self.poll = true;
            }
            if v & 0x02 != 0 {
                self.read_isr = v & 0x01 != 0;
            }
            if v & 0x40 != 0 {
                self.special_mask = v & 0x20 != 0;
            }
        } else {
            // OCW2.
            let line = v & 7;
            match v >> 5 {
                0 => self.rotate_on_aeoi = false,
                4 => self.rotate_on_aeoi = true,
                // Non-specific EOI, plain (1) or with rotation (5).
                cmd @ (1 | 5) => {
                    let p = self.priority(self.isr);
                    if p != 8 {
                        let top = (p + self.priority_add) & 7;
                        self.isr &= !(1 << top);
                        if cmd == 5 {
                            self.priority_add = (top + 1) & 7;
                        }
                    }
                }
                3 => self.isr &= !(1 << line),
                6 => self.priority_add = (line + 1) & 7,
                7 => {
                    self.isr &= !(1 << line);
                    self.priority_add = (line + 1) & 7;
                }
                _ => {}
            }
        }
    }

    fn write_data(&mut self, v: u8) {
        match self.init_step {
            2 => {
                self.base = v & 0xf8;
                self.init_step = if !self.single {
                    3
                } else if self.icw4_expected {
                    4
                } else {
                    0
                };
            }
            // ICW3: the cascade wiring is fixed on a PC.
            3 => self.init_step = if self.icw4_expected { 4 } else { 0 },
            4 => {
                self.auto_eoi = v & 0x02 != 0;
                self.init_step = 0;
            }
            _ => self.imr = v,
        }
    }

    fn read_status(&self) -> u8 {
        if self.read_isr {
            self.isr
        } else {
            self.irr
        }
    }
}

/// Master and slave 8259A, cascaded on master IR2.
#[derive(Debug, Default)]
pub struct Pic {
    master: Chip,
    slave: Chip,
}

impl Pic {
    pub fn new() -> Self {
        Self::default()
    }

    /// Drives ISA line `irq` (0-15). Line 2 is the cascade and cannot be
    /// driven from outside; out-of-range lines are ignored.
    pub fn set_irq(&mut self, irq: u8, level: bool) {
        match irq {
            CASCADE_IRQ => {}
            0..=7 => self.master.set_line(irq, level),
            8..=15 => {
                self.slave.set_line(irq - 8, level);
                self.sync_cascade();
            }
            _ => {}
        }
    }

    /// The slave's INT output is modelled as a level into the master's IRR,
    /// rather than an edge: a slave that still has a request after an
    /// acknowledge keeps its output high with no new edge, and an edge model
    /// would lose that request.
    fn sync_cascade(&mut self) {
        let bit = 1u8 << CASCADE_IRQ;
        if self.slave.pending().is_some() {
            self.master.irr |= bit;
        } else {
            self.master.irr &= !bit;
        }
    }

    /// Whether the master's INT output is asserted, i.e. the VMM should
    /// inject as soon as the guest can take an interrupt.
    pub fn has_interrupt(&self) -> bool {
        self.master.pending().is_some()
    }

    /// The INTA cycle: returns the vector to inject and moves the request
    /// in service. If the request went away since `has_interrupt` (the
    /// guest masked it meanwhile), the chip answers with its IR7 vector
    /// and sets no ISR bit, as real 8259s do; guests know to ignore it.
    pub fn acknowledge(&mut self) -> u8 {
        let Some(line) = self.master.pending() else {
            return self.master.base | 7;
        };
        let vector = if line == CASCADE_IRQ {
            match self.slave.pending() {
                Some(sl) => {
                    self.slave.ack(sl);
                    self.slave.base | sl
                }
                None => self.slave.base | 7,
            }
        } else {
            self.master.base | line
        };
        self.master.ack(line);
        self.sync_cascade();
        vector
    }

    /// Poll mode read: acknowledges like INTA but returns `0x80 | line`
    /// (or 0 when nothing is pending) instead of a vector.
    fn poll_read(&mut self, slave: bool) -> u8 {
        let chip = if slave {
            &mut self.slave
        } else {
            &mut self.master
        };
        chip.poll = false;
        let result = match chip.pending() {
            Some(line) => {
                chip.ack(line);
                0x80 | line
            }
            None => 0,
        };
        self.sync_cascade();
        result
    }

    fn chip(&mut self, slave: bool) -> &mut Chip {
        if slave {
            &mut self.slave
        } else {
            &mut self.master
        }
    }

    fn read_port(&mut self, slave: bool, offset: u64) -> u8 {
        if self.chip(slave).poll {
            return self.poll_read(slave);
        }
        let chip = self.chip(slave);
        match offset {
            0 => chip.read_status(),
            1 => chip.imr,
            _ => 0,
        }
    }

    fn write_port(&mut self, slave: bool, offset: u64, v: u8) {
        let chip = self.chip(slave);
        match offset {
            0 => chip.write_command(v),
            1 => chip.write_data(v),
            _ => {}
        }
        self.sync_cascade();
    }

    /// Vector base programmed by ICW2 (low 3 bits always 0).
    pub fn vector_base(&self, slave: bool) -> u8 {
        if slave {
            self.slave.base
        } else {
            self.master.base
        }
    }

    /// Interrupt request registers, master in the low byte.
    pub fn irr(&self) -> u16 {
        u16::from(self.master.irr) | u16::from(self.slave.irr) << 8
    }

    /// In-service registers, master in the low byte.
    pub fn isr(&self) -> u16 {
        u16::from(self.master.isr) | u16::from(self.slave.isr) << 8
    }

    /// Interrupt mask registers, master in the low byte.
    pub fn imr(&self) -> u16 {
        u16::from(self.master.imr) | u16::from(self.slave.imr) << 8
    }
}

/// One 8259A's registers and modes, as plain data.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PicChipState {
    pub irr: u8,
    pub isr: u8,
    pub imr: u8,
    /// Input levels as last driven (edge detection).
    pub levels: u8,
    /// Vector base (ICW2); the low 3 bits are 0.
    pub base: u8,
    /// Which ICW the next data write is: 0 (none), 2, 3 or 4.
    pub init_step: u8,
    pub icw4_expected: bool,
    pub single: bool,
    pub auto_eoi: bool,
    pub rotate_on_aeoi: bool,
    /// Rotation: line `priority_add` has the highest priority (0-7).
    pub priority_add: u8,
    pub read_isr: bool,
    pub poll: bool,
    pub special_mask: bool,
}

/// Both 8259As, as plain data.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PicState {
    pub master: PicChipState,
    pub slave: PicChipState,
}

impl Chip {
    fn state(&self) -> PicChipState {
        // Exhaustive: a new field of `Chip` must be added to the state.
        let Chip {
            irr, isr, imr, levels, base, init_step, icw4_expected, single, auto_eoi, rotate_on_aeoi,
            priority_add, read_isr, poll, special_mask,
        } = *self;
        PicChipState {
            irr, isr, imr, levels, base, init_step, icw4_expected, single, auto_eoi, rotate_on_aeoi,
            priority_add, read_isr, poll, special_mask,
        }
    }

    fn from_state(s: &PicChipState) -> Chip {
        let PicChipState {
            irr, isr, imr, levels, base, init_step, icw4_expected, single, auto_eoi, rotate_on_aeoi,
            priority_add, read_isr, poll, special_mask,
        } = *s;
        Chip {
            irr, isr, imr, levels, base, init_step, icw4_expected, single, auto_eoi, rotate_on_aeoi,
            priority_add, read_isr, poll, special_mask,
        }
    }
}

impl PicChipState {
    fn check(&self, which: &str) -> Result<(), DeviceError> {
        let bad = |what: String| Err(DeviceError::bad("PIC", format!("{which}: {what}")));
        if !matches!(self.init_step, 0 | 2 | 3 | 4) {
            return bad(format!("initialisation step {} (0, 2, 3 or 4)", self.init_step));
        }
        if self.priority_add > 7 {
            return bad(format!("priority rotation {} (0-7)", self.priority_add));
        }
        if self.base & 7 != 0 {
            return bad(format!("vector base {:#x} has its low 3 bits set", self.base));
        }
        Ok(())
    }
}

impl PicState {
    /// Refuses values no 8259A can hold.
    pub fn check(&self) -> Result<(), DeviceError> {
        self.master.check("master")?;
        self.slave.check("slave")
    }
}

impl Pic {
    /// Everything that decides the controller's future behaviour.
    pub fn state(&self) -> PicState {
        PicState { master: self.master.state(), slave: self.slave.state() }
    }

    /// A controller in state `s` (refused if no 8259A can be in it).
    pub fn from_state(s: &PicState) -> Result<Pic, DeviceError> {
        s.check()?;
        Ok(Pic { master: Chip::from_state(&s.master), slave: Chip::from_state(&s.slave) })
    }

    /// Puts this controller in state `s`; unchanged if `s` is refused.
    pub fn restore(&mut self, s: &PicState) -> Result<(), DeviceError> {
        *self = Pic::from_state(s)?;
        Ok(())
    }
}

/// One chip's two ports (offset 0 = command, 1 = data) on the PIO bus; both
/// chips share the [`Pic`] because the cascade couples their state.
#[derive(Debug)]
pub struct PicPort {
    pic: Arc<Mutex<Pic>>,
    slave: bool,
}

impl PicPort {
    pub fn new(pic: Arc<Mutex<Pic>>, slave: bool) -> Self {
        Self { pic, slave }
    }
}

impl BusDevice for PicPort {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if data.is_empty() {
            return;
        }
        data.fill(0);
        data[0] = self.pic.lock().unwrap().read_port(self.slave, offset);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some(&v) = data.first() {
            self.pic.lock().unwrap().write_port(self.slave, offset, v);
        }
    }
}

/// ISA line `irq` into the [`Pic`], handed to the device that drives it.
#[derive(Debug)]
pub struct PicIrqLine {
    pic: Arc<Mutex<Pic>>,
    irq: u8,
}

impl PicIrqLine {
    pub fn new(pic: Arc<Mutex<Pic>>, irq: u8) -> Self {
        Self { pic, irq }
    }
}

impl IrqLine for PicIrqLine {
    fn set_level(&self, high: bool) {
        self.pic.lock().unwrap().set_irq(self.irq, high);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wr(p: &mut Pic, slave: bool, off: u64, v: u8) {
        p.write_port(slave, off, v);
    }

    /// Linux's init_8259A sequence: bases 0x30 / 0x38, no AEOI.
    fn linux_init(p: &mut Pic, aeoi: bool) {
        let icw4 = if aeoi { 0x03 } else { 0x01 };
        wr(p, false, 1, 0xff);
        wr(p, true, 1, 0xff);
        wr(p, false, 0, 0x11);
        wr(p, false, 1, 0x30);
        wr(p, false, 1, 0x04);
        wr(p, false, 1, icw4);
        wr(p, true, 0, 0x11);
        wr(p, true, 1, 0x38);
        wr(p, true, 1, 0x02);
        wr(p, true, 1, 0x01);
        wr(p, false, 1, 0x00);
        wr(p, true, 1, 0x00);
    }

    fn pulse(p: &mut Pic, irq: u8) {
        p.set_irq(irq, true);
        p.set_irq(irq, false);
    }

    #[test]
    fn init_sets_bases_and_masks() {
        let mut p = Pic::new();
        linux_init(&mut p, false);
        assert_eq!(p.vector_base(false), 0x30);
        assert_eq!(p.vector_base(true), 0x38);
        assert_eq!(p.imr(), 0);
        wr(&mut p, false, 1, 0xfb);
        wr(&mut p, true, 1, 0xa5);
        assert_eq!(p.imr(), 0xa5fb);
        assert_eq!(p.read_port(false, 1), 0xfb);
        assert_eq!(p.read_port(true, 1), 0xa5);
    }

    #[test]
    fn icw2_low_bits_ignored_and_icw4_optional() {
        let mut p = Pic::new();
        wr(&mut p, false, 0, 0x10); // ICW1 without IC4
        wr(&mut p, false, 1, 0x47);
        wr(&mut p, false, 1, 0x04); // ICW3
                                    // Initialisation done: this write is OCW1.
        wr(&mut p, false, 1, 0x12);
        assert_eq!(p.vector_base(false), 0x40);
        assert_eq!(p.imr() & 0xff, 0x12);
    }

    #[test]
    fn edge_latching() {
        let mut p = Pic::new();
        linux_init(&mut p, false);
        assert!(!p.has_interrupt());
        p.set_irq(0, true);
        assert!(p.has_interrupt());
        assert_eq!(p.acknowledge(), 0x30);
        assert_eq!(p.isr(), 1);
        wr(&mut p, false, 0, 0x20);
        assert_eq!(p.isr(), 0);
        // Held high: no new request until it falls and rises again.
        p.set_irq(0, true);
        assert!(!p.has_interrupt());
        p.set_irq(0, false);
        assert!(!p.has_interrupt());
        p.set_irq(0, true);
        assert!(p.has_interrupt());
        // A pulse stays latched after the line falls.
        let mut p = Pic::new();
        linux_init(&mut p, false);
        pulse(&mut p, 4);
        assert_eq!(p.irr(), 0x10);
        assert_eq!(p.acknowledge(), 0x34);
    }

    #[test]
    fn masked_requests_wait_in_irr() {
        let mut p = Pic::new();
        linux_init(&mut p, false);
        wr(&mut p, false, 1, 0x01);
        pulse(&mut p, 0);
        assert!(!p.has_interrupt());
        assert_eq!(p.irr(), 1);
        wr(&mut p, false, 1, 0x00);
        assert!(p.has_interrupt());
        assert_eq!(p.acknowledge(), 0x30);
    }

    #[test]
    fn fully_nested_priority() {
        let mut p = Pic::new();
        linux_init(&mut p, false);
        pulse(&mut p, 4);
        assert_eq!(p.acknowledge(), 0x34);
        // Lower priority waits while 4 is in service.
        pulse(&mut p, 6);
        assert!(!p.has_interrupt());
        // Higher priority nests.
        pulse(&mut p, 1);
        assert!(p.has_interrupt());
        assert_eq!(p.acknowledge(), 0x31);
        assert_eq!(p.isr(), 0x12);
        // Non-specific EOI retires the highest in service (1).
        wr(&mut p, false, 0, 0x20);
        assert_eq!(p.isr(), 0x10);
        assert!(!p.has_interrupt());
        // Specific EOI for 4.
        wr(&mut p, false, 0, 0x64);
        assert_eq!(p.isr(), 0);
        assert_eq!(p.acknowledge(), 0x36);
    }

    #[test]
    fn simultaneous_requests_by_priority() {
        let mut p = Pic::new();
        linux_init(&mut p, true);
        pulse(&mut p, 7);
        pulse(&mut p, 3);
        pulse(&mut p, 5);
        assert_eq!(p.acknowledge(), 0x33);
        assert_eq!(p.acknowledge(), 0x35);
        assert_eq!(p.acknowledge(), 0x37);
        assert!(!p.has_interrupt());
    }

    #[test]
    fn auto_eoi_sets_no_isr() {
        let mut p = Pic::new();
        linux_init(&mut p, true);
        pulse(&mut p, 0);
        assert_eq!(p.acknowledge(), 0x30);
        assert_eq!(p.isr(), 0);
        pulse(&mut p, 0);
        assert!(p.has_interrupt());
    }

    #[test]
    fn cascade() {
        let mut p = Pic::new();
        linux_init(&mut p, false);
        pulse(&mut p, 12);
        assert_eq!(p.irr(), 0x1004);
        assert!(p.has_interrupt());
        assert_eq!(p.acknowledge(), 0x3c);
        assert_eq!(p.isr(), 0x1004);
        assert_eq!(p.irr(), 0);
        // Another slave request waits behind both ISR bits.
        pulse(&mut p, 8);
        pulse(&mut p, 14);
        assert!(!p.has_interrupt());
        // EOI slave then master, as Linux does: 8 is next.
        wr(&mut p, true, 0, 0x64);
        wr(&mut p, false, 0, 0x62);
        assert!(p.has_interrupt());
        assert_eq!(p.acknowledge(), 0x38);
        wr(&mut p, true, 0, 0x20);
        wr(&mut p, false, 0, 0x20);
        // 14 still pending: the cascade keeps it alive without a new edge.
        assert_eq!(p.acknowledge(), 0x3e);
        assert_eq!(p.isr(), 0x4004);
    }

    #[test]
    fn cascade_masking() {
        let mut p = Pic::new();
        linux_init(&mut p, false);
        wr(&mut p, true, 1, 0x01);
        pulse(&mut p, 8);
        assert!(!p.has_interrupt());
        assert_eq!(p.irr(), 0x0100);
        wr(&mut p, true, 1, 0x00);
        assert!(p.has_interrupt());
        wr(&mut p, false, 1, 0x04);
        assert!(!p.has_interrupt());
        wr(&mut p, false, 1, 0x00);
        assert_eq!(p.acknowledge(), 0x38);
    }

    #[test]
    fn master_outranks_slave_below_irq2() {
        let mut p = Pic::new();
        linux_init(&mut p, false);
        pulse(&mut p, 8);
        pulse(&mut p, 1);
        pulse(&mut p, 3);
        assert_eq!(p.acknowledge(), 0x31);
        wr(&mut p, false, 0, 0x20);
        assert_eq!(p.acknowledge(), 0x38);
    }

    #[test]
    fn spurious_when_request_vanished() {
        let mut p = Pic::new();
        linux_init(&mut p, false);
        pulse(&mut p, 3);
        assert!(p.has_interrupt());
        // Guest masks it between the check and the INTA.
        wr(&mut p, false, 1, 0x08);
        assert_eq!(p.acknowledge(), 0x37);
        assert_eq!(p.isr(), 0);
        assert_eq!(p.irr(), 0x08);
        // Nothing at all pending.
        let mut p = Pic::new();
        linux_init(&mut p, false);
        assert_eq!(p.acknowledge(), 0x37);
        assert_eq!(p.isr(), 0);
    }

    #[test]
    fn slave_spurious_sets_master_isr2() {
        let mut p = Pic::new();
        linux_init(&mut p, false);
        // Force the master to see a cascade request the slave cannot back,
        // the situation a real slave's vanished request produces.
        p.master.irr |= 0x04;
        assert_eq!(p.acknowledge(), 0x3f);
        assert_eq!(p.isr(), 0x0004);
    }

    #[test]
    fn ocw3_read_select_and_poll() {
        let mut p = Pic::new();
        linux_init(&mut p, false);
        wr(&mut p, false, 1, 0x20);
        pulse(&mut p, 5);
        pulse(&mut p, 1);
        // IRR is selected after init.
        assert_eq!(p.read_port(false, 0), 0x22);
        p.acknowledge();
        wr(&mut p, false, 0, 0x0b);
        assert_eq!(p.read_port(false, 0), 0x02);
        wr(&mut p, false, 0, 0x0a);
        assert_eq!(p.read_port(false, 0), 0x20);
        wr(&mut p, false, 0, 0x20);
        // Poll: acknowledges the best request (5 is masked: none).
        wr(&mut p, false, 0, 0x0c);
        assert_eq!(p.read_port(false, 0), 0);
        wr(&mut p, false, 1, 0x00);
        wr(&mut p, false, 0, 0x0c);
        assert_eq!(p.read_port(false, 0), 0x85);
        assert_eq!(p.isr(), 0x20);
        // Poll is one-shot.
        assert_eq!(p.read_port(false, 0), 0x00);
    }

    #[test]
    fn rotation_and_special_mask() {
        let mut p = Pic::new();
        linux_init(&mut p, false);
        // Set priority: 3 lowest, so 4 is highest.
        wr(&mut p, false, 0, 0xc3);
        pulse(&mut p, 3);
        pulse(&mut p, 5);
        assert_eq!(p.acknowledge(), 0x35);
        // Rotate on non-specific EOI: 5 becomes lowest.
        wr(&mut p, false, 0, 0xa0);
        assert_eq!(p.isr(), 0);
        pulse(&mut p, 5);
        assert_eq!(p.acknowledge(), 0x33);
        // Special mask: masking in-service 3 lets 5 through.
        pulse(&mut p, 5);
        assert!(!p.has_interrupt());
        wr(&mut p, false, 1, 0x08);
        wr(&mut p, false, 0, 0x68);
        assert!(p.has_interrupt());
        assert_eq!(p.acknowledge(), 0x35);
    }

    #[test]
    fn reinit_rearms_edges() {
        let mut p = Pic::new();
        linux_init(&mut p, false);
        p.set_irq(4, true);
        p.acknowledge();
        linux_init(&mut p, false);
        assert_eq!(p.isr(), 0);
        assert_eq!(p.irr(), 0);
        // Still high from before: needs a fresh edge.
        p.set_irq(4, true);
        assert!(!p.has_interrupt());
        p.set_irq(4, false);
        p.set_irq(4, true);
        assert!(p.has_interrupt());
    }

    /// Drives a copy made from `state()` and the original alike: same
    /// vectors, same registers, whatever the state held (rotation, special
    /// mask, a request in service, a line held high, poll pending).
    #[test]
    fn state_round_trip_behaves_identically() {
        let mut p = Pic::new();
        linux_init(&mut p, false);
        wr(&mut p, false, 0, 0xc3); // rotation: 3 lowest
        p.set_irq(4, true); // held high
        pulse(&mut p, 12);
        assert_eq!(p.acknowledge(), 0x34);
        wr(&mut p, true, 1, 0x10);
        pulse(&mut p, 6);
        wr(&mut p, false, 0, 0x0b); // read ISR
        wr(&mut p, true, 0, 0x11); // slave mid-initialisation
        wr(&mut p, true, 1, 0x38);
        let s = p.state();
        let mut q = Pic::from_state(&s).unwrap();
        assert_eq!(q.state(), s);
        let drive = |p: &mut Pic| {
            let mut seen = vec![p.read_port(false, 0), p.read_port(true, 1)];
            wr(p, true, 1, 0x02);
            wr(p, true, 1, 0x01);
            wr(p, true, 1, 0x00);
            p.set_irq(4, false);
            p.set_irq(4, true);
            pulse(p, 9);
            for _ in 0..4 {
                seen.push(u8::from(p.has_interrupt()));
                seen.push(p.acknowledge());
                wr(p, false, 0, 0x20);
            }
            wr(p, false, 0, 0x0c);
            seen.push(p.read_port(false, 0));
            seen.extend(p.irr().to_le_bytes());
            seen.extend(p.isr().to_le_bytes());
            seen
        };
        assert_eq!(drive(&mut p), drive(&mut q));
        assert_eq!(p.state(), q.state());
    }

    #[test]
    fn impossible_states_are_refused() {
        let mut s = PicState::default();
        s.slave.priority_add = 8;
        assert!(Pic::from_state(&s).unwrap_err().to_string().contains("slave: priority rotation 8"));
        let mut s = PicState::default();
        s.master.init_step = 1;
        assert!(Pic::from_state(&s).is_err());
        let mut s = PicState::default();
        s.master.base = 0x21;
        let mut p = Pic::new();
        linux_init(&mut p, false);
        let before = p.state();
        assert!(p.restore(&s).is_err());
        assert_eq!(p.state(), before, "a refused state changes nothing");
    }

    #[test]
    fn bus_ports_and_irq_lines_share_state() {
        let pic = Arc::new(Mutex::new(Pic::new()));
        let mut master = PicPort::new(pic.clone(), false);
        let mut slave = PicPort::new(pic.clone(), true);
        for (off, v) in [(0, 0x11u8), (1, 0x20), (1, 0x04), (1, 0x01)] {
            master.write(off, &[v]);
        }
        for (off, v) in [(0, 0x11u8), (1, 0x28), (1, 0x02), (1, 0x01)] {
            slave.write(off, &[v, 0xff]);
        }
        master.write(1, &[0]);
        slave.write(1, &[0]);
        let line = PicIrqLine::new(pic.clone(), 9);
        line.set_level(true);
        line.set_level(false);
        assert!(pic.lock().unwrap().has_interrupt());
        assert_eq!(pic.lock().unwrap().acknowledge(), 0x29);
        let mut d = [0xff; 2];
        slave.write(0, &[0x0b]);
        slave.read(0, &mut d);
        assert_eq!(d, [0x02, 0]);
        master.read(1, &mut []);
        // Out-of-range lines are ignored.
        PicIrqLine::new(pic.clone(), 2).set_level(true);
        PicIrqLine::new(pic.clone(), 16).set_level(true);
        assert_eq!(pic.lock().unwrap().irr(), 0);
    }
}
