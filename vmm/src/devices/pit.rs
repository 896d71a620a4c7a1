//! 8254 programmable interval timer.
//!
//! Nothing ticks: each counter is a pure function of the guest time since
//! its count was loaded, so the device holds no timer thread and its only
//! nondeterministic input is the clock value, which the VMM records. Only
//! channel 0 drives an interrupt; the VMM arms a host timer for
//! [`Pit::next_deadline_ns`] and calls [`Pit::update`] when it fires (or
//! whenever convenient: update is idempotent until the deadline passes).

use std::fmt;
use std::sync::Arc;

use super::{BusDevice, Clock, DeviceError, IrqLine};
use crate::layout::PIT_HZ;

const NS_PER_SEC: u128 = 1_000_000_000;
const CONTROL: u64 = 3;

const ACCESS_LO: u8 = 1;
const ACCESS_HI: u8 = 2;
const ACCESS_LOHI: u8 = 3;

/// Whole input-clock ticks in `ns` of guest time.
fn ticks(ns: u64) -> u64 {
    (u128::from(ns) * u128::from(PIT_HZ) / NS_PER_SEC) as u64
}

/// The earliest elapsed time at which `ticks()` reaches `t`: rounding up
/// makes the interrupt coincide with the counter reload a guest observes.
fn ns_for_ticks(t: u64) -> u64 {
    let hz = u128::from(PIT_HZ);
    let ns = (u128::from(t) * NS_PER_SEC).div_ceil(hz);
    u64::try_from(ns).unwrap_or(u64::MAX)
}

#[derive(Debug, Clone)]
struct Channel {
    mode: u8,
    access: u8,
    bcd: bool,
    /// Initial count as written; 0 stands for 65536.
    reload: u16,
    /// When the count was loaded; `None` after a control word until a full
    /// count is written, the 8254's "waiting for count" state.
    loaded_at: Option<u64>,
    /// Lohi write flip-flop: the low byte is in, the high byte is next.
    write_hi_next: bool,
    write_lo: u8,
    /// Lohi read flip-flop, shared by latched and live reads as on the chip.
    read_hi_next: bool,
    latched_count: Option<u16>,
    latched_status: Option<u8>,
    /// A count was written but has not been loaded into the counter yet.
    null_count: bool,
}

impl Default for Channel {
    fn default() -> Self {
        Self {
            mode: 0,
            access: ACCESS_LOHI,
            bcd: false,
            reload: 0,
            loaded_at: None,
            write_hi_next: false,
            write_lo: 0,
            read_hi_next: false,
            latched_count: None,
            latched_status: None,
            null_count: false,
        }
    }
}

impl Channel {
    fn period(&self) -> u64 {
        if self.reload == 0 {
            0x1_0000
        } else {
            u64::from(self.reload)
        }
    }

    fn periodic(&self) -> bool {
        matches!(self.mode, 2 | 3)
    }

    fn elapsed_ticks(&self, now: u64) -> Option<u64> {
        self.loaded_at.map(|t| ticks(now.saturating_sub(t)))
    }

    fn count(&self, now: u64) -> u16 {
        let n = self.period();
        let Some(d) = self.elapsed_ticks(now) else {
            // Undefined on the chip; the count as written is as good as any.
            return self.reload;
        };
        let value = match self.mode {
            2 => n - d % n,
            // Counts down by two per tick, twice per period. Exact for even
            // counts, which is what guests program.
            3 => n - (2 * d) % n,
            // One-shot modes keep counting down past zero, wrapping.
            _ => n.wrapping_sub(d),
        };
        value as u16
    }

    fn output(&self, now: u64) -> bool {
        let n = self.period();
        match self.elapsed_ticks(now) {
            // A control word forces OUT low in mode 0, high in the others.
            None => self.mode != 0,
            Some(d) => match self.mode {
                // Low for the one tick the count sits at 1.
                2 => n < 2 || d % n != n - 1,
                3 => d % n < n.div_ceil(2),
                // Modes 1, 4 and 5 are treated like mode 0.
                _ => d >= n,
            },
        }
    }

    fn status(&self, now: u64) -> u8 {
        u8::from(self.output(now)) << 7
            | u8::from(self.null_count) << 6
            | self.access << 4
            | self.mode << 1
            | u8::from(self.bcd)
    }
}

pub struct Pit {
    clock: Arc<dyn Clock>,
    irq0: Box<dyn IrqLine>,
    channels: [Channel; 3],
    /// Next rising edge of channel 0's output. Stored rather than derived,
    /// so the VMM can ask for it without a (recorded) clock read.
    deadline: Option<u64>,
}

impl Pit {
    pub fn new(clock: Arc<dyn Clock>, irq0: Box<dyn IrqLine>) -> Self {
        Self {
            clock,
            irq0,
            channels: Default::default(),
            deadline: None,
        }
    }

    /// Guest time of channel 0's next interrupt edge; `None` while channel 0
    /// is not counting or its one-shot has fired.
    pub fn next_deadline_ns(&self) -> Option<u64> {
        self.deadline
    }

    /// Channel 0's period in ns while it counts periodically (the guest's
    /// timer tick), `None` otherwise.
    pub fn tick_ns(&self) -> Option<u64> {
        let ch = &self.channels[0];
        (self.deadline.is_some() && ch.periodic()).then(|| ns_for_ticks(ch.period()))
    }

    /// Delivers channel 0's interrupt if its deadline has passed. Reads the
    /// clock once, and only while a deadline is pending. Periods missed
    /// since the last call collapse into one edge: the PIC could latch no
    /// more, and guests keep time from a clocksource, not from tick counts.
    pub fn update(&mut self) {
        let Some(deadline) = self.deadline else {
            return;
        };
        let now = self.clock.now_ns();
        if now < deadline {
            return;
        }
        self.irq0.set_level(true);
        self.irq0.set_level(false);
        let ch = &self.channels[0];
        self.deadline = match ch.loaded_at {
            Some(start) if ch.periodic() => {
                let n = ch.period();
                let next = (ticks(now.saturating_sub(start)) / n + 1) * n;
                Some(start.saturating_add(ns_for_ticks(next)))
            }
            _ => None,
        };
    }

    /// OUT of channel 2 (the speaker / calibration channel), with its gate
    /// taken as always high.
    pub fn channel2_out(&self) -> bool {
        let ch = &self.channels[2];
        let now = if ch.loaded_at.is_some() {
            self.clock.now_ns()
        } else {
            0
        };
        ch.output(now)
    }

    fn load(&mut self, idx: usize, reload: u16) {
        let now = self.clock.now_ns();
        let ch = &mut self.channels[idx];
        ch.reload = reload;
        ch.loaded_at = Some(now);
        ch.null_count = false;
        if idx == 0 {
            self.deadline = Some(now.saturating_add(ns_for_ticks(ch.period())));
        }
    }

    fn stop(&mut self, idx: usize) {
        self.channels[idx].loaded_at = None;
        if idx == 0 {
            self.deadline = None;
        }
    }

    fn write_count(&mut self, idx: usize, v: u8) {
        let ch = &mut self.channels[idx];
        match ch.access {
            ACCESS_LO => self.load(idx, u16::from(v)),
            ACCESS_HI => self.load(idx, u16::from(v) << 8),
            _ if !ch.write_hi_next => {
                ch.write_lo = v;
                ch.write_hi_next = true;
                ch.null_count = true;
                // Mode 0 stops counting at the first byte of a new count.
                if ch.mode == 0 {
                    self.stop(idx);
                }
            }
            _ => {
                ch.write_hi_next = false;
                let lo = ch.write_lo;
                self.load(idx, u16::from_le_bytes([lo, v]));
            }
        }
    }

    fn read_count(&mut self, idx: usize) -> u8 {
        if let Some(status) = self.channels[idx].latched_status.take() {
            return status;
        }
        let ch = &self.channels[idx];
        let value = match ch.latched_count {
            Some(v) => v,
            None if ch.loaded_at.is_some() => ch.count(self.clock.now_ns()),
            None => ch.count(0),
        };
        let ch = &mut self.channels[idx];
        let [lo, hi] = value.to_le_bytes();
        let (byte, done) = match ch.access {
            ACCESS_LO => (lo, true),
            ACCESS_HI => (hi, true),
            _ if !ch.read_hi_next => {
                ch.read_hi_next = true;
                (lo, false)
            }
            _ => {
                ch.read_hi_next = false;
                (hi, true)
            }
        };
        if done {
            ch.latched_count = None;
        }
        byte
    }

    fn latch_count(&mut self, idx: usize, now: u64) {
        let ch = &mut self.channels[idx];
        // A second latch before the first is read is ignored.
        if ch.latched_count.is_none() {
            ch.latched_count = Some(ch.count(now));
        }
    }

    fn write_control(&mut self, v: u8) {
        let sel = v >> 6;
        let access = (v >> 4) & 3;
        if sel == 3 {
            self.read_back(v);
            return;
        }
        let idx = usize::from(sel);
        if access == 0 {
            let now = self.now_if(self.channels[idx].loaded_at.is_some());
            self.latch_count(idx, now);
            return;
        }
        let mut mode = (v >> 1) & 7;
        if mode >= 6 {
            // Modes 6 and 7 are the chip's aliases of 2 and 3.
            mode -= 4;
        }
        self.channels[idx] = Channel {
            mode,
            access,
            bcd: v & 1 != 0,
            reload: self.channels[idx].reload,
            null_count: true,
            ..Channel::default()
        };
        self.stop(idx);
    }

    fn read_back(&mut self, v: u8) {
        let latch_count = v & 0x20 == 0;
        let latch_status = v & 0x10 == 0;
        let selected: Vec<usize> = (0..3).filter(|i| v & (2 << i) != 0).collect();
        let counting = selected
            .iter()
            .any(|&i| self.channels[i].loaded_at.is_some());
        let now = self.now_if(counting && (latch_count || latch_status));
        for i in selected {
            if latch_count {
                self.latch_count(i, now);
            }
            let ch = &mut self.channels[i];
            if latch_status && ch.latched_status.is_none() {
                ch.latched_status = Some(ch.status(now));
            }
        }
    }

    /// Reads the clock only when the answer depends on it, keeping the
    /// record log free of values nobody used.
    fn now_if(&self, needed: bool) -> u64 {
        if needed {
            self.clock.now_ns()
        } else {
            0
        }
    }
}

/// One counter of the 8254, as plain data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PitChannelState {
    /// Counting mode, 0-5.
    pub mode: u8,
    /// Access: 1 low byte, 2 high byte, 3 low then high.
    pub access: u8,
    pub bcd: bool,
    /// Initial count as written; 0 stands for 65536.
    pub reload: u16,
    /// Guest time (ns) the count was loaded; `None` while waiting for one.
    pub loaded_at: Option<u64>,
    pub write_hi_next: bool,
    pub write_lo: u8,
    pub read_hi_next: bool,
    pub latched_count: Option<u16>,
    pub latched_status: Option<u8>,
    pub null_count: bool,
}

/// The 8254, as plain data: its three counters and channel 0's next
/// interrupt edge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PitState {
    pub channels: [PitChannelState; 3],
    /// Guest time (ns) of channel 0's next interrupt edge.
    pub deadline: Option<u64>,
}

impl Channel {
    fn state(&self) -> PitChannelState {
        // Exhaustive: a new field of `Channel` must be added to the state.
        let Channel {
            mode, access, bcd, reload, loaded_at, write_hi_next, write_lo, read_hi_next, latched_count,
            latched_status, null_count,
        } = *self;
        PitChannelState {
            mode, access, bcd, reload, loaded_at, write_hi_next, write_lo, read_hi_next, latched_count,
            latched_status, null_count,
        }
    }

    fn from_state(s: &PitChannelState) -> Channel {
        let PitChannelState {
            mode, access, bcd, reload, loaded_at, write_hi_next, write_lo, read_hi_next, latched_count,
            latched_status, null_count,
        } = *s;
        Channel {
            mode, access, bcd, reload, loaded_at, write_hi_next, write_lo, read_hi_next, latched_count,
            latched_status, null_count,
        }
    }
}

impl PitState {
    /// Refuses values no 8254 can hold.
    pub fn check(&self) -> Result<(), DeviceError> {
        for (i, c) in self.channels.iter().enumerate() {
            if c.mode > 5 {
                return Err(DeviceError::bad("PIT", format!("channel {i}: mode {} (0-5)", c.mode)));
            }
            if !(1..=3).contains(&c.access) {
                return Err(DeviceError::bad("PIT", format!("channel {i}: access mode {} (1-3)", c.access)));
            }
        }
        Ok(())
    }
}

impl Pit {
    /// Everything that decides the timer's future behaviour (its clock and
    /// interrupt line are wiring, not state).
    pub fn state(&self) -> PitState {
        PitState { channels: [0, 1, 2].map(|i| self.channels[i].state()), deadline: self.deadline }
    }

    /// A timer in state `s`, reading `clock` and driving `irq0`.
    pub fn from_state(s: &PitState, clock: Arc<dyn Clock>, irq0: Box<dyn IrqLine>) -> Result<Pit, DeviceError> {
        let mut p = Pit::new(clock, irq0);
        p.restore(s)?;
        Ok(p)
    }

    /// Puts this timer in state `s`, keeping its wiring; unchanged if `s`
    /// is refused. Drives no interrupt line: the PIC's state has the levels.
    pub fn restore(&mut self, s: &PitState) -> Result<(), DeviceError> {
        s.check()?;
        self.channels = s.channels.map(|c| Channel::from_state(&c));
        self.deadline = s.deadline;
        Ok(())
    }
}

impl BusDevice for Pit {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if data.is_empty() {
            return;
        }
        data.fill(0);
        if offset < CONTROL {
            data[0] = self.read_count(offset as usize);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&v) = data.first() else {
            return;
        };
        match offset {
            0..=2 => self.write_count(offset as usize, v),
            CONTROL => self.write_control(v),
            _ => {}
        }
    }
}

impl fmt::Debug for Pit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pit")
            .field("channels", &self.channels)
            .field("deadline", &self.deadline)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::test_support::{rd, wr, Levels, ManualClock};

    fn pit() -> (Pit, Arc<ManualClock>, Levels) {
        let clock = Arc::new(ManualClock::default());
        let levels = Levels::default();
        let p = Pit::new(clock.clone(), Box::new(levels.clone()));
        (p, clock, levels)
    }

    /// Channel `ch`, lohi access, `mode`, count `n`.
    fn program(p: &mut Pit, ch: u8, mode: u8, n: u16) {
        wr(p, CONTROL, ch << 6 | 0x30 | mode << 1);
        let [lo, hi] = n.to_le_bytes();
        wr(p, u64::from(ch), lo);
        wr(p, u64::from(ch), hi);
    }

    fn latched(p: &mut Pit, ch: u8) -> u16 {
        wr(p, CONTROL, ch << 6);
        let lo = rd(p, u64::from(ch));
        let hi = rd(p, u64::from(ch));
        u16::from_le_bytes([lo, hi])
    }

    const TICK_NS: u64 = 1_000_000_000 / PIT_HZ + 1;

    #[test]
    fn hundred_hz_rate_generator() {
        let (mut p, clock, irq) = pit();
        assert_eq!(p.next_deadline_ns(), None);
        let n = (PIT_HZ / 100) as u16 + 1; // 11932, as Linux computes it
        program(&mut p, 0, 2, n);
        let d = p.next_deadline_ns().unwrap();
        assert!(d.abs_diff(10_000_000) <= TICK_NS, "{d}");
        clock.set(d - 1);
        p.update();
        assert!(irq.take().is_empty());
        clock.set(d);
        p.update();
        assert_eq!(irq.take(), vec![true, false]);
        p.update();
        assert!(irq.take().is_empty());
        let d2 = p.next_deadline_ns().unwrap();
        assert!((d2 - d).abs_diff(10_000_000) <= TICK_NS, "{d2}");
        // At the edge the counter has just reloaded.
        clock.set(d2);
        assert_eq!(latched(&mut p, 0), n);
    }

    #[test]
    fn missed_periods_collapse() {
        let (mut p, clock, irq) = pit();
        program(&mut p, 0, 2, 11932);
        clock.set(55_000_000);
        p.update();
        assert_eq!(irq.take(), vec![true, false]);
        let d = p.next_deadline_ns().unwrap();
        assert!(d > 55_000_000 && d <= 60_001_000, "{d}");
    }

    #[test]
    fn update_without_deadline_reads_no_clock() {
        let (mut p, clock, irq) = pit();
        p.update();
        assert_eq!(clock.reads(), 0);
        wr(&mut p, CONTROL, 0x34);
        p.update();
        assert_eq!(clock.reads(), 0);
        assert!(irq.take().is_empty());
    }

    #[test]
    fn counter_decreases_with_time() {
        let (mut p, clock, _) = pit();
        program(&mut p, 0, 2, 10000);
        assert_eq!(latched(&mut p, 0), 10000);
        clock.set(1_000_000); // 1193 ticks
        assert_eq!(latched(&mut p, 0), 10000 - 1193);
        clock.set(5_000_000); // 5965 ticks
        assert_eq!(latched(&mut p, 0), 10000 - 5965);
        // Wraps back to the reload value each period.
        clock.set(ns_for_ticks(10000 + 5));
        assert_eq!(latched(&mut p, 0), 10000 - 5);
    }

    #[test]
    fn latch_holds_value_until_read() {
        let (mut p, clock, _) = pit();
        program(&mut p, 0, 2, 50000);
        clock.set(1_000_000);
        wr(&mut p, CONTROL, 0x00);
        clock.set(2_000_000);
        // A second latch does not overwrite the first.
        wr(&mut p, CONTROL, 0x00);
        let lo = rd(&mut p, 0);
        clock.set(3_000_000);
        let hi = rd(&mut p, 0);
        assert_eq!(u16::from_le_bytes([lo, hi]), 50000 - 1193);
        // Released: live reads follow the clock again.
        assert_eq!(latched(&mut p, 0), 50000 - ticks(3_000_000) as u16);
    }

    #[test]
    fn lohi_flip_flops() {
        let (mut p, clock, _) = pit();
        program(&mut p, 2, 0, 0x1234);
        // Live reads alternate low, high.
        assert_eq!(rd(&mut p, 2), 0x34);
        assert_eq!(rd(&mut p, 2), 0x12);
        assert_eq!(rd(&mut p, 2), 0x34);
        // A control word resets the read flip-flop.
        wr(&mut p, CONTROL, 0xb0);
        wr(&mut p, 2, 0x78);
        wr(&mut p, 2, 0x56);
        clock.set(0);
        assert_eq!(rd(&mut p, 2), 0x78);
        assert_eq!(rd(&mut p, 2), 0x56);
    }

    #[test]
    fn lo_and_hi_only_access() {
        let (mut p, _, _) = pit();
        wr(&mut p, CONTROL, 0x50); // ch1, lo only, mode 0
        wr(&mut p, 1, 0x42);
        assert_eq!(rd(&mut p, 1), 0x42);
        assert_eq!(rd(&mut p, 1), 0x42);
        wr(&mut p, CONTROL, 0x64); // ch1, hi only, mode 2
        wr(&mut p, 1, 0x12);
        assert_eq!(rd(&mut p, 1), 0x12);
        wr(&mut p, CONTROL, 0x40);
        assert_eq!(rd(&mut p, 1), 0x12);
    }

    #[test]
    fn read_back_status_and_count() {
        let (mut p, clock, _) = pit();
        wr(&mut p, CONTROL, 0x34);
        // Waiting for a count: null count set, mode 2 output high.
        wr(&mut p, CONTROL, 0xe2); // status only, ch0
        assert_eq!(rd(&mut p, 0), 0x80 | 0x40 | 0x30 | 0x04);
        wr(&mut p, 0, 0x00);
        wr(&mut p, 0, 0x10);
        clock.set(ns_for_ticks(100));
        // Count and status of channels 0 and 2 (2 is idle, mode 0, low).
        wr(&mut p, CONTROL, 0xca);
        assert_eq!(rd(&mut p, 0), 0x80 | 0x30 | 0x04);
        assert_eq!(rd(&mut p, 0), 0x9c);
        assert_eq!(rd(&mut p, 0), 0x0f);
        assert_eq!(rd(&mut p, 2), 0x30);
        // Mode 3 with BCD reports the bit.
        wr(&mut p, CONTROL, 0x37);
        wr(&mut p, CONTROL, 0xe2);
        assert_eq!(rd(&mut p, 0), 0x80 | 0x40 | 0x30 | 0x06 | 0x01);
    }

    #[test]
    fn mode0_one_shot() {
        let (mut p, clock, irq) = pit();
        clock.set(1_000);
        program(&mut p, 0, 0, 1000);
        let d = p.next_deadline_ns().unwrap();
        assert_eq!(d, 1_000 + ns_for_ticks(1000));
        wr(&mut p, CONTROL, 0xe2);
        assert_eq!(rd(&mut p, 0) & 0x80, 0);
        clock.set(d);
        p.update();
        assert_eq!(irq.take(), vec![true, false]);
        assert_eq!(p.next_deadline_ns(), None);
        wr(&mut p, CONTROL, 0xe2);
        assert_eq!(rd(&mut p, 0) & 0x80, 0x80);
        // Keeps counting down through zero.
        clock.set(d + ns_for_ticks(10));
        assert_eq!(latched(&mut p, 0), 0u16.wrapping_sub(10));
        clock.set(d * 10);
        p.update();
        assert!(irq.take().is_empty());
    }

    #[test]
    fn mode0_first_byte_stops_counting() {
        let (mut p, clock, _) = pit();
        program(&mut p, 0, 0, 1000);
        wr(&mut p, 0, 0x10);
        assert_eq!(p.next_deadline_ns(), None);
        clock.set(5_000);
        wr(&mut p, 0, 0x00);
        assert_eq!(p.next_deadline_ns(), Some(5_000 + ns_for_ticks(16)));
    }

    #[test]
    fn reload_zero_is_65536() {
        let (mut p, clock, _) = pit();
        program(&mut p, 0, 2, 0);
        let d = p.next_deadline_ns().unwrap();
        assert_eq!(d, ns_for_ticks(65536));
        assert!(d.abs_diff(54_925_000) < 1_000, "{d}");
        assert_eq!(latched(&mut p, 0), 0);
        clock.set(ns_for_ticks(1));
        assert_eq!(latched(&mut p, 0), 65535);
    }

    #[test]
    fn square_wave() {
        let (mut p, clock, irq) = pit();
        program(&mut p, 0, 3, 1000);
        assert_eq!(p.next_deadline_ns(), Some(ns_for_ticks(1000)));
        clock.set(ns_for_ticks(100));
        assert_eq!(latched(&mut p, 0), 800);
        wr(&mut p, CONTROL, 0xe2);
        assert_eq!(rd(&mut p, 0) & 0x80, 0x80);
        clock.set(ns_for_ticks(600));
        wr(&mut p, CONTROL, 0xe2);
        assert_eq!(rd(&mut p, 0) & 0x80, 0);
        clock.set(ns_for_ticks(1000));
        p.update();
        assert_eq!(irq.take(), vec![true, false]);
        assert_eq!(p.next_deadline_ns(), Some(ns_for_ticks(2000)));
    }

    #[test]
    fn control_word_stops_channel0() {
        let (mut p, _, _) = pit();
        program(&mut p, 0, 2, 1000);
        assert!(p.next_deadline_ns().is_some());
        wr(&mut p, CONTROL, 0x30);
        assert_eq!(p.next_deadline_ns(), None);
    }

    #[test]
    fn reprogramming_restarts_from_now() {
        let (mut p, clock, _) = pit();
        program(&mut p, 0, 2, 1000);
        clock.set(123_456);
        program(&mut p, 0, 2, 2000);
        assert_eq!(p.next_deadline_ns(), Some(123_456 + ns_for_ticks(2000)));
        assert_eq!(latched(&mut p, 0), 2000);
    }

    #[test]
    fn channel2_output() {
        let (mut p, clock, _) = pit();
        assert!(!p.channel2_out());
        program(&mut p, 2, 3, 100);
        assert!(p.channel2_out());
        clock.set(ns_for_ticks(60));
        assert!(!p.channel2_out());
        clock.set(ns_for_ticks(100));
        assert!(p.channel2_out());
        // Channel 2 never touches IRQ0.
        assert_eq!(p.next_deadline_ns(), None);
    }

    #[test]
    fn rate_generator_output_low_for_one_tick() {
        let (mut p, clock, _) = pit();
        program(&mut p, 2, 2, 10);
        clock.set(ns_for_ticks(8));
        assert!(p.channel2_out());
        clock.set(ns_for_ticks(9));
        assert!(!p.channel2_out());
        clock.set(ns_for_ticks(10));
        assert!(p.channel2_out());
    }

    /// A copy built from `state()` behaves as the original: counter reads
    /// (mid-latch, mid-flip-flop), interrupts and deadlines, in every
    /// channel, as time moves on.
    #[test]
    fn state_round_trip_behaves_identically() {
        let (mut p, clock, irq) = pit();
        clock.set(1_000);
        program(&mut p, 0, 2, 11932);
        program(&mut p, 2, 3, 1000);
        wr(&mut p, CONTROL, 0x70); // ch1 lohi mode 0, waiting for a count
        wr(&mut p, 1, 0x34); // half a count
        clock.set(3_000_000);
        wr(&mut p, CONTROL, 0x80); // latch ch2
        rd(&mut p, 2); // low byte read: flip-flop mid-way
        wr(&mut p, CONTROL, 0xe2); // status of ch0 latched
        clock.set(12_000_000);
        p.update();
        assert_eq!(irq.take(), vec![true, false]);
        let s = p.state();
        let levels2 = Levels::default();
        let mut q = Pit::from_state(&s, clock.clone(), Box::new(levels2.clone())).unwrap();
        assert_eq!(q.state(), s);
        let drive = |p: &mut Pit, irq: &Levels| {
            clock.set(12_000_000);
            let mut seen = vec![rd(p, 0), rd(p, 2)];
            wr(p, 1, 0x12);
            for t in [15_000_000u64, 20_000_001, 20_500_000, 41_000_000] {
                clock.set(t);
                p.update();
                seen.extend(irq.take().into_iter().map(u8::from));
                seen.extend([rd(p, 0), rd(p, 0), rd(p, 1), rd(p, 1), rd(p, 2), u8::from(p.channel2_out())]);
                seen.extend(p.next_deadline_ns().unwrap_or(0).to_le_bytes());
            }
            seen
        };
        let a = drive(&mut p, &irq);
        let b = drive(&mut q, &levels2);
        assert_eq!(a, b);
        assert_eq!(p.state(), q.state());
    }

    #[test]
    fn impossible_states_are_refused() {
        let (mut p, _, _) = pit();
        let mut s = p.state();
        s.channels[1].mode = 6;
        assert!(p.restore(&s).unwrap_err().to_string().contains("channel 1: mode 6"));
        let mut s = p.state();
        s.channels[2].access = 0;
        assert!(p.restore(&s).is_err());
        assert_eq!(p.state(), Pit::new(Arc::new(ManualClock::default()), Box::new(Levels::default())).state());
    }

    #[test]
    fn wide_and_stray_accesses() {
        let (mut p, _, _) = pit();
        p.write(CONTROL, &[0x34, 0xff, 0xff, 0xff]);
        p.write(0, &[0x10, 0xff]);
        p.write(0, &[0x00, 0xff]);
        let mut d = [0xff; 4];
        p.read(0, &mut d);
        assert_eq!(d, [0x10, 0, 0, 0]);
        p.read(CONTROL, &mut d);
        assert_eq!(d, [0; 4]);
        p.write(7, &[1]);
        p.write(0, &[]);
        p.read(0, &mut []);
    }
}
