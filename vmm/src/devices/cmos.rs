//! MC146818 CMOS RTC and NVRAM.
//!
//! Wall-clock time is derived from a base the VMM chooses (and records)
//! plus guest time, never from the host clock, so a replayed guest reads
//! the same dates. The RTC never "ticks" on its own: there are no update,
//! alarm or periodic interrupts and the update-in-progress bit is never
//! set, which is all a guest that merely reads the time needs.

use std::fmt;
use std::sync::Arc;

use super::{BusDevice, Clock, DeviceError};

const INDEX: u64 = 0;
const DATA: u64 = 1;

const SECONDS: u8 = 0x00;
const SECONDS_ALARM: u8 = 0x01;
const MINUTES: u8 = 0x02;
const MINUTES_ALARM: u8 = 0x03;
const HOURS: u8 = 0x04;
const HOURS_ALARM: u8 = 0x05;
const WEEKDAY: u8 = 0x06;
const DAY: u8 = 0x07;
const MONTH: u8 = 0x08;
const YEAR: u8 = 0x09;
const STATUS_A: u8 = 0x0a;
const STATUS_B: u8 = 0x0b;
const STATUS_C: u8 = 0x0c;
const STATUS_D: u8 = 0x0d;
const CENTURY: u8 = 0x32;

/// 32.768 kHz time base, 1024 Hz periodic rate: the usual PC setting.
const STATUS_A_DEFAULT: u8 = 0x26;
/// Update in progress; always reads 0 since time updates are atomic here.
const STATUS_A_UIP: u8 = 0x80;
const STATUS_B_DEFAULT: u8 = STATUS_B_24H;
const STATUS_B_24H: u8 = 0x02;
const STATUS_B_BINARY: u8 = 0x04;
/// Valid RAM and time: the battery is never flat.
const STATUS_D_VRT: u8 = 0x80;

const NS_PER_SEC: u64 = 1_000_000_000;
const SECS_PER_DAY: u64 = 86_400;

/// A UTC calendar time broken into RTC fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct DateTime {
    year: u64,
    month: u8,
    day: u8,
    hour: u8,
    minute: u8,
    second: u8,
    /// 1 = Sunday, as the RTC counts.
    weekday: u8,
}

/// (year, month 1-12, day 1-31) of `days` since 1970-01-01, proleptic
/// Gregorian (Howard Hinnant's civil_from_days, unsigned because the RTC
/// never shows dates before the epoch).
fn civil_from_days(days: u64) -> (u64, u8, u8) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u8;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u8;
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

fn datetime(secs: u64) -> DateTime {
    let days = secs / SECS_PER_DAY;
    let rem = secs % SECS_PER_DAY;
    let (year, month, day) = civil_from_days(days);
    DateTime {
        year,
        month,
        day,
        hour: (rem / 3600) as u8,
        minute: (rem / 60 % 60) as u8,
        second: (rem % 60) as u8,
        // 1970-01-01 was a Thursday.
        weekday: ((days + 4) % 7) as u8 + 1,
    }
}

fn to_bcd(v: u8) -> u8 {
    ((v / 10) << 4) | (v % 10)
}

pub struct Cmos {
    clock: Arc<dyn Clock>,
    wall_base_secs: u64,
    index: u8,
    /// Backing bytes for every register that is plain storage (alarms,
    /// status A/B, NVRAM); the time registers are computed instead.
    ram: [u8; 128],
}

impl Cmos {
    pub fn new(clock: Arc<dyn Clock>, wall_base_secs: u64) -> Self {
        let mut ram = [0u8; 128];
        ram[usize::from(STATUS_A)] = STATUS_A_DEFAULT;
        ram[usize::from(STATUS_B)] = STATUS_B_DEFAULT;
        Self {
            clock,
            wall_base_secs,
            index: 0,
            ram,
        }
    }

    /// Sets the UTC time, in seconds since the Unix epoch, that guest time
    /// zero corresponds to.
    pub fn set_wall_base(&mut self, secs: u64) {
        self.wall_base_secs = secs;
    }

    /// Fills an NVRAM byte (memory size, equipment...) before boot. The
    /// time and status C/D registers, and the century byte 0x32, are
    /// computed on read, so setting them has no visible effect.
    pub fn set_ram(&mut self, idx: u8, v: u8) {
        self.ram[usize::from(idx & 0x7f)] = v;
    }

    fn binary(&self) -> bool {
        self.ram[usize::from(STATUS_B)] & STATUS_B_BINARY != 0
    }

    /// Encodes a value in the format status B selects.
    fn encode(&self, v: u8) -> u8 {
        if self.binary() {
            v
        } else {
            to_bcd(v)
        }
    }

    fn encode_hour(&self, hour: u8) -> u8 {
        if self.ram[usize::from(STATUS_B)] & STATUS_B_24H != 0 {
            return self.encode(hour);
        }
        // 12-hour mode: 12, 1, ..., 11 with bit 7 marking PM.
        let h12 = match hour % 12 {
            0 => 12,
            h => h,
        };
        let pm = if hour >= 12 { 0x80 } else { 0 };
        self.encode(h12) | pm
    }

    fn read_time(&self, reg: u8) -> u8 {
        // Saturating: a damaged log's wall clock must not overflow here.
        let secs = self.wall_base_secs.saturating_add(self.clock.now_ns() / NS_PER_SEC);
        let t = datetime(secs);
        match reg {
            SECONDS => self.encode(t.second),
            MINUTES => self.encode(t.minute),
            HOURS => self.encode_hour(t.hour),
            WEEKDAY => self.encode(t.weekday),
            DAY => self.encode(t.day),
            MONTH => self.encode(t.month),
            YEAR => self.encode((t.year % 100) as u8),
            _ => self.encode((t.year / 100 % 100) as u8),
        }
    }

    fn read_data(&mut self) -> u8 {
        match self.index {
            SECONDS | MINUTES | HOURS | WEEKDAY | DAY | MONTH | YEAR | CENTURY => {
                self.read_time(self.index)
            }
            STATUS_A => self.ram[usize::from(STATUS_A)] & !STATUS_A_UIP,
            // No interrupt flag is ever raised, so reading (and thereby
            // clearing) status C always finds it empty.
            STATUS_C => 0,
            STATUS_D => STATUS_D_VRT,
            // Alarms are plain storage: with no update cycle they never fire.
            i @ (SECONDS_ALARM | MINUTES_ALARM | HOURS_ALARM) => self.ram[usize::from(i)],
            i => self.ram[usize::from(i)],
        }
    }

    fn write_data(&mut self, v: u8) {
        match self.index {
            // The time follows guest time from a base the VMM owns; a guest
            // setting the clock (hwclock --systohc) is ignored rather than
            // opening another input to record.
            SECONDS | MINUTES | HOURS | WEEKDAY | DAY | MONTH | YEAR | CENTURY => {}
            STATUS_C | STATUS_D => {}
            STATUS_A => self.ram[usize::from(STATUS_A)] = v & !STATUS_A_UIP,
            i => self.ram[usize::from(i)] = v,
        }
    }
}

/// Latest wall-clock base a state may hold: about 34,800 years after
/// 1970, far past any real date, far from overflowing the date arithmetic.
const MAX_WALL_BASE: u64 = 1 << 40;

/// The RTC and its NVRAM, as plain data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CmosState {
    /// UTC seconds since the epoch at guest time zero.
    pub wall_base_secs: u64,
    /// The selected register, 0-0x7f.
    pub index: u8,
    /// Registers that are plain storage (alarms, status A/B, NVRAM).
    pub ram: [u8; 128],
}

impl CmosState {
    /// Refuses values no RTC can hold.
    pub fn check(&self) -> Result<(), DeviceError> {
        if self.index > 0x7f {
            return Err(DeviceError::bad("CMOS", format!("register index {:#x} (at most 0x7f)", self.index)));
        }
        if self.wall_base_secs > MAX_WALL_BASE {
            return Err(DeviceError::bad("CMOS", format!("wall-clock base {} s is past any date", self.wall_base_secs)));
        }
        Ok(())
    }
}

impl Cmos {
    /// Everything that decides the RTC's future behaviour (its clock is
    /// wiring, not state).
    pub fn state(&self) -> CmosState {
        // Exhaustive: a new field of `Cmos` must be added to the state.
        let Cmos { clock: _, wall_base_secs, index, ram } = self;
        CmosState { wall_base_secs: *wall_base_secs, index: *index, ram: *ram }
    }

    /// An RTC in state `s`, reading `clock`.
    pub fn from_state(s: &CmosState, clock: Arc<dyn Clock>) -> Result<Cmos, DeviceError> {
        let mut c = Cmos::new(clock, 0);
        c.restore(s)?;
        Ok(c)
    }

    /// Puts this RTC in state `s`, keeping its clock; unchanged if `s` is
    /// refused.
    pub fn restore(&mut self, s: &CmosState) -> Result<(), DeviceError> {
        s.check()?;
        (self.wall_base_secs, self.index, self.ram) = (s.wall_base_secs, s.index, s.ram);
        Ok(())
    }
}

impl BusDevice for Cmos {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if data.is_empty() {
            return;
        }
        data.fill(0);
        if offset == DATA {
            data[0] = self.read_data();
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&v) = data.first() else {
            return;
        };
        match offset {
            // Bit 7 of the index port is the NMI mask on a PC, not part of
            // the address.
            INDEX => self.index = v & 0x7f,
            DATA => self.write_data(v),
            _ => {}
        }
    }
}

impl fmt::Debug for Cmos {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cmos")
            .field("wall_base_secs", &self.wall_base_secs)
            .field("index", &self.index)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::test_support::ManualClock;

    fn cmos(base: u64) -> (Cmos, Arc<ManualClock>) {
        let clock = Arc::new(ManualClock::default());
        (Cmos::new(clock.clone(), base), clock)
    }

    fn reg(c: &mut Cmos, idx: u8) -> u8 {
        c.write(INDEX, &[idx]);
        let mut d = [0xff];
        c.read(DATA, &mut d);
        d[0]
    }

    fn set(c: &mut Cmos, idx: u8, v: u8) {
        c.write(INDEX, &[idx]);
        c.write(DATA, &[v]);
    }

    /// Reads sec, min, hour, weekday, day, month, year, century.
    fn all(c: &mut Cmos) -> [u8; 8] {
        [SECONDS, MINUTES, HOURS, WEEKDAY, DAY, MONTH, YEAR, CENTURY].map(|r| reg(c, r))
    }

    #[test]
    fn epoch() {
        let (mut c, _) = cmos(0);
        // Thursday 1970-01-01 00:00:00, BCD.
        assert_eq!(all(&mut c), [0, 0, 0, 5, 0x01, 0x01, 0x70, 0x19]);
    }

    #[test]
    fn leap_day_and_guest_time() {
        // 2024-02-29 23:59:58 UTC, a Thursday.
        let (mut c, clock) = cmos(1_709_251_198);
        assert_eq!(all(&mut c), [0x58, 0x59, 0x23, 5, 0x29, 0x02, 0x24, 0x20]);
        // Two and a half seconds of guest time later: Friday 1 March.
        clock.set(2_500_000_000);
        assert_eq!(all(&mut c), [0x00, 0x00, 0x00, 6, 0x01, 0x03, 0x24, 0x20]);
    }

    #[test]
    fn century_boundaries() {
        // 2000-02-29 (2000 is leap), a Tuesday.
        let (mut c, _) = cmos(951_782_400);
        assert_eq!(all(&mut c), [0, 0, 0, 3, 0x29, 0x02, 0x00, 0x20]);
        // 2100-03-01 follows 2100-02-28 (2100 is not leap); a Monday.
        c.set_wall_base(4_107_542_400);
        assert_eq!(all(&mut c), [0, 0, 0, 2, 0x01, 0x03, 0x00, 0x21]);
    }

    #[test]
    fn civil_matches_naive_calendar() {
        let leap =
            |y: u64| y.is_multiple_of(4) && (!y.is_multiple_of(100) || y.is_multiple_of(400));
        let (mut y, mut m, mut d) = (1970u64, 1u8, 1u8);
        for days in 0..(400 * 366) {
            assert_eq!(civil_from_days(days), (y, m, d), "day {days}");
            let len = match m {
                2 if leap(y) => 29,
                2 => 28,
                4 | 6 | 9 | 11 => 30,
                _ => 31,
            };
            d += 1;
            if d > len {
                d = 1;
                m += 1;
                if m > 12 {
                    m = 1;
                    y += 1;
                }
            }
        }
    }

    #[test]
    fn binary_and_12_hour_modes() {
        // 1999-12-31 13:45:07 UTC, a Friday.
        let (mut c, _) = cmos(946_647_907);
        assert_eq!(reg(&mut c, STATUS_B), STATUS_B_24H);
        assert_eq!(all(&mut c), [0x07, 0x45, 0x13, 6, 0x31, 0x12, 0x99, 0x19]);
        set(&mut c, STATUS_B, STATUS_B_24H | STATUS_B_BINARY);
        assert_eq!(all(&mut c), [7, 45, 13, 6, 31, 12, 99, 19]);
        set(&mut c, STATUS_B, STATUS_B_BINARY);
        assert_eq!(reg(&mut c, HOURS), 0x80 | 1);
        set(&mut c, STATUS_B, 0);
        assert_eq!(reg(&mut c, HOURS), 0x81);
        // Midnight is 12 AM; noon is 12 PM.
        c.set_wall_base(946_684_800);
        assert_eq!(reg(&mut c, HOURS), 0x12);
        c.set_wall_base(946_684_800 + 12 * 3600);
        assert_eq!(reg(&mut c, HOURS), 0x92);
    }

    #[test]
    fn status_registers() {
        let (mut c, _) = cmos(0);
        assert_eq!(reg(&mut c, STATUS_A), 0x26);
        set(&mut c, STATUS_A, 0xa6);
        assert_eq!(reg(&mut c, STATUS_A), 0x26);
        set(&mut c, STATUS_C, 0xff);
        assert_eq!(reg(&mut c, STATUS_C), 0);
        assert_eq!(reg(&mut c, STATUS_C), 0);
        set(&mut c, STATUS_D, 0);
        assert_eq!(reg(&mut c, STATUS_D), 0x80);
    }

    #[test]
    fn only_time_registers_read_the_clock() {
        let (mut c, clock) = cmos(0);
        for r in [
            STATUS_A,
            STATUS_B,
            STATUS_C,
            STATUS_D,
            SECONDS_ALARM,
            0x10,
            0x7f,
        ] {
            reg(&mut c, r);
        }
        assert_eq!(clock.reads(), 0);
        reg(&mut c, SECONDS);
        reg(&mut c, CENTURY);
        assert_eq!(clock.reads(), 2);
    }

    #[test]
    fn alarms_and_ram_are_storage() {
        let (mut c, _) = cmos(0);
        for (r, v) in [
            (SECONDS_ALARM, 0x11),
            (MINUTES_ALARM, 0x22),
            (HOURS_ALARM, 0x33),
        ] {
            set(&mut c, r, v);
            assert_eq!(reg(&mut c, r), v);
        }
        assert_eq!(reg(&mut c, 0x0e), 0);
        assert_eq!(reg(&mut c, 0x7f), 0);
        set(&mut c, 0x40, 0xab);
        assert_eq!(reg(&mut c, 0x40), 0xab);
        c.set_ram(0x34, 0x12);
        c.set_ram(0xb5, 0x34);
        assert_eq!(reg(&mut c, 0x34), 0x12);
        assert_eq!(reg(&mut c, 0x35), 0x34);
    }

    #[test]
    fn time_writes_ignored() {
        let (mut c, _) = cmos(0);
        set(&mut c, SECONDS, 0x30);
        set(&mut c, YEAR, 0x99);
        set(&mut c, CENTURY, 0x21);
        assert_eq!(all(&mut c), [0, 0, 0, 5, 0x01, 0x01, 0x70, 0x19]);
    }

    /// A copy built from `state()` reads the same dates, NVRAM and
    /// selected register as the original.
    #[test]
    fn state_round_trip_behaves_identically() {
        let (mut c, clock) = cmos(1_709_251_198);
        set(&mut c, STATUS_B, STATUS_B_BINARY);
        set(&mut c, 0x40, 0xab);
        set(&mut c, HOURS_ALARM, 0x33);
        c.write(INDEX, &[YEAR]);
        clock.set(7_000_000_000);
        let s = c.state();
        let mut d = Cmos::from_state(&s, clock.clone()).unwrap();
        assert_eq!(d.state(), s);
        let drive = |c: &mut Cmos| {
            let mut seen = vec![0xffu8];
            c.read(DATA, &mut seen[..]);
            seen.extend(all(c));
            seen.extend([reg(c, 0x40), reg(c, HOURS_ALARM), reg(c, STATUS_B), reg(c, STATUS_A)]);
            seen
        };
        assert_eq!(drive(&mut c), drive(&mut d));
        clock.set(90_000_000_000);
        assert_eq!(drive(&mut c), drive(&mut d));
        let mut bad = s.clone();
        bad.index = 0x80;
        assert!(d.restore(&bad).unwrap_err().to_string().contains("index 0x80"));
        bad.index = 0;
        bad.wall_base_secs = u64::MAX;
        assert!(d.restore(&bad).is_err());
    }

    #[test]
    fn nmi_bit_and_ports() {
        let (mut c, _) = cmos(0);
        set(&mut c, 0x20, 0x5a);
        // Index with the NMI-disable bit addresses the same register.
        assert_eq!(reg(&mut c, 0x80 | 0x20), 0x5a);
        let mut d = [0xff; 2];
        c.read(INDEX, &mut d);
        assert_eq!(d, [0, 0]);
        c.write(INDEX, &[0x20, 0xff]);
        c.read(DATA, &mut d);
        assert_eq!(d, [0x5a, 0]);
        c.write(5, &[1]);
        c.write(DATA, &[]);
        c.read(DATA, &mut []);
    }
}
