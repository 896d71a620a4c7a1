//! The snapshot file (docs/SNAPSHOT.md): magic, version, then checksummed
//! sections in a fixed order (guest, position, vCPU, machine, memory
//! chunks, end), nothing after the end. The reader checks each length
//! against that section's limit before reading it, so a damaged length
//! can never make it allocate more than one memory chunk's worth, and it
//! checks everything (checksums, layouts, device states, that every
//! memory chunk decompresses) before handing back a snapshot.

use std::io::{ErrorKind, Read, Write};

use replay_log::{ExitKind, Header, Position};

use super::machine_bytes::{self, MAX_MACHINE_BYTES};
use super::memory::{chunk_count, Chunk, MemoryImage, CHUNK, MAX_STORED_CHUNK};
use super::{Snapshot, SnapshotError};
use crate::vcpu_state::VcpuState;

/// First bytes of every snapshot; the NUL keeps text tools off it.
pub const MAGIC: [u8; 8] = *b"FTVMSNP\0";
/// The format version this build writes and reads.
pub const VERSION: u16 = 2;

const SEC_GUEST: u8 = 1;
const SEC_POSITION: u8 = 2;
const SEC_VCPU: u8 = 3;
const SEC_MACHINE: u8 = 4;
const SEC_MEMORY: u8 = 5;
const SEC_END: u8 = 6;

/// Ordinal, RIP, exit kind code, exit detail.
const POSITION_LEN: usize = 8 + 8 + 1 + 8;
/// Far above any vCPU state (64 KiB of XSAVE, 4096 MSRs: about 115 KiB).
const MAX_VCPU_BYTES: usize = 256 << 10;
/// Largest guest memory a snapshot may claim (1 TiB): a sanity bound on a
/// size read from a file, far above what ftvm runs.
pub const MAX_MEM_BYTES: u64 = 1 << 40;
/// Guest address and encoding byte before a chunk's data.
const CHUNK_HEAD: usize = 8 + 1;
const ENC_ZERO: u8 = 0;
const ENC_LZ4: u8 = 1;

fn section_name(tag: u8) -> &'static str {
    match tag {
        SEC_GUEST => "guest",
        SEC_POSITION => "position",
        SEC_VCPU => "vcpu",
        SEC_MACHINE => "machine",
        SEC_MEMORY => "memory",
        SEC_END => "end",
        _ => "unknown",
    }
}

fn max_len(tag: u8) -> usize {
    match tag {
        SEC_GUEST => replay_log::MAX_HEADER_PAYLOAD as usize,
        SEC_POSITION => POSITION_LEN,
        SEC_VCPU => MAX_VCPU_BYTES,
        SEC_MACHINE => MAX_MACHINE_BYTES,
        SEC_MEMORY => CHUNK_HEAD + MAX_STORED_CHUNK,
        _ => 0,
    }
}

/// Writes `s` in the format of docs/SNAPSHOT.md; returns the bytes written.
pub fn write(s: &Snapshot, w: &mut dyn Write) -> Result<u64, String> {
    let mut n = 0u64;
    let mut put = |w: &mut dyn Write, tag: u8, parts: &[&[u8]]| -> std::io::Result<()> {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        let head = [&[tag][..], &(len as u32).to_le_bytes()].concat();
        let mut all = vec![&head[..]];
        all.extend_from_slice(parts);
        for p in &all {
            w.write_all(p)?;
        }
        w.write_all(&replay_log::crc32(&all).to_le_bytes())?;
        n += (head.len() + len + 4) as u64;
        Ok(())
    };
    let guest = s.guest.to_payload().map_err(|e| e.to_string())?;
    let (code, detail) = s.position.exit.to_code();
    let pos = [&s.position.ordinal.to_le_bytes()[..], &s.position.rip.to_le_bytes(), &[code], &detail.to_le_bytes()].concat();
    let io = |e: std::io::Error| e.to_string();
    w.write_all(&MAGIC).map_err(io)?;
    w.write_all(&VERSION.to_le_bytes()).map_err(io)?;
    put(w, SEC_GUEST, &[&guest]).map_err(io)?;
    put(w, SEC_POSITION, &[&pos]).map_err(io)?;
    put(w, SEC_VCPU, &[&s.vcpu.to_bytes()]).map_err(io)?;
    put(w, SEC_MACHINE, &[&machine_bytes::encode(&s.machine)]).map_err(io)?;
    for (i, c) in s.memory.chunks().iter().enumerate() {
        let gpa = (i as u64 * CHUNK).to_le_bytes();
        match c {
            Chunk::Zero => put(w, SEC_MEMORY, &[&gpa, &[ENC_ZERO]]),
            Chunk::Lz4(z) => put(w, SEC_MEMORY, &[&gpa, &[ENC_LZ4], z]),
        }
        .map_err(io)?;
    }
    put(w, SEC_END, &[]).map_err(io)?;
    w.flush().map_err(io)?;
    Ok(n + MAGIC.len() as u64 + 2)
}

/// Reads a snapshot, section by section, tracking the offset for errors.
struct Reader<'a, R: Read> {
    r: R,
    name: &'a str,
    off: u64,
}

impl<R: Read> Reader<'_, R> {
    fn corrupt(&self, offset: u64, section: impl Into<String>, what: impl Into<String>) -> SnapshotError {
        SnapshotError::Corrupt { name: self.name.to_string(), offset, section: section.into(), what: what.into() }
    }

    /// Fills `buf`; `Ok(false)` if the input ends first.
    fn fill(&mut self, buf: &mut [u8]) -> Result<bool, SnapshotError> {
        match self.r.read_exact(buf) {
            Ok(()) => {
                self.off += buf.len() as u64;
                Ok(true)
            }
            Err(e) if e.kind() == ErrorKind::UnexpectedEof => Ok(false),
            Err(err) => Err(SnapshotError::Io { what: "reading snapshot", path: self.name.to_string(), err }),
        }
    }

    /// The next section, which must be `want`; its body.
    fn section(&mut self, want: u8, label: &str) -> Result<Vec<u8>, SnapshotError> {
        let start = self.off;
        let truncated = |name: &str| SnapshotError::Truncated { name: name.to_string(), offset: start, section: label.to_string() };
        let mut head = [0u8; 5];
        if !self.fill(&mut head)? {
            return Err(truncated(self.name));
        }
        let tag = head[0];
        let len = u32::from_le_bytes(head[1..].try_into().expect("4 bytes")) as usize;
        if tag != want {
            let found = section_name(tag);
            return Err(self.corrupt(start, label, format!("expected the {} section (tag {want}), found tag {tag} ({found})", section_name(want))));
        }
        if len > max_len(tag) {
            return Err(self.corrupt(start, label, format!("length {len} is over the section's limit of {}", max_len(tag))));
        }
        let mut body = vec![0u8; len];
        let mut crc = [0u8; 4];
        if !self.fill(&mut body)? || !self.fill(&mut crc)? {
            return Err(truncated(self.name));
        }
        let stored = u32::from_le_bytes(crc);
        let computed = replay_log::crc32(&[&head, &body]);
        if stored != computed {
            return Err(self.corrupt(start, label, format!("checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")));
        }
        Ok(body)
    }
}

/// Reads and checks a whole snapshot. With `guest`, one of another guest
/// is refused as soon as its guest section is read (before its memory).
pub fn read(r: impl Read, name: &str, guest: Option<&Header>) -> Result<Snapshot, SnapshotError> {
    let mut rd = Reader { r, name, off: 0 };
    let mut prefix = [0u8; 10];
    let whole = rd.fill(&mut prefix)?;
    if !whole || prefix[..8] != MAGIC {
        // A short file that starts like a snapshot was cut; anything else
        // is not one.
        let got = rd.off as usize;
        return Err(if !whole && MAGIC.starts_with(&prefix[..got.min(8)]) {
            SnapshotError::Truncated { name: name.to_string(), offset: 0, section: "the file header".into() }
        } else {
            SnapshotError::NotASnapshot { name: name.to_string() }
        });
    }
    let version = u16::from_le_bytes([prefix[8], prefix[9]]);
    if version != VERSION {
        return Err(SnapshotError::Version { name: name.to_string(), found: version, supported: VERSION });
    }

    let at = rd.off;
    let g = rd.section(SEC_GUEST, "the guest section")?;
    let header = Header::from_payload(&g).map_err(|e| rd.corrupt(at, "the guest section", e))?;
    if header.mem_bytes == 0 || header.mem_bytes > MAX_MEM_BYTES {
        return Err(rd.corrupt(at, "the guest section", format!("guest memory of {} bytes (1 to {MAX_MEM_BYTES})", header.mem_bytes)));
    }
    if let Some(h) = guest {
        super::check_guest(&header, h, name)?;
    }

    let at = rd.off;
    let p = rd.section(SEC_POSITION, "the position section")?;
    let position = decode_position(&p).map_err(|e| rd.corrupt(at, "the position section", e))?;

    let at = rd.off;
    let v = rd.section(SEC_VCPU, "the vcpu section")?;
    let vcpu = VcpuState::from_bytes(&v).map_err(|e| rd.corrupt(at, "the vcpu section", e.to_string()))?;

    let at = rd.off;
    let m = rd.section(SEC_MACHINE, "the machine section")?;
    let machine = machine_bytes::decode(&m).map_err(|e| rd.corrupt(at, "the machine section", e))?;

    let size = header.mem_bytes;
    let mut chunks = Vec::new();
    let mut scratch = Vec::new();
    for i in 0..chunk_count(size) {
        let at = rd.off;
        let gpa = i as u64 * CHUNK;
        let label = format!("memory chunk {i} of {} (guest address {gpa:#x})", chunk_count(size));
        let body = rd.section(SEC_MEMORY, &label)?;
        let chunk = decode_chunk(&body, gpa).map_err(|e| rd.corrupt(at, label.as_str(), e))?;
        MemoryImage::check_chunk(size, i, &chunk, &mut scratch).map_err(|e| rd.corrupt(at, label.as_str(), format!("the chunk {e}")))?;
        chunks.push(chunk);
    }
    let memory = MemoryImage::from_chunks(size, chunks).map_err(|e| rd.corrupt(rd.off, "the memory", e))?;

    let at = rd.off;
    rd.section(SEC_END, "the end section")?;
    let mut more = [0u8; 1];
    if rd.fill(&mut more)? {
        return Err(rd.corrupt(at + 9, "what follows the end section", "data after the end section"));
    }
    Ok(Snapshot { guest: header, position, vcpu, machine, memory })
}

fn decode_position(b: &[u8]) -> Result<Position, String> {
    if b.len() != POSITION_LEN {
        return Err(format!("{} bytes, expected {POSITION_LEN}", b.len()));
    }
    let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"));
    let (ordinal, rip, code, detail) = (u64_at(0), u64_at(8), b[16], u64_at(17));
    let exit = ExitKind::from_code(code, detail)?;
    if ordinal == 0 || matches!(exit, ExitKind::Boot | ExitKind::Stop) {
        return Err(format!("exit #{ordinal} ({exit}) is not a place a snapshot is taken (after a completed exit, #1 or later)"));
    }
    Ok(Position { ordinal, rip, exit })
}

fn decode_chunk(b: &[u8], want_gpa: u64) -> Result<Chunk, String> {
    let Some(head) = b.get(..CHUNK_HEAD) else {
        return Err(format!("{} bytes, shorter than a chunk's address and encoding", b.len()));
    };
    let gpa = u64::from_le_bytes(head[..8].try_into().expect("8 bytes"));
    if gpa != want_gpa {
        return Err(format!("chunk at guest address {gpa:#x} where {want_gpa:#x} comes next"));
    }
    match (head[8], b.len() - CHUNK_HEAD) {
        (ENC_ZERO, 0) => Ok(Chunk::Zero),
        (ENC_ZERO, n) => Err(format!("a zero chunk with {n} bytes of data")),
        (ENC_LZ4, 0) => Err("an LZ4 chunk with no data".into()),
        (ENC_LZ4, _) => Ok(Chunk::Lz4(b[CHUNK_HEAD..].to_vec())),
        (e, _) => Err(format!("unknown chunk encoding {e}")),
    }
}
