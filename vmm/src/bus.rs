//! One range map serves both the PIO and the MMIO bus: devices register a
//! base and a length and then see `(offset, data)` only.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use crate::devices::BusDevice;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    #[error("bus range {base:#x}+{len:#x} overlaps a device already registered at {other:#x}")]
    Overlap { base: u64, len: u64, other: u64 },
    #[error("bus range at {base:#x} has zero length")]
    Empty { base: u64 },
}

struct Entry {
    len: u64,
    dev: Arc<Mutex<dyn BusDevice>>,
}

/// A map from address ranges to devices. What an access to an unmapped
/// address does is the caller's decision (`read`/`write` return `false`).
#[derive(Default)]
pub struct Bus {
    ranges: BTreeMap<u64, Entry>,
}

impl Bus {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn insert(
        &mut self,
        dev: Arc<Mutex<dyn BusDevice>>,
        base: u64,
        len: u64,
    ) -> Result<(), BusError> {
        if len == 0 {
            return Err(BusError::Empty { base });
        }
        let end = base.saturating_add(len);
        // The nearest range starting at or before `end - 1` is the only one
        // that can overlap, since ranges never overlap each other.
        if let Some((&other, e)) = self.ranges.range(..end).next_back() {
            if other + e.len > base {
                return Err(BusError::Overlap { base, len, other });
            }
        }
        self.ranges.insert(base, Entry { len, dev });
        Ok(())
    }

    fn find(&self, addr: u64, size: usize) -> Option<(u64, &Entry)> {
        let (&base, e) = self.ranges.range(..=addr).next_back()?;
        let off = addr - base;
        (off + size as u64 <= e.len).then_some((off, e))
    }

    /// Returns false when no device covers the whole access.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((off, e)) => {
                e.dev.lock().unwrap().read(off, data);
                true
            }
            None => false,
        }
    }

    /// Returns false when no device covers the whole access.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((off, e)) => {
                e.dev.lock().unwrap().write(off, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Mem {
        last: Vec<(u64, Vec<u8>)>,
    }
    impl BusDevice for Mem {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.last.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn dispatches_by_offset_and_refuses_overlap() {
        let mut bus = Bus::new();
        let dev = Arc::new(Mutex::new(Mem::default()));
        bus.insert(dev.clone(), 0x3f8, 8).unwrap();
        assert!(matches!(
            bus.insert(Arc::new(Mutex::new(Mem::default())), 0x3f0, 9),
            Err(BusError::Overlap { other: 0x3f8, .. })
        ));
        assert!(matches!(
            bus.insert(Arc::new(Mutex::new(Mem::default())), 0x3ff, 1),
            Err(BusError::Overlap { .. })
        ));
        bus.insert(Arc::new(Mutex::new(Mem::default())), 0x400, 1).unwrap();
        bus.insert(Arc::new(Mutex::new(Mem::default())), 0x3f0, 8).unwrap();
        assert!(bus.insert(Arc::new(Mutex::new(Mem::default())), 0x500, 0).is_err());

        let mut b = [0u8; 1];
        assert!(bus.read(0x3fd, &mut b));
        assert_eq!(b[0], 5);
        assert!(bus.write(0x3f9, &[7]));
        assert_eq!(dev.lock().unwrap().last, vec![(1, vec![7])]);
        // An access that runs past the end of the device is unmapped.
        let mut w = [0u8; 2];
        assert!(!bus.read(0x3ff, &mut w));
        assert!(!bus.read(0x1000, &mut b));
        assert!(!bus.write(0x10, &[1]));
    }
}
