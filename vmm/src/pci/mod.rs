//! A PCI bus as a guest without ACPI or a BIOS finds it: configuration
//! mechanism #1 (address register at 0xcf8, data window at 0xcfc), bus 0
//! only, a host bridge at 00:00.0 (Linux's probe of mechanism #1 looks
//! for one before it trusts the ports), and the functions the VMM plugs
//! in. BARs sit where the VMM put them; INTA# of each function is wired to
//! the ISA interrupt its Interrupt Line register names (see DESIGN.md,
//! "Network card", for why Linux honours it).
//!
//! Every access is a port exit, so the bus is as deterministic as the
//! other devices; its state is the address register plus each function's
//! configuration bytes.

pub mod config;

use std::sync::{Arc, Mutex};

use crate::devices::{BusDevice, DeviceError};
use config::ConfigSpace;

/// First port of mechanism #1: the address register (4 bytes), then the
/// data window (4 bytes).
pub const CONFIG_PORT: u16 = 0xcf8;
/// Ports the root answers.
pub const CONFIG_PORT_LEN: u64 = 8;
/// Slots on bus 0.
const SLOTS: usize = 32;
/// Address register: enable bit.
const ENABLE: u32 = 1 << 31;

/// A function's configuration space as the bus sees it.
pub trait PciFunction: Send {
    fn config_read(&mut self, reg: usize, data: &mut [u8]);
    fn config_write(&mut self, reg: usize, data: &[u8]);
}

/// The host bridge: ids and class only (class 06 00 00).
pub struct HostBridge {
    pub config: ConfigSpace,
}

impl HostBridge {
    pub fn new() -> Self {
        // Red Hat's vendor id, QEMU's generic host bridge.
        HostBridge { config: ConfigSpace::new(0x1b36, 0x0008, 0x06_00_00, 0) }
    }
}

impl Default for HostBridge {
    fn default() -> Self {
        Self::new()
    }
}

impl PciFunction for HostBridge {
    fn config_read(&mut self, reg: usize, data: &mut [u8]) {
        self.config.read(reg, data)
    }
    fn config_write(&mut self, reg: usize, data: &[u8]) {
        self.config.write(reg, data)
    }
}

/// The root: the two registers of mechanism #1 and the functions on bus 0
/// (function 0 of each slot; no multi-function devices).
pub struct PciRoot {
    address: u32,
    slots: Vec<Option<Arc<Mutex<dyn PciFunction>>>>,
    bridge: Arc<Mutex<HostBridge>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PciRootState {
    pub address: u32,
    /// The host bridge's configuration bytes.
    pub bridge: Vec<u8>,
}

impl PciRoot {
    pub fn new() -> Self {
        let bridge = Arc::new(Mutex::new(HostBridge::new()));
        let mut slots: Vec<Option<Arc<Mutex<dyn PciFunction>>>> = vec![None; SLOTS];
        slots[0] = Some(bridge.clone());
        PciRoot { address: 0, slots, bridge }
    }

    /// Plugs `f` into `slot` (1..32; 0 is the host bridge).
    pub fn plug(&mut self, slot: usize, f: Arc<Mutex<dyn PciFunction>>) {
        assert!((1..SLOTS).contains(&slot) && self.slots[slot].is_none(), "PCI slot {slot}");
        self.slots[slot] = Some(f);
    }

    /// The function and register the address register selects.
    fn target(&self, data_off: usize) -> Option<(&Arc<Mutex<dyn PciFunction>>, usize)> {
        let a = self.address;
        let (bus, slot, func) = ((a >> 16) & 0xff, (a >> 11) & 0x1f, (a >> 8) & 7);
        if a & ENABLE == 0 || bus != 0 || func != 0 {
            return None;
        }
        let f = self.slots[slot as usize].as_ref()?;
        Some((f, (a & 0xfc) as usize + data_off))
    }

    pub fn state(&self) -> PciRootState {
        PciRootState { address: self.address, bridge: self.bridge.lock().unwrap().config.state() }
    }

    pub fn restore(&mut self, s: &PciRootState) -> Result<(), DeviceError> {
        self.bridge.lock().unwrap().config.restore(&s.bridge)?;
        self.address = s.address;
        Ok(())
    }
}

impl Default for PciRoot {
    fn default() -> Self {
        Self::new()
    }
}

impl BusDevice for PciRoot {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match offset {
            // Only whole-register reads of the address: a byte access to
            // 0xcf8..0xcfb belongs to mechanism #2, which this bus is not.
            0 if data.len() == 4 => data.copy_from_slice(&self.address.to_le_bytes()),
            4..=7 => match self.target(offset as usize - 4) {
                Some((f, reg)) => f.lock().unwrap().config_read(reg, data),
                None => data.fill(0xff),
            },
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match offset {
            0 if data.len() == 4 => {
                self.address = u32::from_le_bytes(data.try_into().expect("4 bytes")) & !3;
            }
            4..=7 => {
                if let Some((f, reg)) = self.target(offset as usize - 4) {
                    f.lock().unwrap().config_write(reg, data);
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg_read(root: &mut PciRoot, slot: u32, reg: u32) -> u32 {
        root.write(0, &(ENABLE | slot << 11 | reg).to_le_bytes());
        let mut b = [0; 4];
        root.read(4, &mut b);
        u32::from_le_bytes(b)
    }

    #[test]
    fn mechanism_one_finds_the_host_bridge_and_nothing_else() {
        let mut root = PciRoot::new();
        // Linux's probe: the address register reads back what was written.
        root.write(0, &ENABLE.to_le_bytes());
        let mut b = [0; 4];
        root.read(0, &mut b);
        assert_eq!(u32::from_le_bytes(b), ENABLE);
        // A byte write to 0xcfb (mechanism #2's probe) changes nothing.
        root.write(3, &[1]);
        root.read(0, &mut b);
        assert_eq!(u32::from_le_bytes(b), ENABLE);
        assert_eq!(cfg_read(&mut root, 0, 0), 0x0008_1b36);
        assert_eq!(cfg_read(&mut root, 0, 8) >> 8, 0x06_00_00);
        assert_eq!(cfg_read(&mut root, 1, 0), 0xffff_ffff);
        // Other buses and functions are empty; so is a disabled address.
        root.write(0, &(ENABLE | 1 << 16).to_le_bytes());
        root.read(4, &mut b);
        assert_eq!(b, [0xff; 4]);
        root.write(0, &(ENABLE | 1 << 8).to_le_bytes());
        root.read(4, &mut b);
        assert_eq!(b, [0xff; 4]);
        root.write(0, &0u32.to_le_bytes());
        root.read(4, &mut b);
        assert_eq!(b, [0xff; 4]);
    }

    #[test]
    fn a_plugged_function_sees_byte_and_word_accesses_at_its_register() {
        let mut root = PciRoot::new();
        let mut c = ConfigSpace::new(0x1af4, 0x1041, 0x02_00_00, 1);
        c.set_interrupt(11);
        let f = Arc::new(Mutex::new(HostBridge { config: c }));
        root.plug(3, f.clone());
        assert_eq!(cfg_read(&mut root, 3, 0), 0x1041_1af4);
        root.write(0, &(ENABLE | 3 << 11 | 0x3c).to_le_bytes());
        let mut b = [0; 1];
        root.read(4 + 1, &mut b);
        assert_eq!(b, [1], "interrupt pin");
        root.write(4, &[10]);
        assert_eq!(f.lock().unwrap().config.get16(0x3c), 0x010a);
        let s = root.state();
        let mut other = PciRoot::new();
        other.restore(&s).unwrap();
        assert_eq!(other.state(), s);
    }
}
