//! Bytes ⇄ values for the header payload and record bodies (FORMAT.md).
//! Pure functions on slices: the reader and writer own all I/O, so the
//! encoding can be tested and reasoned about without streams.
//!
//! Decoders return the complaint as a `String`; the caller knows the source,
//! offset and record number and wraps it in `LogError::Corrupt`.

use crate::{
    EndReason, Event, ExitKind, Header, LogError, Position, Record, FORMAT_VERSION, MAGIC,
    MAX_HEADER_PAYLOAD, MAX_RECORD_BODY,
};

/// Magic, version and header length: the part of the header every version
/// must keep, so any reader can say "wrong version" instead of "corrupt".
pub(crate) const HEADER_PREFIX_LEN: usize = 8 + 2 + 4;
/// Length word (with its check byte) plus checksum around each record body.
pub(crate) const FRAME_OVERHEAD: usize = 4 + 4;
/// Event kind, ordinal, rip, exit kind, exit detail.
const BODY_FIXED_LEN: usize = 1 + 8 + 8 + 1 + 8;

// Codes start at 1 so that a zeroed region never decodes as a record.
const EV_WALLCLOCK: u8 = 1;
const EV_TIME: u8 = 2;
const EV_SERIAL_IN: u8 = 3;
const EV_INTERRUPT: u8 = 4;
// Code 5 was `Value` in version 1; no ftvm ever wrote it (retired in 2).
const EV_CHECK: u8 = 6;
const EV_PROGRESS: u8 = 7;
const EV_END: u8 = 8;
const EV_PAGES: u8 = 9;
const EV_VCPU_STATE: u8 = 10;
const EV_NET_RX: u8 = 11;
const EV_NET_TX: u8 = 12;

/// Bytes of one page in a `Pages` record.
pub const PAGE_SIZE: usize = 4096;
/// Most pages one `Pages` record may hold: bounds what a reader allocates
/// for the decompressed pages (16 MiB) whatever a damaged count says.
pub const MAX_PAGES_PER_RECORD: usize = 4096;

const EX_BOOT: u8 = 1;
const EX_IO_IN: u8 = 2;
const EX_IO_OUT: u8 = 3;
const EX_MMIO_READ: u8 = 4;
const EX_MMIO_WRITE: u8 = 5;
const EX_HLT: u8 = 6;
const EX_IRQ_WINDOW: u8 = 7;
const EX_TRAP: u8 = 8;
const EX_MSR: u8 = 9;
const EX_STOP: u8 = 10;
const EX_RESYNC: u8 = 11;

const END_EXIT: u8 = 0;
const END_RESET: u8 = 1;
const END_INTERRUPTED: u8 = 2;
const END_HALTED: u8 = 3;

/// CRC-8/SMBUS: polynomial 0x07, initial value 0, no reflection, no final
/// xor. Protects the frame length word; detects every error confined to 8
/// consecutive bits, so any single damaged byte of the word.
pub(crate) fn crc8(data: &[u8]) -> u8 {
    let mut crc = 0u8;
    for &b in data {
        crc ^= b;
        for _ in 0..8 {
            crc = if crc & 0x80 != 0 {
                (crc << 1) ^ 0x07
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// The 4-byte length word of a frame: body length in the low 24 bits, the
/// CRC-8 of those 3 bytes (as stored, little-endian) in the high 8 bits.
/// `len` must be at most `MAX_RECORD_BODY`.
pub(crate) fn length_word(len: u32) -> [u8; 4] {
    debug_assert!(len <= MAX_RECORD_BODY);
    let [a, b, c, _] = len.to_le_bytes();
    [a, b, c, crc8(&[a, b, c])]
}

/// Checks a frame's length word and returns the body length. The check byte
/// lets a reader tell a damaged length from one pointing at data still to
/// come, so a damaged length is never mistaken for a truncated log.
pub(crate) fn parse_length_word(word: [u8; 4]) -> Result<u32, String> {
    let [a, b, c, stored] = word;
    let expected = crc8(&[a, b, c]);
    if stored != expected {
        return Err(format!(
            "record length field damaged (check byte {stored:#04x}, expected {expected:#04x})"
        ));
    }
    Ok(u32::from_le_bytes([a, b, c, 0]))
}

pub(crate) fn crc32(parts: &[&[u8]]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    for p in parts {
        h.update(p);
    }
    h.finalize()
}

/// The header payload (FORMAT.md, "Header"), without magic, version,
/// length or checksum: also how a snapshot names its guest.
pub(crate) fn encode_header_payload(h: &Header) -> Result<Vec<u8>, LogError> {
    let mut payload = Vec::with_capacity(128);
    payload.extend_from_slice(&h.kernel_sha256);
    match &h.initrd_sha256 {
        Some(sum) => {
            payload.push(1);
            payload.extend_from_slice(sum);
        }
        None => payload.push(0),
    }
    payload.extend_from_slice(&h.mem_bytes.to_le_bytes());
    for (name, s) in [
        ("cmdline", &h.cmdline),
        ("ftvm_version", &h.ftvm_version),
        ("kernel_name", &h.kernel_name),
    ] {
        let len = u32::try_from(s.len()).map_err(|_| LogError::TooLarge {
            what: format!("header {name} is {} bytes", s.len()),
        })?;
        payload.extend_from_slice(&len.to_le_bytes());
        payload.extend_from_slice(s.as_bytes());
    }
    // Version 3: the network card, appended (a reader of the version-2
    // fields stops before it).
    match &h.net_mac {
        Some(mac) => {
            payload.push(1);
            payload.extend_from_slice(mac);
        }
        None => payload.push(0),
    }
    if payload.len() > MAX_HEADER_PAYLOAD as usize {
        return Err(LogError::TooLarge {
            what: format!(
                "header payload is {} bytes (limit {MAX_HEADER_PAYLOAD})",
                payload.len()
            ),
        });
    }
    Ok(payload)
}

/// The whole header, magic through checksum.
pub(crate) fn encode_header(h: &Header) -> Result<Vec<u8>, LogError> {
    let payload = encode_header_payload(h)?;
    let mut out = Vec::with_capacity(HEADER_PREFIX_LEN + payload.len() + 4);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&payload);
    let crc = crc32(&[&out[MAGIC.len()..]]);
    out.extend_from_slice(&crc.to_le_bytes());
    Ok(out)
}

/// Bytes after the fields this version knows are allowed and ignored: that
/// is how a header grows without a version bump (FORMAT.md, "Versioning").
pub(crate) fn decode_header_payload(p: &[u8]) -> Result<Header, String> {
    let mut c = Cursor::new(p, "header");
    let kernel_sha256 = c.array::<32>("kernel_sha256")?;
    let initrd_sha256 = match c.u8("initrd flag")? {
        0 => None,
        1 => Some(c.array::<32>("initrd_sha256")?),
        f => return Err(format!("header initrd flag is {f} (expected 0 or 1)")),
    };
    let mem_bytes = c.u64("mem_bytes")?;
    let cmdline = c.string("cmdline")?;
    let ftvm_version = c.string("ftvm_version")?;
    let kernel_name = c.string("kernel_name")?;
    // Absent in version-2 logs: no card.
    let net_mac = if c.at_end() {
        None
    } else {
        match c.u8("net flag")? {
            0 => None,
            1 => Some(c.array::<6>("net_mac")?),
            f => return Err(format!("header net flag is {f} (expected 0 or 1)")),
        }
    };
    Ok(Header {
        kernel_sha256,
        initrd_sha256,
        mem_bytes,
        cmdline,
        ftvm_version,
        kernel_name,
        net_mac,
    })
}

pub(crate) fn exit_parts(e: ExitKind) -> (u8, u64) {
    match e {
        ExitKind::Boot => (EX_BOOT, 0),
        ExitKind::IoIn(p) => (EX_IO_IN, p.into()),
        ExitKind::IoOut(p) => (EX_IO_OUT, p.into()),
        ExitKind::MmioRead(a) => (EX_MMIO_READ, a),
        ExitKind::MmioWrite(a) => (EX_MMIO_WRITE, a),
        ExitKind::Hlt => (EX_HLT, 0),
        ExitKind::IrqWindowOpen => (EX_IRQ_WINDOW, 0),
        ExitKind::Trap(id) => (EX_TRAP, id),
        ExitKind::Msr(m) => (EX_MSR, m.into()),
        ExitKind::Stop => (EX_STOP, 0),
        ExitKind::Resync => (EX_RESYNC, 0),
    }
}

/// Strict about detail bits a kind cannot carry: they can only come from
/// damage, and accepting them would make two encodings of one record.
pub(crate) fn exit_from_parts(code: u8, detail: u64) -> Result<ExitKind, String> {
    let none = |k: ExitKind| {
        if detail == 0 {
            Ok(k)
        } else {
            Err(format!("exit kind {code} has nonzero detail {detail:#x}"))
        }
    };
    let port =
        || u16::try_from(detail).map_err(|_| format!("I/O port {detail:#x} does not fit 16 bits"));
    Ok(match code {
        EX_BOOT => none(ExitKind::Boot)?,
        EX_IO_IN => ExitKind::IoIn(port()?),
        EX_IO_OUT => ExitKind::IoOut(port()?),
        EX_MMIO_READ => ExitKind::MmioRead(detail),
        EX_MMIO_WRITE => ExitKind::MmioWrite(detail),
        EX_HLT => none(ExitKind::Hlt)?,
        EX_IRQ_WINDOW => none(ExitKind::IrqWindowOpen)?,
        EX_TRAP => ExitKind::Trap(detail),
        EX_MSR => ExitKind::Msr(
            u32::try_from(detail).map_err(|_| format!("MSR {detail:#x} does not fit 32 bits"))?,
        ),
        EX_STOP => none(ExitKind::Stop)?,
        EX_RESYNC => none(ExitKind::Resync)?,
        _ => return Err(format!("unknown exit kind code {code}")),
    })
}

fn event_code(e: &Event) -> u8 {
    match e {
        Event::WallClock { .. } => EV_WALLCLOCK,
        Event::Time { .. } => EV_TIME,
        Event::SerialIn { .. } => EV_SERIAL_IN,
        Event::Interrupt { .. } => EV_INTERRUPT,
        Event::Check { .. } => EV_CHECK,
        Event::Progress { .. } => EV_PROGRESS,
        Event::End { .. } => EV_END,
        Event::Pages { .. } => EV_PAGES,
        Event::VcpuState { .. } => EV_VCPU_STATE,
        Event::NetRx { .. } => EV_NET_RX,
        Event::NetTx { .. } => EV_NET_TX,
    }
}

fn payload_len(e: &Event) -> usize {
    match e {
        Event::WallClock { .. }
        | Event::Time { .. }
        | Event::Check { .. } => 8,
        Event::SerialIn { bytes } => bytes.len(),
        Event::Interrupt { .. } => 1,
        Event::Progress { .. } => 8,
        Event::End { .. } => 2 + 8 + 8,
        Event::Pages { pages } => pages_payload(pages).len(),
        Event::VcpuState { state } => state.len(),
        Event::NetRx { frame } => frame.len(),
        Event::NetTx { .. } => 4 + 8,
    }
}

/// `Pages` payload: count `u32`, count × address `u64`, then the pages'
/// bytes as one LZ4 block (guest memory is mostly zeros and repeats).
fn pages_payload(pages: &[(u64, Vec<u8>)]) -> Vec<u8> {
    let mut raw = Vec::with_capacity(pages.len() * PAGE_SIZE);
    let mut out = Vec::with_capacity(4 + pages.len() * 8);
    out.extend_from_slice(&(pages.len() as u32).to_le_bytes());
    for (gpa, data) in pages {
        out.extend_from_slice(&gpa.to_le_bytes());
        raw.extend_from_slice(data);
    }
    out.extend_from_slice(&lz4_flex::block::compress(&raw));
    out
}

fn decode_pages(payload: &[u8]) -> Result<Vec<(u64, Vec<u8>)>, String> {
    let n = payload.get(..4).map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")) as usize);
    let Some(n) = n else {
        return Err(format!("pages record needs a 4-byte count, found {} bytes", payload.len()));
    };
    if n > MAX_PAGES_PER_RECORD {
        return Err(format!("pages record claims {n} pages (limit {MAX_PAGES_PER_RECORD})"));
    }
    let Some(addrs) = payload.get(4..4 + n * 8) else {
        return Err(format!("pages record of {n} pages is cut short in its addresses"));
    };
    let mut raw = vec![0u8; n * PAGE_SIZE];
    match lz4_flex::block::decompress_into(&payload[4 + n * 8..], &mut raw) {
        Ok(len) if len == raw.len() => {}
        Ok(len) => return Err(format!("pages record of {n} pages decompresses to {len} bytes")),
        Err(e) => return Err(format!("pages record: {e}")),
    }
    addrs
        .chunks_exact(8)
        .zip(raw.chunks_exact(PAGE_SIZE))
        .map(|(a, d)| {
            let gpa = u64::from_le_bytes(a.try_into().expect("8 bytes"));
            if gpa % PAGE_SIZE as u64 != 0 {
                return Err(format!("page address {gpa:#x} is not 4 KiB aligned"));
            }
            Ok((gpa, d.to_vec()))
        })
        .collect()
}

impl Record {
    /// Bytes this record takes in a log, framing included; lets callers
    /// size buffers or account for bytes without encoding.
    pub fn encoded_len(&self) -> u64 {
        (FRAME_OVERHEAD + BODY_FIXED_LEN + payload_len(&self.event)) as u64
    }
}

/// Appends one whole frame to `out`. On error `out` is left untouched, so
/// a refused record never leaves half a frame behind.
pub(crate) fn encode_frame(rec: &Record, out: &mut Vec<u8>) -> Result<(), LogError> {
    // Compressed once: its length goes in the frame before its bytes.
    let pages_bytes = match &rec.event {
        Event::Pages { pages } if pages.len() <= MAX_PAGES_PER_RECORD => Some(pages_payload(pages)),
        _ => None,
    };
    let body_len = BODY_FIXED_LEN + pages_bytes.as_ref().map_or_else(|| payload_len(&rec.event), Vec::len);
    if body_len > MAX_RECORD_BODY as usize {
        return Err(LogError::TooLarge {
            what: format!(
                "{} record at ordinal {} has a {body_len}-byte body (limit {MAX_RECORD_BODY})",
                rec.event.kind_name(),
                rec.pos.ordinal
            ),
        });
    }
    if let Event::Pages { pages } = &rec.event {
        if let Some((gpa, d)) = pages.iter().find(|(gpa, d)| d.len() != PAGE_SIZE || gpa % PAGE_SIZE as u64 != 0) {
            return Err(LogError::TooLarge {
                what: format!("page at {gpa:#x} of {} bytes (pages are 4096 bytes, 4 KiB aligned)", d.len()),
            });
        }
        if pages.len() > MAX_PAGES_PER_RECORD {
            return Err(LogError::TooLarge { what: format!("{} pages in one record (limit {MAX_PAGES_PER_RECORD})", pages.len()) });
        }
    }
    let start = out.len();
    out.reserve(FRAME_OVERHEAD + body_len);
    out.extend_from_slice(&length_word(body_len as u32));
    out.push(event_code(&rec.event));
    out.extend_from_slice(&rec.pos.ordinal.to_le_bytes());
    out.extend_from_slice(&rec.pos.rip.to_le_bytes());
    let (exit_code, detail) = exit_parts(rec.pos.exit);
    out.push(exit_code);
    out.extend_from_slice(&detail.to_le_bytes());
    match &rec.event {
        Event::WallClock { epoch_secs: v }
        | Event::Time { ns: v }
        | Event::Check { regs_digest: v } => out.extend_from_slice(&v.to_le_bytes()),
        Event::SerialIn { bytes } => out.extend_from_slice(bytes),
        Event::Interrupt { vector } => out.push(*vector),
        Event::Pages { .. } => out.extend_from_slice(pages_bytes.as_deref().unwrap_or_default()),
        Event::VcpuState { state } => out.extend_from_slice(state),
        Event::NetRx { frame } => out.extend_from_slice(frame),
        Event::NetTx { len, digest } => {
            out.extend_from_slice(&len.to_le_bytes());
            out.extend_from_slice(&digest.to_le_bytes());
        }
        Event::Progress { frames_out } => out.extend_from_slice(&frames_out.to_le_bytes()),
        Event::End {
            reason,
            regs_digest,
            mem_digest,
        } => {
            let (code, status) = match reason {
                EndReason::Exit(s) => (END_EXIT, *s),
                EndReason::Reset => (END_RESET, 0),
                EndReason::Interrupted => (END_INTERRUPTED, 0),
                EndReason::Halted => (END_HALTED, 0),
            };
            out.extend_from_slice(&[code, status]);
            out.extend_from_slice(&regs_digest.to_le_bytes());
            out.extend_from_slice(&mem_digest.to_le_bytes());
        }
    }
    debug_assert_eq!(out.len() - start, 4 + body_len);
    let crc = crc32(&[&out[start..]]);
    out.extend_from_slice(&crc.to_le_bytes());
    Ok(())
}

/// Decodes a body whose checksum already matched; what can still be wrong
/// here is a writer bug or a newer writer's event kind.
/// `version`: the log's format version (record layouts that changed
/// between versions are read as that version wrote them).
pub(crate) fn decode_body(body: &[u8], version: u16) -> Result<Record, String> {
    let mut c = Cursor::new(body, "record");
    let kind = c.u8("event kind")?;
    let ordinal = c.u64("ordinal")?;
    let rip = c.u64("rip")?;
    let exit_code = c.u8("exit kind")?;
    let detail = c.u64("exit detail")?;
    let exit = exit_from_parts(exit_code, detail)?;
    let payload = c.rest();
    let fixed = |n: usize| {
        if payload.len() == n {
            Ok(())
        } else {
            Err(format!(
                "event kind {kind} needs a {n}-byte payload, found {}",
                payload.len()
            ))
        }
    };
    let le64 = |b: &[u8]| u64::from_le_bytes(b[..8].try_into().expect("8 bytes"));
    let event = match kind {
        EV_WALLCLOCK => {
            fixed(8)?;
            Event::WallClock {
                epoch_secs: le64(payload),
            }
        }
        EV_TIME => {
            fixed(8)?;
            Event::Time { ns: le64(payload) }
        }
        EV_SERIAL_IN => Event::SerialIn {
            bytes: payload.to_vec(),
        },
        EV_INTERRUPT => {
            fixed(1)?;
            Event::Interrupt { vector: payload[0] }
        }
        EV_CHECK => {
            fixed(8)?;
            Event::Check {
                regs_digest: le64(payload),
            }
        }
        // Before version 4 a mark had no payload (streamed only, so never
        // met in a file; read as "nothing sent").
        EV_PROGRESS if version < 4 => {
            fixed(0)?;
            Event::Progress { frames_out: 0 }
        }
        EV_PROGRESS => {
            fixed(8)?;
            Event::Progress { frames_out: le64(payload) }
        }
        EV_PAGES => Event::Pages { pages: decode_pages(payload)? },
        EV_VCPU_STATE => Event::VcpuState { state: payload.to_vec() },
        EV_NET_RX => Event::NetRx { frame: payload.to_vec() },
        EV_NET_TX => {
            fixed(12)?;
            Event::NetTx {
                len: u32::from_le_bytes(payload[..4].try_into().expect("4 bytes")),
                digest: le64(&payload[4..]),
            }
        }
        EV_END => {
            fixed(18)?;
            let status = payload[1];
            let reason = match (payload[0], status) {
                (END_EXIT, s) => EndReason::Exit(s),
                (END_RESET, 0) => EndReason::Reset,
                (END_INTERRUPTED, 0) => EndReason::Interrupted,
                (END_HALTED, 0) => EndReason::Halted,
                (END_RESET | END_INTERRUPTED | END_HALTED, s) => {
                    return Err(format!("end reason {} has nonzero status {s}", payload[0]))
                }
                (r, _) => return Err(format!("unknown end reason code {r}")),
            };
            Event::End {
                reason,
                regs_digest: le64(&payload[2..]),
                mem_digest: le64(&payload[10..]),
            }
        }
        k => return Err(format!("unknown event kind code {k}")),
    };
    Ok(Record {
        pos: Position { ordinal, rip, exit },
        event,
    })
}

/// Bounds-checked little-endian reads whose errors say which field ran out.
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
    what: &'static str,
}

impl<'a> Cursor<'a> {
    fn new(buf: &'a [u8], what: &'static str) -> Self {
        Cursor { buf, pos: 0, what }
    }

    fn take(&mut self, n: usize, field: &str) -> Result<&'a [u8], String> {
        let left = self.buf.len() - self.pos;
        if left < n {
            return Err(format!(
                "{} too short for {field}: needs {n} more bytes at payload byte {}, has {left}",
                self.what, self.pos
            ));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, field: &str) -> Result<[u8; N], String> {
        Ok(self.take(N, field)?.try_into().expect("length checked"))
    }

    fn u8(&mut self, field: &str) -> Result<u8, String> {
        Ok(self.take(1, field)?[0])
    }

    fn u32(&mut self, field: &str) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.array(field)?))
    }

    fn u64(&mut self, field: &str) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.array(field)?))
    }

    fn string(&mut self, field: &str) -> Result<String, String> {
        let len = self.u32(field)? as usize;
        let bytes = self.take(len, field)?;
        String::from_utf8(bytes.to_vec())
            .map_err(|e| format!("{} {field} is not UTF-8: {e}", self.what))
    }

    fn at_end(&self) -> bool {
        self.pos == self.buf.len()
    }

    fn rest(&mut self) -> &'a [u8] {
        let s = &self.buf[self.pos..];
        self.pos = self.buf.len();
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_net_card_field_is_optional_and_absent_in_version_2_headers() {
        let mut h = Header {
            kernel_sha256: [1; 32],
            initrd_sha256: None,
            mem_bytes: 1 << 20,
            cmdline: "c".into(),
            ftvm_version: "v".into(),
            kernel_name: "k".into(),
            net_mac: Some([2, 0, 0, 0, 0, 1]),
        };
        let p = encode_header_payload(&h).unwrap();
        assert_eq!(decode_header_payload(&p).unwrap(), h);
        h.net_mac = None;
        let p = encode_header_payload(&h).unwrap();
        assert_eq!(decode_header_payload(&p).unwrap(), h);
        // A version-2 payload ends after kernel_name.
        assert_eq!(decode_header_payload(&p[..p.len() - 1]).unwrap(), h);
        let mut bad = p.clone();
        *bad.last_mut().unwrap() = 7;
        assert!(decode_header_payload(&bad).unwrap_err().contains("net flag is 7"));
    }

    /// Version 4 gives `Progress` its `frames_out`; version 3's empty
    /// payload still reads (as 0), any other length is corrupt.
    #[test]
    fn progress_carries_frames_out_and_reads_version_3_marks() {
        let rec = Record {
            pos: Position { ordinal: 9, rip: 0x1000, exit: ExitKind::Hlt },
            event: Event::Progress { frames_out: 7 },
        };
        let mut frame = Vec::new();
        encode_frame(&rec, &mut frame).unwrap();
        // Frame: length word (4), body, crc32 (4).
        let body = &frame[4..frame.len() - 4];
        assert_eq!(decode_body(body, 4).unwrap(), rec);
        assert_eq!(&body[body.len() - 8..], &7u64.to_le_bytes());
        let v3 = &body[..body.len() - 8];
        assert_eq!(decode_body(v3, 3).unwrap().event, Event::Progress { frames_out: 0 });
        for (b, v, n) in [(v3, 4, 0), (&body[..body.len() - 4], 4, 4), (body, 3, 8)] {
            let err = decode_body(b, v).unwrap_err();
            let want = format!("needs a {}-byte payload, found {n}", if v == 4 { 8 } else { 0 });
            assert!(err.contains(&want), "{err}");
        }
    }

    #[test]
    fn crc8_is_crc8_smbus() {
        // The catalogued check value of CRC-8/SMBUS.
        assert_eq!(crc8(b"123456789"), 0xf4);
        assert_eq!(crc8(&[]), 0);
        assert_eq!(crc8(&[0, 0, 0]), 0);
    }

    #[test]
    fn length_word_round_trips_and_catches_any_one_damaged_byte() {
        for len in [0, 1, 26, 34, 0x1234, 0xff_ffff, MAX_RECORD_BODY] {
            let word = length_word(len);
            assert_eq!(parse_length_word(word), Ok(len));
            for i in 0..4 {
                for x in 1..=255u8 {
                    let mut w = word;
                    w[i] ^= x;
                    let err = parse_length_word(w).unwrap_err();
                    assert!(err.starts_with("record length field damaged"), "{err}");
                }
            }
        }
    }
}
