//! 16550A UART for COM1.
//!
//! The transmitter is infinitely fast: a byte written to THR reaches the
//! output sink during the write, so THR is never observed busy. That keeps
//! transmit timing out of the device entirely (nothing to record), at the
//! cost of the guest seeing one THRE interrupt per burst it writes.
//!
//! Receive data only enters through [`Uart::push_input`], called by the VMM
//! at a point it logs, so replay can push the same bytes at the same point.

use std::collections::VecDeque;
use std::fmt;

use super::{BusDevice, DeviceError, IrqLine, OutputSink};

const RBR_THR_DLL: u64 = 0;
const IER_DLM: u64 = 1;
const IIR_FCR: u64 = 2;
const LCR: u64 = 3;
const MCR: u64 = 4;
const LSR: u64 = 5;
const MSR: u64 = 6;
const SCR: u64 = 7;

const IER_RDI: u8 = 0x01;
const IER_THRI: u8 = 0x02;
const IER_RLSI: u8 = 0x04;
/// The 16550 implements only the low four IER bits; the rest read as 0.
const IER_MASK: u8 = 0x0f;

const IIR_NONE: u8 = 0x01;
const IIR_THRI: u8 = 0x02;
const IIR_RDI: u8 = 0x04;
const IIR_RLSI: u8 = 0x06;
const IIR_FIFO_ENABLED: u8 = 0xc0;

const FCR_ENABLE: u8 = 0x01;
const FCR_CLEAR_RX: u8 = 0x02;

const LCR_DLAB: u8 = 0x80;

const MCR_DTR: u8 = 0x01;
const MCR_RTS: u8 = 0x02;
const MCR_OUT1: u8 = 0x04;
const MCR_OUT2: u8 = 0x08;
const MCR_LOOP: u8 = 0x10;
/// MCR bits 5-7 do not exist on the 16550A.
const MCR_MASK: u8 = 0x1f;

const LSR_DR: u8 = 0x01;
const LSR_OE: u8 = 0x02;
const LSR_THRE: u8 = 0x20;
const LSR_TEMT: u8 = 0x40;

const MSR_CTS: u8 = 0x10;
const MSR_DSR: u8 = 0x20;
const MSR_RI: u8 = 0x40;
const MSR_DCD: u8 = 0x80;

const FIFO_LEN: usize = 16;

/// Power-on divisor (9600 baud from 1.8432 MHz); only stored, since the
/// line speed has no effect on an infinitely fast transmitter.
const DEFAULT_DIVISOR: u16 = 12;

pub struct Uart {
    ier: u8,
    fcr: u8,
    lcr: u8,
    mcr: u8,
    scr: u8,
    divisor: u16,
    /// Overrun: sticky until the guest reads LSR, like the hardware.
    overrun: bool,
    /// The THRE interrupt condition. Separate from LSR.THRE (always set here)
    /// because the 16550 lets the guest acknowledge it by reading IIR while
    /// the holding register stays empty.
    thr_ipending: bool,
    rx: VecDeque<u8>,
    /// Bytes ever pushed in from the line: fault tolerance acknowledges
    /// console input by this count.
    rx_total: u64,
    /// Bytes ever sent to the output sink: where a snapshot stands in the
    /// console's output.
    tx_total: u64,
    irq: Box<dyn IrqLine>,
    out: Box<dyn OutputSink>,
    /// Last level handed to `irq`, so the line only sees changes.
    irq_level: bool,
}

impl Uart {
    pub fn new(irq: Box<dyn IrqLine>, out: Box<dyn OutputSink>) -> Self {
        Self {
            ier: 0,
            fcr: 0,
            lcr: 0,
            mcr: 0,
            scr: 0,
            divisor: DEFAULT_DIVISOR,
            overrun: false,
            thr_ipending: false,
            rx: VecDeque::with_capacity(FIFO_LEN),
            rx_total: 0,
            tx_total: 0,
            irq,
            out,
            irq_level: false,
        }
    }

    fn fifo_enabled(&self) -> bool {
        self.fcr & FCR_ENABLE != 0
    }

    fn loopback(&self) -> bool {
        self.mcr & MCR_LOOP != 0
    }

    fn rx_capacity(&self) -> usize {
        if self.fifo_enabled() {
            FIFO_LEN
        } else {
            1
        }
    }

    /// How many bytes [`Uart::push_input`] can take without overrun. Zero in
    /// loopback mode: the receiver is then wired to the transmitter and
    /// deaf to the line, so the VMM should hold typed bytes back until the
    /// guest leaves loopback rather than lose them.
    pub fn rx_room(&self) -> usize {
        if self.loopback() {
            0
        } else {
            self.rx_capacity().saturating_sub(self.rx.len())
        }
    }

    /// Bytes pushed in from the line since power-on.
    pub fn rx_total(&self) -> u64 {
        self.rx_total
    }

    /// Bytes sent to the output sink since power-on.
    pub fn tx_total(&self) -> u64 {
        self.tx_total
    }

    /// Whether the guest is listening for input: its receive interrupt is
    /// enabled and the receiver is on the line. Input pushed while this is
    /// false would sit unread or overrun, so the VMM holds it back instead.
    /// Guests that poll LSR.DR with interrupts off are not served.
    pub fn accepting_input(&self) -> bool {
        self.ier & IER_RDI != 0 && !self.loopback()
    }

    /// Delivers bytes that arrived on the serial line. Bytes beyond
    /// [`Uart::rx_room`] are lost and flag an overrun, as on the chip; in
    /// loopback mode the line is disconnected, so they vanish silently.
    pub fn push_input(&mut self, bytes: &[u8]) {
        if self.loopback() {
            return;
        }
        self.rx_total += bytes.len() as u64;
        for &b in bytes {
            self.receive(b);
        }
        self.update_irq();
    }

    fn receive(&mut self, b: u8) {
        if self.rx.len() < self.rx_capacity() {
            self.rx.push_back(b);
        } else {
            self.overrun = true;
        }
    }

    fn lsr(&self) -> u8 {
        let mut lsr = LSR_THRE | LSR_TEMT;
        if !self.rx.is_empty() {
            lsr |= LSR_DR;
        }
        if self.overrun {
            lsr |= LSR_OE;
        }
        lsr
    }

    fn msr(&self) -> u8 {
        if self.loopback() {
            // Loopback ties the modem outputs back to the inputs; the
            // guest's probe for a real 16550 checks exactly this mapping.
            let mut msr = 0;
            if self.mcr & MCR_RTS != 0 {
                msr |= MSR_CTS;
            }
            if self.mcr & MCR_DTR != 0 {
                msr |= MSR_DSR;
            }
            if self.mcr & MCR_OUT1 != 0 {
                msr |= MSR_RI;
            }
            if self.mcr & MCR_OUT2 != 0 {
                msr |= MSR_DCD;
            }
            msr
        } else {
            // A permanently attached, ready terminal: drivers that honour
            // flow control must never stall waiting for CTS.
            MSR_CTS | MSR_DSR | MSR_DCD
        }
    }

    /// The highest-priority pending source, as IIR encodes it (without the
    /// FIFO bits). Modem status changes never occur, so they are not a
    /// source.
    fn pending_source(&self) -> u8 {
        if self.ier & IER_RLSI != 0 && self.overrun {
            IIR_RLSI
        } else if self.ier & IER_RDI != 0 && !self.rx.is_empty() {
            IIR_RDI
        } else if self.ier & IER_THRI != 0 && self.thr_ipending {
            IIR_THRI
        } else {
            IIR_NONE
        }
    }

    fn update_irq(&mut self) {
        // On a PC the UART's INTR pin reaches the PIC through a buffer
        // enabled by OUT2; drivers keep OUT2 clear to silence a port.
        let level = self.pending_source() != IIR_NONE && self.mcr & MCR_OUT2 != 0;
        if level != self.irq_level {
            self.irq_level = level;
            self.irq.set_level(level);
        }
    }

    fn transmit(&mut self, b: u8) {
        if self.loopback() {
            self.receive(b);
        } else {
            self.out.emit(&[b]);
            self.tx_total += 1;
        }
        // The byte left THR at once, so THR is empty again: that is a new
        // THRE event, whether or not the guest acknowledged the last one.
        self.thr_ipending = true;
    }

    fn read_reg(&mut self, offset: u64) -> u8 {
        let dlab = self.lcr & LCR_DLAB != 0;
        match offset {
            RBR_THR_DLL if dlab => self.divisor as u8,
            RBR_THR_DLL => self.rx.pop_front().unwrap_or(0),
            IER_DLM if dlab => (self.divisor >> 8) as u8,
            IER_DLM => self.ier,
            IIR_FCR => {
                let source = self.pending_source();
                if source == IIR_THRI {
                    // Reading IIR is how the guest acknowledges THRE.
                    self.thr_ipending = false;
                }
                let fifo = if self.fifo_enabled() {
                    IIR_FIFO_ENABLED
                } else {
                    0
                };
                source | fifo
            }
            LCR => self.lcr,
            MCR => self.mcr,
            LSR => {
                let lsr = self.lsr();
                // Error bits are cleared by the read that reports them.
                self.overrun = false;
                lsr
            }
            MSR => self.msr(),
            SCR => self.scr,
            _ => 0,
        }
    }

    fn write_reg(&mut self, offset: u64, v: u8) {
        let dlab = self.lcr & LCR_DLAB != 0;
        match offset {
            RBR_THR_DLL if dlab => self.divisor = (self.divisor & 0xff00) | u16::from(v),
            RBR_THR_DLL => {
                self.thr_ipending = false;
                self.transmit(v);
            }
            IER_DLM if dlab => self.divisor = (self.divisor & 0x00ff) | (u16::from(v) << 8),
            IER_DLM => {
                let old = self.ier;
                self.ier = v & IER_MASK;
                // Enabling THRI while THR is empty raises THRE again even if
                // it was acknowledged; drivers kick transmission this way.
                // THR is always empty here, so the rising edge of the enable
                // bit is what re-arms it.
                if (old ^ self.ier) & IER_THRI != 0 {
                    self.thr_ipending = self.ier & IER_THRI != 0;
                }
            }
            IIR_FCR => {
                let old = self.fcr;
                self.fcr = v & !(FCR_CLEAR_RX | 0x04);
                // Toggling the FIFO enable resets both FIFOs.
                if (old ^ self.fcr) & FCR_ENABLE != 0 || v & FCR_CLEAR_RX != 0 {
                    self.rx.clear();
                }
            }
            LCR => self.lcr = v,
            MCR => self.mcr = v & MCR_MASK,
            // LSR and MSR are read-only; factory-test writes are ignored.
            LSR | MSR => {}
            SCR => self.scr = v,
            _ => {}
        }
    }
}

/// The 16550A, as plain data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UartState {
    pub ier: u8,
    pub fcr: u8,
    pub lcr: u8,
    pub mcr: u8,
    pub scr: u8,
    pub divisor: u16,
    pub overrun: bool,
    /// The THRE interrupt condition (acknowledged by an IIR read).
    pub thr_ipending: bool,
    /// The receive FIFO, oldest byte first (at most 16).
    pub rx: Vec<u8>,
    pub rx_total: u64,
    pub tx_total: u64,
    /// The level last driven on the interrupt line.
    pub irq_level: bool,
}

impl UartState {
    /// Refuses values no 16550A can hold.
    pub fn check(&self) -> Result<(), DeviceError> {
        let bad = |what: String| Err(DeviceError::bad("UART", what));
        if self.ier & !IER_MASK != 0 {
            return bad(format!("IER {:#04x} has bits the 16550A lacks", self.ier));
        }
        if self.mcr & !MCR_MASK != 0 {
            return bad(format!("MCR {:#04x} has bits the 16550A lacks", self.mcr));
        }
        if self.fcr & (FCR_CLEAR_RX | 0x04) != 0 {
            return bad(format!("FCR {:#04x} holds self-clearing bits", self.fcr));
        }
        if self.rx.len() > FIFO_LEN {
            return bad(format!("{} bytes in a {FIFO_LEN}-byte receive FIFO", self.rx.len()));
        }
        Ok(())
    }
}

impl Uart {
    /// Everything that decides the port's future behaviour (its interrupt
    /// line and output sink are wiring, not state).
    pub fn state(&self) -> UartState {
        // Exhaustive: a new field of `Uart` must be added to the state.
        let Uart {
            ier, fcr, lcr, mcr, scr, divisor, overrun, thr_ipending, rx, rx_total, tx_total, irq: _, out: _,
            irq_level,
        } = self;
        UartState {
            ier: *ier, fcr: *fcr, lcr: *lcr, mcr: *mcr, scr: *scr, divisor: *divisor, overrun: *overrun,
            thr_ipending: *thr_ipending, rx: rx.iter().copied().collect(), rx_total: *rx_total,
            tx_total: *tx_total, irq_level: *irq_level,
        }
    }

    /// A port in state `s`, driving `irq` and writing to `out`.
    pub fn from_state(s: &UartState, irq: Box<dyn IrqLine>, out: Box<dyn OutputSink>) -> Result<Uart, DeviceError> {
        let mut u = Uart::new(irq, out);
        u.restore(s)?;
        Ok(u)
    }

    /// Puts this port in state `s`, keeping its wiring; unchanged if `s`
    /// is refused. Drives no interrupt line: the PIC's state has the level.
    pub fn restore(&mut self, s: &UartState) -> Result<(), DeviceError> {
        s.check()?;
        let UartState {
            ier, fcr, lcr, mcr, scr, divisor, overrun, thr_ipending, rx, rx_total, tx_total, irq_level,
        } = s;
        (self.ier, self.fcr, self.lcr, self.mcr, self.scr, self.divisor) = (*ier, *fcr, *lcr, *mcr, *scr, *divisor);
        (self.overrun, self.thr_ipending, self.irq_level) = (*overrun, *thr_ipending, *irq_level);
        self.rx = rx.iter().copied().collect();
        (self.rx_total, self.tx_total) = (*rx_total, *tx_total);
        Ok(())
    }
}

impl BusDevice for Uart {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if data.is_empty() {
            return;
        }
        data.fill(0);
        data[0] = self.read_reg(offset);
        self.update_irq();
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some(&v) = data.first() {
            self.write_reg(offset, v);
            self.update_irq();
        }
    }
}

impl fmt::Debug for Uart {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Uart")
            .field("ier", &self.ier)
            .field("fcr", &self.fcr)
            .field("lcr", &self.lcr)
            .field("mcr", &self.mcr)
            .field("scr", &self.scr)
            .field("divisor", &self.divisor)
            .field("overrun", &self.overrun)
            .field("thr_ipending", &self.thr_ipending)
            .field("rx", &self.rx)
            .field("irq_level", &self.irq_level)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::test_support::{rd, wr, Levels, Sink};

    fn uart() -> (Uart, Levels, Sink) {
        let levels = Levels::default();
        let sink = Sink::default();
        let u = Uart::new(Box::new(levels.clone()), Box::new(sink.clone()));
        (u, levels, sink)
    }

    #[test]
    fn reset_state() {
        let (mut u, levels, _) = uart();
        assert_eq!(rd(&mut u, IER_DLM), 0);
        assert_eq!(rd(&mut u, IIR_FCR), IIR_NONE);
        assert_eq!(rd(&mut u, LSR), LSR_THRE | LSR_TEMT);
        assert_eq!(rd(&mut u, MSR), 0xb0);
        assert_eq!(rd(&mut u, RBR_THR_DLL), 0);
        assert!(levels.take().is_empty());
    }

    #[test]
    fn thr_goes_to_sink() {
        let (mut u, levels, sink) = uart();
        for &b in b"hi\n" {
            wr(&mut u, RBR_THR_DLL, b);
            assert_eq!(rd(&mut u, LSR) & (LSR_THRE | LSR_TEMT), LSR_THRE | LSR_TEMT);
        }
        assert_eq!(sink.bytes(), b"hi\n");
        // No interrupt enabled, no edge.
        assert!(levels.take().is_empty());
    }

    #[test]
    fn divisor_latch_does_not_transmit() {
        let (mut u, _, sink) = uart();
        wr(&mut u, LCR, LCR_DLAB | 0x03);
        wr(&mut u, RBR_THR_DLL, 0x01);
        wr(&mut u, IER_DLM, 0x02);
        assert_eq!(rd(&mut u, RBR_THR_DLL), 0x01);
        assert_eq!(rd(&mut u, IER_DLM), 0x02);
        wr(&mut u, LCR, 0x03);
        assert_eq!(rd(&mut u, IER_DLM), 0);
        assert!(sink.bytes().is_empty());
        assert_eq!(rd(&mut u, LCR), 0x03);
    }

    #[test]
    fn out2_gates_the_line() {
        let (mut u, levels, _) = uart();
        wr(&mut u, IER_DLM, IER_THRI);
        // Pending and reported in IIR, but OUT2 is clear: nothing reaches
        // the PIC.
        assert_eq!(rd(&mut u, IIR_FCR), IIR_THRI);
        wr(&mut u, IER_DLM, 0);
        wr(&mut u, IER_DLM, IER_THRI);
        assert!(levels.take().is_empty());
        wr(&mut u, MCR, MCR_OUT2);
        assert_eq!(levels.take(), vec![true]);
        wr(&mut u, MCR, 0);
        assert_eq!(levels.take(), vec![false]);
    }

    #[test]
    fn thre_interrupt_cycle() {
        let (mut u, levels, _) = uart();
        wr(&mut u, MCR, MCR_OUT2);
        // Enabling THRI with THR empty raises it at once.
        wr(&mut u, IER_DLM, IER_THRI);
        assert_eq!(levels.take(), vec![true]);
        // Reading IIR reports and acknowledges it.
        assert_eq!(rd(&mut u, IIR_FCR), IIR_THRI);
        assert_eq!(levels.take(), vec![false]);
        assert_eq!(rd(&mut u, IIR_FCR), IIR_NONE);
        // Writing THR re-arms it (the byte leaves immediately).
        wr(&mut u, RBR_THR_DLL, b'x');
        assert_eq!(levels.take(), vec![true]);
        // Re-enabling without a disable in between does not re-arm after
        // an acknowledge, but a 0 -> 1 toggle does.
        assert_eq!(rd(&mut u, IIR_FCR), IIR_THRI);
        wr(&mut u, IER_DLM, IER_THRI);
        assert_eq!(rd(&mut u, IIR_FCR), IIR_NONE);
        wr(&mut u, IER_DLM, 0);
        wr(&mut u, IER_DLM, IER_THRI);
        assert_eq!(rd(&mut u, IIR_FCR), IIR_THRI);
        assert_eq!(levels.take(), vec![false, true, false]);
    }

    #[test]
    fn disabling_thri_drops_the_line() {
        let (mut u, levels, _) = uart();
        wr(&mut u, MCR, MCR_OUT2);
        wr(&mut u, IER_DLM, IER_THRI);
        wr(&mut u, IER_DLM, 0);
        assert_eq!(levels.take(), vec![true, false]);
    }

    #[test]
    fn receive_without_fifo_holds_one_byte() {
        let (mut u, levels, _) = uart();
        wr(&mut u, MCR, MCR_OUT2);
        wr(&mut u, IER_DLM, IER_RDI);
        assert_eq!(u.rx_room(), 1);
        u.push_input(b"a");
        assert_eq!(levels.take(), vec![true]);
        assert_eq!(u.rx_room(), 0);
        assert_eq!(rd(&mut u, LSR) & LSR_DR, LSR_DR);
        assert_eq!(rd(&mut u, IIR_FCR), IIR_RDI);
        assert_eq!(rd(&mut u, RBR_THR_DLL), b'a');
        assert_eq!(levels.take(), vec![false]);
        assert_eq!(rd(&mut u, LSR) & LSR_DR, 0);
        assert_eq!(u.rx_room(), 1);
    }

    #[test]
    fn accepting_input_follows_rdi_and_loopback() {
        let (mut u, _, _) = uart();
        assert!(!u.accepting_input());
        wr(&mut u, IER_DLM, IER_RDI);
        assert!(u.accepting_input());
        wr(&mut u, MCR, MCR_LOOP);
        assert!(!u.accepting_input());
        wr(&mut u, MCR, MCR_OUT2);
        assert!(u.accepting_input());
        wr(&mut u, IER_DLM, IER_THRI);
        assert!(!u.accepting_input());
    }

    #[test]
    fn receive_fifo_sixteen_bytes() {
        let (mut u, _, _) = uart();
        wr(&mut u, IIR_FCR, FCR_ENABLE);
        assert_eq!(rd(&mut u, IIR_FCR), IIR_FIFO_ENABLED | IIR_NONE);
        assert_eq!(u.rx_room(), 16);
        let input: Vec<u8> = (0..16).collect();
        u.push_input(&input);
        assert_eq!(u.rx_room(), 0);
        assert_eq!(rd(&mut u, LSR) & LSR_OE, 0);
        for i in 0..16 {
            assert_eq!(rd(&mut u, RBR_THR_DLL), i);
        }
        assert_eq!(rd(&mut u, LSR) & LSR_DR, 0);
    }

    #[test]
    fn overrun_sets_oe_and_line_status_irq() {
        let (mut u, levels, _) = uart();
        wr(&mut u, MCR, MCR_OUT2);
        wr(&mut u, IER_DLM, IER_RDI | IER_RLSI);
        u.push_input(b"ab");
        assert_eq!(levels.take(), vec![true]);
        // Line status outranks received data.
        assert_eq!(rd(&mut u, IIR_FCR), IIR_RLSI);
        let lsr = rd(&mut u, LSR);
        assert_eq!(lsr & (LSR_OE | LSR_DR), LSR_OE | LSR_DR);
        // OE is cleared by the LSR read; data remains.
        assert_eq!(rd(&mut u, IIR_FCR), IIR_RDI);
        assert_eq!(rd(&mut u, LSR) & LSR_OE, 0);
        assert_eq!(rd(&mut u, RBR_THR_DLL), b'a');
        assert!(levels.take().ends_with(&[false]));
    }

    #[test]
    fn priority_data_over_thre() {
        let (mut u, _, _) = uart();
        wr(&mut u, IIR_FCR, FCR_ENABLE);
        wr(&mut u, IER_DLM, IER_RDI | IER_THRI);
        u.push_input(b"z");
        assert_eq!(rd(&mut u, IIR_FCR), IIR_FIFO_ENABLED | IIR_RDI);
        // THRE was not acknowledged by that read.
        rd(&mut u, RBR_THR_DLL);
        assert_eq!(rd(&mut u, IIR_FCR), IIR_FIFO_ENABLED | IIR_THRI);
        assert_eq!(rd(&mut u, IIR_FCR), IIR_FIFO_ENABLED | IIR_NONE);
    }

    #[test]
    fn fcr_clears_rx() {
        let (mut u, _, _) = uart();
        wr(&mut u, IIR_FCR, FCR_ENABLE);
        u.push_input(b"abc");
        wr(&mut u, IIR_FCR, FCR_ENABLE | FCR_CLEAR_RX);
        assert_eq!(rd(&mut u, LSR) & LSR_DR, 0);
        assert_eq!(u.rx_room(), 16);
        u.push_input(b"abc");
        // Turning the FIFO off resets it too, back to one byte of room.
        wr(&mut u, IIR_FCR, 0);
        assert_eq!(rd(&mut u, LSR) & LSR_DR, 0);
        assert_eq!(u.rx_room(), 1);
    }

    #[test]
    fn loopback_echoes_and_maps_modem_lines() {
        let (mut u, levels, sink) = uart();
        wr(
            &mut u,
            MCR,
            MCR_LOOP | MCR_DTR | MCR_RTS | MCR_OUT1 | MCR_OUT2,
        );
        assert_eq!(rd(&mut u, MSR), 0xf0);
        wr(&mut u, MCR, MCR_LOOP | MCR_RTS);
        assert_eq!(rd(&mut u, MSR), MSR_CTS);
        wr(&mut u, MCR, MCR_LOOP);
        assert_eq!(rd(&mut u, MSR), 0);
        assert_eq!(u.rx_room(), 0);
        u.push_input(b"lost");
        assert_eq!(rd(&mut u, LSR) & (LSR_DR | LSR_OE), 0);
        wr(&mut u, RBR_THR_DLL, 0x5a);
        assert_eq!(rd(&mut u, LSR) & LSR_DR, LSR_DR);
        assert_eq!(rd(&mut u, RBR_THR_DLL), 0x5a);
        assert!(sink.bytes().is_empty());
        assert!(levels.take().is_empty());
        wr(&mut u, MCR, 0);
        assert_eq!(rd(&mut u, MSR), 0xb0);
        assert_eq!(u.rx_room(), 1);
    }

    #[test]
    fn scratch_and_wide_access() {
        let (mut u, _, sink) = uart();
        wr(&mut u, SCR, 0xa5);
        let mut d = [0xffu8; 4];
        u.read(SCR, &mut d);
        assert_eq!(d, [0xa5, 0, 0, 0]);
        u.write(RBR_THR_DLL, &[b'w', b'x', 0, 0]);
        assert_eq!(sink.bytes(), b"w");
        u.write(RBR_THR_DLL, &[]);
        u.read(SCR, &mut []);
        assert_eq!(rd(&mut u, 8), 0);
        wr(&mut u, 100, 1);
    }

    /// A copy built from `state()` behaves as the original: the FIFO's
    /// bytes, a pending THRE, a sticky overrun, the line's level and the
    /// byte counts all carry over.
    #[test]
    fn state_round_trip_behaves_identically() {
        let (mut u, levels, sink) = uart();
        wr(&mut u, LCR, LCR_DLAB);
        wr(&mut u, RBR_THR_DLL, 0x01);
        wr(&mut u, LCR, 0x03);
        wr(&mut u, MCR, MCR_OUT2 | MCR_RTS);
        wr(&mut u, IIR_FCR, FCR_ENABLE);
        wr(&mut u, IER_DLM, IER_RDI | IER_THRI | IER_RLSI);
        wr(&mut u, SCR, 0x5a);
        wr(&mut u, RBR_THR_DLL, b'o');
        u.push_input(b"0123456789abcdefXY"); // two bytes overrun
        rd(&mut u, RBR_THR_DLL);
        let s = u.state();
        assert_eq!((s.rx.len(), s.rx_total, s.tx_total, s.overrun, s.irq_level), (15, 18, 1, true, true));
        let (levels2, sink2) = (Levels::default(), Sink::default());
        let mut v = Uart::from_state(&s, Box::new(levels2.clone()), Box::new(sink2.clone())).unwrap();
        assert_eq!(v.state(), s);
        levels.take();
        let drive = |u: &mut Uart| {
            let mut seen = Vec::new();
            for _ in 0..20 {
                seen.extend([rd(u, IIR_FCR), rd(u, LSR), rd(u, RBR_THR_DLL)]);
            }
            wr(u, RBR_THR_DLL, b'k');
            u.push_input(b"z");
            seen.extend([rd(u, IIR_FCR), rd(u, IIR_FCR), rd(u, SCR), rd(u, MSR), u.rx_room() as u8]);
            wr(u, LCR, LCR_DLAB);
            seen.extend([rd(u, RBR_THR_DLL), rd(u, IER_DLM)]);
            seen.extend(u.rx_total().to_le_bytes());
            seen.extend(u.tx_total().to_le_bytes());
            seen
        };
        assert_eq!(drive(&mut u), drive(&mut v));
        assert_eq!(levels.take(), levels2.take());
        assert_eq!(&sink.bytes()[1..], &sink2.bytes()[..]);
        assert_eq!(u.state(), v.state());
    }

    #[test]
    fn impossible_states_are_refused() {
        let (mut u, _, _) = uart();
        let good = u.state();
        let mut s = good.clone();
        s.rx = vec![0; 17];
        assert!(u.restore(&s).unwrap_err().to_string().contains("17 bytes"));
        let mut s = good.clone();
        s.ier = 0x10;
        assert!(u.restore(&s).is_err());
        let mut s = good.clone();
        s.fcr = FCR_CLEAR_RX;
        assert!(u.restore(&s).is_err());
        assert_eq!(u.state(), good);
    }

    #[test]
    fn irq_only_reports_changes() {
        let (mut u, levels, _) = uart();
        wr(&mut u, MCR, MCR_OUT2);
        wr(&mut u, IIR_FCR, FCR_ENABLE);
        wr(&mut u, IER_DLM, IER_RDI);
        u.push_input(b"a");
        u.push_input(b"b");
        rd(&mut u, LSR);
        rd(&mut u, RBR_THR_DLL);
        assert_eq!(levels.take(), vec![true]);
        rd(&mut u, RBR_THR_DLL);
        assert_eq!(levels.take(), vec![false]);
    }
}
