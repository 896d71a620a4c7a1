//! The modern virtio-pci transport (virtio 1.x, section 4.1): the common
//! configuration structure (features, status, queue setup), the ISR byte
//! and queue notifications, all in one memory BAR, announced by vendor
//! capabilities in configuration space. Queues are rust-vmm's
//! `virtio_queue::Queue`; what a notification means is the device's.

use virtio_bindings::virtio_config::{VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_F_VERSION_1};
use virtio_queue::{Queue, QueueState, QueueT};

use crate::devices::DeviceError;
use crate::pci::config::ConfigSpace;

/// Capability id of a vendor-specific capability (virtio's).
const CAP_VENDOR: u8 = 0x09;
const CAP_COMMON: u8 = 1;
const CAP_NOTIFY: u8 = 2;
const CAP_ISR: u8 = 3;
const CAP_DEVICE: u8 = 4;

/// Where each structure sits in BAR 0.
pub const COMMON_OFF: u64 = 0x0000;
/// Longer than `struct virtio_pci_common_cfg` (0x38): newer drivers read
/// `queue_notify_data` and `queue_reset` after it (they read as zero).
pub const COMMON_LEN: u64 = 0x40;
pub const ISR_OFF: u64 = 0x1000;
pub const ISR_LEN: u64 = 4;
pub const DEVICE_OFF: u64 = 0x2000;
pub const DEVICE_LEN: u64 = 0x100;
pub const NOTIFY_OFF: u64 = 0x3000;
/// Bytes between two queues' notification addresses.
pub const NOTIFY_MULTIPLIER: u32 = 4;
/// BAR 0's size.
pub const BAR_SIZE: u32 = 0x4000;

/// "No MSI-X vector": there is no MSI-X capability, interrupts are INTx.
const NO_VECTOR: u16 = 0xffff;

/// The transport's state as plain data (queues in virtio-queue's form).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransportState {
    pub device_features: u64,
    pub driver_features: u64,
    pub device_feature_select: u32,
    pub driver_feature_select: u32,
    pub status: u8,
    pub config_generation: u8,
    pub queue_select: u16,
    pub isr: u8,
    pub queues: Vec<QueueState>,
}

pub struct Transport {
    pub s: TransportState,
    pub queues: Vec<Queue>,
}

/// Writes the four virtio capabilities for BAR 0 into `config`.
pub fn add_capabilities(config: &mut ConfigSpace, notify_len: u32) {
    let cap = |ty: u8, off: u64, len: u64, extra: &[u8]| {
        let mut b = vec![(16 + extra.len()) as u8, ty, 0, 0, 0, 0];
        b.extend_from_slice(&(off as u32).to_le_bytes());
        b.extend_from_slice(&(len as u32).to_le_bytes());
        b.extend_from_slice(extra);
        b
    };
    config.add_capability(CAP_VENDOR, &cap(CAP_COMMON, COMMON_OFF, COMMON_LEN, &[]));
    config.add_capability(CAP_VENDOR, &cap(CAP_ISR, ISR_OFF, ISR_LEN, &[]));
    config.add_capability(CAP_VENDOR, &cap(CAP_DEVICE, DEVICE_OFF, DEVICE_LEN, &[]));
    config.add_capability(CAP_VENDOR, &cap(CAP_NOTIFY, NOTIFY_OFF, notify_len.into(), &NOTIFY_MULTIPLIER.to_le_bytes()));
}

impl Transport {
    /// `features`: the device's own bits; VERSION_1 is added.
    pub fn new(features: u64, queue_sizes: &[u16]) -> Self {
        let queues: Vec<Queue> = queue_sizes.iter().map(|&n| Queue::new(n).expect("queue size is a power of two")).collect();
        Transport {
            s: TransportState {
                device_features: features | 1 << VIRTIO_F_VERSION_1,
                driver_features: 0,
                device_feature_select: 0,
                driver_feature_select: 0,
                status: 0,
                config_generation: 0,
                queue_select: 0,
                isr: 0,
                queues: queues.iter().map(|q| q.state()).collect(),
            },
            queues,
        }
    }

    /// A write of 0 to the status: back to the state after power-on.
    fn reset(&mut self) {
        for q in &mut self.queues {
            q.reset();
        }
        let s = &mut self.s;
        s.driver_features = 0;
        s.device_feature_select = 0;
        s.driver_feature_select = 0;
        s.status = 0;
        s.queue_select = 0;
        s.isr = 0;
    }

    fn selected(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(usize::from(self.s.queue_select))
    }

    /// The common configuration structure as the guest reads it now.
    fn common_image(&self) -> [u8; COMMON_LEN as usize] {
        let s = &self.s;
        let mut b = [0u8; COMMON_LEN as usize];
        let put = |b: &mut [u8], off: usize, v: &[u8]| b[off..off + v.len()].copy_from_slice(v);
        put(&mut b, 0x00, &s.device_feature_select.to_le_bytes());
        let f = match s.device_feature_select {
            0 => s.device_features as u32,
            1 => (s.device_features >> 32) as u32,
            _ => 0,
        };
        put(&mut b, 0x04, &f.to_le_bytes());
        put(&mut b, 0x08, &s.driver_feature_select.to_le_bytes());
        let f = match s.driver_feature_select {
            0 => s.driver_features as u32,
            1 => (s.driver_features >> 32) as u32,
            _ => 0,
        };
        put(&mut b, 0x0c, &f.to_le_bytes());
        put(&mut b, 0x10, &NO_VECTOR.to_le_bytes());
        put(&mut b, 0x12, &(self.queues.len() as u16).to_le_bytes());
        b[0x14] = s.status;
        b[0x15] = s.config_generation;
        put(&mut b, 0x16, &s.queue_select.to_le_bytes());
        if let Some(q) = self.queues.get(usize::from(s.queue_select)) {
            put(&mut b, 0x18, &q.size().to_le_bytes());
            put(&mut b, 0x1a, &NO_VECTOR.to_le_bytes());
            put(&mut b, 0x1c, &u16::from(q.ready()).to_le_bytes());
            put(&mut b, 0x1e, &s.queue_select.to_le_bytes());
            put(&mut b, 0x20, &q.desc_table().to_le_bytes());
            put(&mut b, 0x28, &q.avail_ring().to_le_bytes());
            put(&mut b, 0x30, &q.used_ring().to_le_bytes());
        }
        b
    }

    pub fn read_common(&self, off: u64, data: &mut [u8]) {
        let img = self.common_image();
        for (i, d) in data.iter_mut().enumerate() {
            *d = img.get(off as usize + i).copied().unwrap_or(0);
        }
    }

    pub fn write_common(&mut self, off: u64, data: &[u8]) {
        let mut v = [0u8; 4];
        let n = data.len().min(4);
        v[..n].copy_from_slice(&data[..n]);
        let v = u32::from_le_bytes(v);
        let s = &mut self.s;
        match off {
            0x00 => s.device_feature_select = v,
            0x08 => s.driver_feature_select = v,
            0x0c => {
                // Only bits the device offers; none once FEATURES_OK is set.
                if s.status & VIRTIO_CONFIG_S_FEATURES_OK as u8 != 0 {
                    return;
                }
                let v = u64::from(v);
                match s.driver_feature_select {
                    0 => s.driver_features = (s.driver_features & !0xffff_ffff) | v,
                    1 => s.driver_features = (s.driver_features & 0xffff_ffff) | v << 32,
                    _ => {}
                }
                s.driver_features &= s.device_features;
            }
            0x14 => {
                let v = v as u8;
                if v == 0 {
                    self.reset();
                } else {
                    // FEATURES_OK only sticks when VERSION_1 was accepted.
                    let bad = v & VIRTIO_CONFIG_S_FEATURES_OK as u8 != 0 && s.driver_features & 1 << VIRTIO_F_VERSION_1 == 0;
                    s.status = if bad { v & !(VIRTIO_CONFIG_S_FEATURES_OK as u8) } else { v };
                }
            }
            0x16 => s.queue_select = v as u16,
            0x18 => {
                if let Some(q) = self.selected() {
                    q.set_size(v as u16)
                }
            }
            0x1c => {
                let mem_ok = v == 1;
                if let Some(q) = self.selected() {
                    q.set_ready(mem_ok)
                }
            }
            0x20 => self.selected().into_iter().for_each(|q| q.set_desc_table_address(Some(v), None)),
            0x24 => self.selected().into_iter().for_each(|q| q.set_desc_table_address(None, Some(v))),
            0x28 => self.selected().into_iter().for_each(|q| q.set_avail_ring_address(Some(v), None)),
            0x2c => self.selected().into_iter().for_each(|q| q.set_avail_ring_address(None, Some(v))),
            0x30 => self.selected().into_iter().for_each(|q| q.set_used_ring_address(Some(v), None)),
            0x34 => self.selected().into_iter().for_each(|q| q.set_used_ring_address(None, Some(v))),
            // MSI-X vectors: there is no MSI-X; they keep reading NO_VECTOR.
            _ => {}
        }
    }

    /// The driver is done setting up (DRIVER_OK) and has not failed.
    pub fn driver_ok(&self) -> bool {
        use virtio_bindings::virtio_config::{VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FAILED};
        self.s.status & VIRTIO_CONFIG_S_DRIVER_OK as u8 != 0 && self.s.status & VIRTIO_CONFIG_S_FAILED as u8 == 0
    }

    /// Which queue a write to the notification area at `off` names.
    pub fn notified_queue(&self, off: u64) -> Option<usize> {
        let q = (off / u64::from(NOTIFY_MULTIPLIER)) as usize;
        (off.is_multiple_of(u64::from(NOTIFY_MULTIPLIER)) && q < self.queues.len()).then_some(q)
    }

    pub fn state(&self) -> TransportState {
        let mut s = self.s.clone();
        s.queues = self.queues.iter().map(|q| q.state()).collect();
        s
    }

    pub fn restore(&mut self, s: &TransportState) -> Result<(), DeviceError> {
        if s.queues.len() != self.queues.len() {
            return Err(DeviceError::bad("virtio", format!("{} queues, expected {}", s.queues.len(), self.queues.len())));
        }
        let mut queues = Vec::new();
        for (i, qs) in s.queues.iter().enumerate() {
            if qs.max_size != self.queues[i].max_size() {
                return Err(DeviceError::bad("virtio", format!("queue {i} max size {}", qs.max_size)));
            }
            queues.push(Queue::try_from(*qs).map_err(|e| DeviceError::bad("virtio", format!("queue {i}: {e}")))?);
        }
        self.queues = queues;
        self.s = s.clone();
        Ok(())
    }
}
