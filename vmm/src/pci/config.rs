//! One PCI function's configuration space (type 0 header): the bytes the
//! guest reads, which of them it may write, BARs that answer a sizing
//! probe, and a capability list. Plain data, so its state is its bytes.

use crate::devices::DeviceError;

/// Configuration space of a conventional PCI function.
pub const CONFIG_SIZE: usize = 256;
/// Where capabilities start (after the type 0 header).
const CAP_START: usize = 0x40;

pub const VENDOR_ID: usize = 0x00;
pub const DEVICE_ID: usize = 0x02;
pub const COMMAND: usize = 0x04;
pub const STATUS: usize = 0x06;
pub const REVISION: usize = 0x08;
pub const CLASS_PROG: usize = 0x09;
pub const HEADER_TYPE: usize = 0x0e;
pub const BAR0: usize = 0x10;
pub const SUBSYSTEM_VENDOR_ID: usize = 0x2c;
pub const SUBSYSTEM_ID: usize = 0x2e;
pub const CAP_POINTER: usize = 0x34;
pub const INTERRUPT_LINE: usize = 0x3c;
pub const INTERRUPT_PIN: usize = 0x3d;

/// Status register: the function has a capability list.
const STATUS_CAP_LIST: u16 = 1 << 4;
/// Command register bits a guest may set: I/O space, memory space, bus
/// master, and interrupt disable (bit 10).
const COMMAND_WRITABLE: u16 = 0b111 | 1 << 10;

/// A memory BAR: 32-bit, non-prefetchable, at a fixed address chosen by
/// the VMM (the guest's firmware, as far as Linux can tell).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bar {
    pub addr: u32,
    /// A power of two, at least 16.
    pub size: u32,
}

#[derive(Clone)]
pub struct ConfigSpace {
    bytes: [u8; CONFIG_SIZE],
    wmask: [u8; CONFIG_SIZE],
    bars: [Option<Bar>; 6],
    next_cap: usize,
    last_cap: Option<usize>,
}

impl ConfigSpace {
    /// A function with these ids and class (class, subclass, prog-if as
    /// one 24-bit value), no BARs, no interrupt pin.
    pub fn new(vendor: u16, device: u16, class: u32, revision: u8) -> Self {
        let mut c = ConfigSpace { bytes: [0; CONFIG_SIZE], wmask: [0; CONFIG_SIZE], bars: [None; 6], next_cap: CAP_START, last_cap: None };
        c.set16(VENDOR_ID, vendor);
        c.set16(DEVICE_ID, device);
        c.bytes[REVISION] = revision;
        c.bytes[CLASS_PROG..CLASS_PROG + 3].copy_from_slice(&class.to_le_bytes()[..3]);
        c.bytes[HEADER_TYPE] = 0;
        c.wmask[COMMAND..COMMAND + 2].copy_from_slice(&COMMAND_WRITABLE.to_le_bytes());
        c
    }

    pub fn set16(&mut self, off: usize, v: u16) {
        self.bytes[off..off + 2].copy_from_slice(&v.to_le_bytes());
    }

    pub fn get16(&self, off: usize) -> u16 {
        u16::from_le_bytes([self.bytes[off], self.bytes[off + 1]])
    }

    pub fn get32(&self, off: usize) -> u32 {
        u32::from_le_bytes(self.bytes[off..off + 4].try_into().expect("4 bytes"))
    }

    pub fn set_subsystem(&mut self, vendor: u16, id: u16) {
        self.set16(SUBSYSTEM_VENDOR_ID, vendor);
        self.set16(SUBSYSTEM_ID, id);
    }

    /// INTA# wired to ISA interrupt `line`: Linux without ACPI or a
    /// routing table takes the Interrupt Line register as the IRQ.
    pub fn set_interrupt(&mut self, line: u8) {
        self.bytes[INTERRUPT_LINE] = line;
        self.bytes[INTERRUPT_PIN] = 1;
        self.wmask[INTERRUPT_LINE] = 0xff;
    }

    pub fn set_bar(&mut self, index: usize, bar: Bar) {
        assert!(bar.size.is_power_of_two() && bar.size >= 16 && bar.addr.is_multiple_of(bar.size), "BAR {bar:?}");
        self.bars[index] = Some(bar);
        let off = BAR0 + 4 * index;
        self.bytes[off..off + 4].copy_from_slice(&bar.addr.to_le_bytes());
    }

    pub fn bar(&self, index: usize) -> Option<Bar> {
        self.bars[index]
    }

    /// Appends a capability (`body` is everything after the id and next
    /// pointer) and returns its offset.
    pub fn add_capability(&mut self, id: u8, body: &[u8]) -> usize {
        let off = self.next_cap;
        let len = 2 + body.len();
        assert!(off + len <= CONFIG_SIZE, "capabilities overflow config space");
        self.bytes[off] = id;
        self.bytes[off + 1] = 0;
        self.bytes[off + 2..off + len].copy_from_slice(body);
        match self.last_cap {
            Some(prev) => self.bytes[prev + 1] = off as u8,
            None => self.bytes[CAP_POINTER] = off as u8,
        }
        let status = self.get16(STATUS) | STATUS_CAP_LIST;
        self.set16(STATUS, status);
        self.last_cap = Some(off);
        self.next_cap = (off + len + 3) & !3;
        off
    }

    /// A read of `data.len()` bytes at `reg`; past the end reads as ones.
    pub fn read(&self, reg: usize, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = self.bytes.get(reg + i).copied().unwrap_or(0xff);
        }
    }

    /// A write: only writable bits change; a BAR keeps its size bits at
    /// zero, so writing all ones and reading back gives its size.
    pub fn write(&mut self, reg: usize, data: &[u8]) {
        if reg + data.len() > CONFIG_SIZE {
            return;
        }
        let dword = reg & !3;
        if (BAR0..BAR0 + 24).contains(&dword) {
            let i = (dword - BAR0) / 4;
            let Some(bar) = self.bars[i] else { return };
            let mut v = self.get32(dword).to_le_bytes();
            v[reg - dword..reg - dword + data.len()].copy_from_slice(data);
            let v = u32::from_le_bytes(v) & !(bar.size - 1);
            self.bytes[dword..dword + 4].copy_from_slice(&v.to_le_bytes());
            if v != bar.addr && v != !(bar.size - 1) {
                log::warn!("guest moved BAR{i} to {v:#x}; the device stays at {:#x}", bar.addr);
            }
            return;
        }
        for (i, &b) in data.iter().enumerate() {
            let m = self.wmask[reg + i];
            self.bytes[reg + i] = (self.bytes[reg + i] & !m) | (b & m);
        }
    }

    /// The bytes, for a snapshot.
    pub fn state(&self) -> Vec<u8> {
        self.bytes.to_vec()
    }

    /// Puts back what [`ConfigSpace::state`] took from a function built
    /// the same way: only the guest-writable bytes may differ.
    pub fn restore(&mut self, bytes: &[u8]) -> Result<(), DeviceError> {
        if bytes.len() != CONFIG_SIZE {
            return Err(DeviceError::bad("pci config", format!("{} bytes, expected {CONFIG_SIZE}", bytes.len())));
        }
        let mut next = self.clone();
        for (dword, _) in bytes.chunks(4).enumerate() {
            next.write(dword * 4, &bytes[dword * 4..dword * 4 + 4]);
        }
        if next.bytes[..] != bytes[..] {
            return Err(DeviceError::bad("pci config", "read-only bytes differ from this device's"));
        }
        *self = next;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read32(c: &ConfigSpace, reg: usize) -> u32 {
        let mut b = [0; 4];
        c.read(reg, &mut b);
        u32::from_le_bytes(b)
    }

    #[test]
    fn ids_are_read_only_and_a_bar_reports_its_size() {
        let mut c = ConfigSpace::new(0x1af4, 0x1041, 0x02_00_00, 1);
        c.set_bar(0, Bar { addr: 0xe000_0000, size: 0x4000 });
        c.write(VENDOR_ID, &[0, 0, 0, 0]);
        assert_eq!(read32(&c, 0), 0x1041_1af4);
        c.write(BAR0, &[0xff; 4]);
        assert_eq!(read32(&c, BAR0), 0xffff_c000);
        c.write(BAR0, &0xe000_0000u32.to_le_bytes());
        assert_eq!(read32(&c, BAR0), 0xe000_0000);
        // An absent BAR reads 0 whatever is written.
        c.write(BAR0 + 4, &[0xff; 4]);
        assert_eq!(read32(&c, BAR0 + 4), 0);
        // Command: only its writable bits.
        c.write(COMMAND, &[0xff, 0xff]);
        assert_eq!(c.get16(COMMAND), COMMAND_WRITABLE);
        let mut b = [0; 2];
        c.read(0xff, &mut b);
        assert_eq!(b, [0, 0xff]);
    }

    #[test]
    fn capabilities_chain_from_the_pointer() {
        let mut c = ConfigSpace::new(1, 2, 0, 0);
        let a = c.add_capability(0x09, &[16, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        let b = c.add_capability(0x09, &[20, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(c.get16(STATUS) & STATUS_CAP_LIST, STATUS_CAP_LIST);
        assert_eq!(c.bytes[CAP_POINTER] as usize, a);
        assert_eq!(c.bytes[a + 1] as usize, b);
        assert_eq!(c.bytes[b + 1], 0);
        assert_eq!(b % 4, 0);
    }

    #[test]
    fn state_restores_and_refuses_changed_read_only_bytes() {
        let mut c = ConfigSpace::new(0x1af4, 0x1041, 0x02_00_00, 1);
        c.set_interrupt(11);
        c.set_bar(0, Bar { addr: 0xe000_0000, size: 0x4000 });
        let fresh = c.clone();
        c.write(COMMAND, &[0x06, 0]);
        c.write(INTERRUPT_LINE, &[10]);
        let s = c.state();
        let mut d = fresh.clone();
        d.restore(&s).unwrap();
        assert_eq!(d.state(), s);
        let mut bad = s.clone();
        bad[DEVICE_ID] ^= 1;
        assert!(fresh.clone().restore(&bad).is_err());
        assert!(fresh.clone().restore(&s[..10]).is_err());
    }
}
