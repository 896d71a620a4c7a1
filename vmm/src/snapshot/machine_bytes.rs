//! The `machine` section of a snapshot: the clock and every device's state
//! in the fixed layout of docs/SNAPSHOT.md ("Machine"). Every field is
//! written, in a fixed order and width; an optional value is a flag byte
//! (0 or 1) and then the value, which must be 0 when the flag is 0, so a
//! state has exactly one encoding. Booleans are one byte, 0 or 1.
//!
//! The encoders destructure each state exhaustively: a field added to a
//! device's state does not compile until it has its place here (and in
//! the format's version and documentation).

use crate::devices::cmos::CmosState;
use crate::devices::debug_exit::DebugExitState;
use crate::devices::i8042::I8042State;
use crate::devices::pic::{PicChipState, PicState};
use crate::devices::pit::{PitChannelState, PitState};
use crate::devices::uart::UartState;
use crate::machine::{MachineState, NetMachineState};
use crate::net::device::NetState;
use crate::net::transport::TransportState;
use crate::pci::config::CONFIG_SIZE;
use crate::pci::PciRootState;
use virtio_queue::QueueState;

/// Most bytes a `machine` section can take (the UART's FIFO is the only
/// variable part): a reader refuses a longer length before reading it.
pub const MAX_MACHINE_BYTES: usize = 4096;

#[derive(Default)]
struct Enc(Vec<u8>);

impl Enc {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn bool(&mut self, v: bool) {
        self.0.push(u8::from(v));
    }
    fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn opt_u8(&mut self, v: Option<u8>) {
        self.bool(v.is_some());
        self.u8(v.unwrap_or(0));
    }
    fn opt_u16(&mut self, v: Option<u16>) {
        self.bool(v.is_some());
        self.u16(v.unwrap_or(0));
    }
    fn opt_u64(&mut self, v: Option<u64>) {
        self.bool(v.is_some());
        self.u64(v.unwrap_or(0));
    }
}

/// Reads the layout back; every complaint names the field and its byte
/// offset within the section.
struct Dec<'a> {
    b: &'a [u8],
    off: usize,
}

type R<T> = Result<T, String>;

impl Dec<'_> {
    fn take(&mut self, n: usize, what: &str) -> R<&[u8]> {
        let s = self.b.get(self.off..self.off + n).ok_or_else(|| format!("{what} at byte {} is cut short", self.off))?;
        self.off += n;
        Ok(s)
    }
    fn u8(&mut self, what: &str) -> R<u8> {
        Ok(self.take(1, what)?[0])
    }
    fn bool(&mut self, what: &str) -> R<bool> {
        let at = self.off;
        match self.u8(what)? {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(format!("{what} at byte {at} is {v} (a flag: 0 or 1)")),
        }
    }
    fn u16(&mut self, what: &str) -> R<u16> {
        Ok(u16::from_le_bytes(self.take(2, what)?.try_into().expect("2 bytes")))
    }
    fn u32(&mut self, what: &str) -> R<u32> {
        Ok(u32::from_le_bytes(self.take(4, what)?.try_into().expect("4 bytes")))
    }
    fn u64(&mut self, what: &str) -> R<u64> {
        Ok(u64::from_le_bytes(self.take(8, what)?.try_into().expect("8 bytes")))
    }
    fn opt<T: Default + PartialEq>(&mut self, what: &str, read: impl FnOnce(&mut Self, &str) -> R<T>) -> R<Option<T>> {
        let at = self.off;
        let some = self.bool(what)?;
        let v = read(self, what)?;
        match (some, v == T::default()) {
            (true, _) => Ok(Some(v)),
            (false, true) => Ok(None),
            (false, false) => Err(format!("{what} at byte {at} is absent but has a value")),
        }
    }
}

fn put_chip(e: &mut Enc, c: &PicChipState) {
    let PicChipState {
        irr, isr, imr, levels, base, init_step, icw4_expected, single, auto_eoi, rotate_on_aeoi, priority_add,
        read_isr, poll, special_mask,
    } = *c;
    for v in [irr, isr, imr, levels, base, init_step] {
        e.u8(v);
    }
    for v in [icw4_expected, single, auto_eoi, rotate_on_aeoi] {
        e.bool(v);
    }
    e.u8(priority_add);
    for v in [read_isr, poll, special_mask] {
        e.bool(v);
    }
}

fn get_chip(d: &mut Dec, which: &str) -> R<PicChipState> {
    let f = |n: &str| format!("PIC {which} {n}");
    Ok(PicChipState {
        irr: d.u8(&f("irr"))?,
        isr: d.u8(&f("isr"))?,
        imr: d.u8(&f("imr"))?,
        levels: d.u8(&f("levels"))?,
        base: d.u8(&f("base"))?,
        init_step: d.u8(&f("init_step"))?,
        icw4_expected: d.bool(&f("icw4_expected"))?,
        single: d.bool(&f("single"))?,
        auto_eoi: d.bool(&f("auto_eoi"))?,
        rotate_on_aeoi: d.bool(&f("rotate_on_aeoi"))?,
        priority_add: d.u8(&f("priority_add"))?,
        read_isr: d.bool(&f("read_isr"))?,
        poll: d.bool(&f("poll"))?,
        special_mask: d.bool(&f("special_mask"))?,
    })
}

fn put_channel(e: &mut Enc, c: &PitChannelState) {
    let PitChannelState {
        mode, access, bcd, reload, loaded_at, write_hi_next, write_lo, read_hi_next, latched_count, latched_status,
        null_count,
    } = *c;
    e.u8(mode);
    e.u8(access);
    e.bool(bcd);
    e.u16(reload);
    e.opt_u64(loaded_at);
    e.bool(write_hi_next);
    e.u8(write_lo);
    e.bool(read_hi_next);
    e.opt_u16(latched_count);
    e.opt_u8(latched_status);
    e.bool(null_count);
}

fn get_channel(d: &mut Dec, i: usize) -> R<PitChannelState> {
    let f = |n: &str| format!("PIT channel {i} {n}");
    Ok(PitChannelState {
        mode: d.u8(&f("mode"))?,
        access: d.u8(&f("access"))?,
        bcd: d.bool(&f("bcd"))?,
        reload: d.u16(&f("reload"))?,
        loaded_at: d.opt(&f("loaded_at"), Dec::u64)?,
        write_hi_next: d.bool(&f("write_hi_next"))?,
        write_lo: d.u8(&f("write_lo"))?,
        read_hi_next: d.bool(&f("read_hi_next"))?,
        latched_count: d.opt(&f("latched_count"), Dec::u16)?,
        latched_status: d.opt(&f("latched_status"), Dec::u8)?,
        null_count: d.bool(&f("null_count"))?,
    })
}

/// The network card: the PCI root, then the card's configuration space,
/// transport and queues.
fn put_net(e: &mut Enc, n: &NetMachineState) {
    let NetMachineState { pci: PciRootState { address, bridge }, card: NetState { config, transport } } = n;
    e.u32(*address);
    e.0.extend_from_slice(bridge);
    e.0.extend_from_slice(config);
    let TransportState {
        device_features, driver_features, device_feature_select, driver_feature_select, status, config_generation,
        queue_select, isr, queues,
    } = transport;
    e.u64(*device_features);
    e.u64(*driver_features);
    e.u32(*device_feature_select);
    e.u32(*driver_feature_select);
    e.u8(*status);
    e.u8(*config_generation);
    e.u16(*queue_select);
    e.u8(*isr);
    e.u8(queues.len().min(usize::from(u8::MAX)) as u8);
    for q in queues.iter().take(usize::from(u8::MAX)) {
        let QueueState { max_size, next_avail, next_used, event_idx_enabled, size, ready, desc_table, avail_ring, used_ring } = *q;
        for v in [max_size, next_avail, next_used] {
            e.u16(v);
        }
        e.bool(event_idx_enabled);
        e.u16(size);
        e.bool(ready);
        for v in [desc_table, avail_ring, used_ring] {
            e.u64(v);
        }
    }
}

fn get_net(d: &mut Dec) -> R<NetMachineState> {
    let address = d.u32("PCI address")?;
    let bridge = d.take(CONFIG_SIZE, "PCI host bridge config")?.to_vec();
    let config = d.take(CONFIG_SIZE, "net config")?.to_vec();
    let mut t = TransportState {
        device_features: d.u64("net device_features")?,
        driver_features: d.u64("net driver_features")?,
        device_feature_select: d.u32("net device_feature_select")?,
        driver_feature_select: d.u32("net driver_feature_select")?,
        status: d.u8("net status")?,
        config_generation: d.u8("net config_generation")?,
        queue_select: d.u16("net queue_select")?,
        isr: d.u8("net isr")?,
        queues: Vec::new(),
    };
    let n = d.u8("net queue count")?;
    for i in 0..n {
        let f = |x: &str| format!("net queue {i} {x}");
        t.queues.push(QueueState {
            max_size: d.u16(&f("max_size"))?,
            next_avail: d.u16(&f("next_avail"))?,
            next_used: d.u16(&f("next_used"))?,
            event_idx_enabled: d.bool(&f("event_idx"))?,
            size: d.u16(&f("size"))?,
            ready: d.bool(&f("ready"))?,
            desc_table: d.u64(&f("desc_table"))?,
            avail_ring: d.u64(&f("avail_ring"))?,
            used_ring: d.u64(&f("used_ring"))?,
        });
    }
    Ok(NetMachineState { pci: PciRootState { address, bridge }, card: NetState { config, transport: t } })
}

/// The `machine` section's bytes.
pub fn encode(s: &MachineState) -> Vec<u8> {
    let MachineState { clock_ns, pic, pit, uart, cmos, i8042, debug_exit, net } = s;
    let mut e = Enc::default();
    e.u64(*clock_ns);
    let PicState { master, slave } = pic;
    put_chip(&mut e, master);
    put_chip(&mut e, slave);
    let PitState { channels, deadline } = pit;
    for c in channels {
        put_channel(&mut e, c);
    }
    e.opt_u64(*deadline);
    let UartState { ier, fcr, lcr, mcr, scr, divisor, overrun, thr_ipending, rx, rx_total, tx_total, irq_level } = uart;
    for v in [*ier, *fcr, *lcr, *mcr, *scr] {
        e.u8(v);
    }
    e.u16(*divisor);
    for v in [*overrun, *thr_ipending, *irq_level] {
        e.bool(v);
    }
    e.u64(*rx_total);
    e.u64(*tx_total);
    // At most 16 bytes in a valid state; a longer FIFO is cut here and
    // would be refused by `check` anyway.
    let rx = &rx[..rx.len().min(usize::from(u8::MAX))];
    e.u8(rx.len() as u8);
    e.0.extend_from_slice(rx);
    let CmosState { wall_base_secs, index, ram } = cmos;
    e.u64(*wall_base_secs);
    e.u8(*index);
    e.0.extend_from_slice(ram);
    let I8042State { ctr, out, pending, last_was_command } = *i8042;
    e.u8(ctr);
    e.opt_u8(out);
    e.opt_u8(pending);
    e.bool(last_was_command);
    // The debug exit port has no state: nothing to write.
    let DebugExitState {} = debug_exit;
    e.bool(net.is_some());
    if let Some(n) = net {
        put_net(&mut e, n);
    }
    e.0
}

/// Reads a `machine` section: the layout, then each device's own check.
pub fn decode(b: &[u8]) -> Result<MachineState, String> {
    let mut d = Dec { b, off: 0 };
    let clock_ns = d.u64("clock")?;
    let pic = PicState { master: get_chip(&mut d, "master")?, slave: get_chip(&mut d, "slave")? };
    let pit = PitState {
        channels: [get_channel(&mut d, 0)?, get_channel(&mut d, 1)?, get_channel(&mut d, 2)?],
        deadline: d.opt("PIT deadline", Dec::u64)?,
    };
    let (ier, fcr, lcr, mcr, scr) = (d.u8("UART ier")?, d.u8("UART fcr")?, d.u8("UART lcr")?, d.u8("UART mcr")?, d.u8("UART scr")?);
    let divisor = d.u16("UART divisor")?;
    let (overrun, thr_ipending, irq_level) = (d.bool("UART overrun")?, d.bool("UART thr_ipending")?, d.bool("UART irq_level")?);
    let (rx_total, tx_total) = (d.u64("UART rx_total")?, d.u64("UART tx_total")?);
    let n = d.u8("UART rx length")?;
    let rx = d.take(usize::from(n), "UART rx bytes")?.to_vec();
    let uart = UartState { ier, fcr, lcr, mcr, scr, divisor, overrun, thr_ipending, rx, rx_total, tx_total, irq_level };
    let wall_base_secs = d.u64("CMOS wall_base_secs")?;
    let index = d.u8("CMOS index")?;
    let ram: [u8; 128] = d.take(128, "CMOS ram")?.try_into().expect("128 bytes");
    let cmos = CmosState { wall_base_secs, index, ram };
    let i8042 = I8042State {
        ctr: d.u8("i8042 ctr")?,
        out: d.opt("i8042 out", Dec::u8)?,
        pending: d.opt("i8042 pending", Dec::u8)?,
        last_was_command: d.bool("i8042 last_was_command")?,
    };
    let net = if d.bool("network card flag")? { Some(get_net(&mut d)?) } else { None };
    if d.off != b.len() {
        return Err(format!("{} bytes after the last device (byte {})", b.len() - d.off, d.off));
    }
    let s = MachineState { clock_ns, pic, pit, uart, cmos, i8042, debug_exit: DebugExitState {}, net };
    s.check().map_err(|e| e.to_string())?;
    Ok(s)
}
