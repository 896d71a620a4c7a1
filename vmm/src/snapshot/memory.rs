//! Guest memory in a snapshot: the range [0, size) in chunks of 1 MiB (the
//! last one shorter if the size is not a multiple), each either all zeros
//! (no bytes stored: most of a guest's memory is never touched) or one LZ4
//! block. Held compressed, as in the file: a snapshot in memory costs what
//! it costs on disk, and a reader never allocates more than one chunk's
//! worth for a length it has read.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Bytes of guest memory per chunk.
pub const CHUNK: u64 = 1 << 20;

/// One chunk of guest memory.
#[derive(Clone, PartialEq, Eq)]
pub enum Chunk {
    /// Every byte is zero.
    Zero,
    /// An LZ4 block (no frame) that decompresses to the chunk's length.
    Lz4(Vec<u8>),
}

/// Guest memory [0, size) as chunks, in address order.
#[derive(Clone, PartialEq, Eq)]
pub struct MemoryImage {
    size: u64,
    chunks: Vec<Chunk>,
}

impl std::fmt::Debug for MemoryImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let zero = self.chunks.iter().filter(|c| **c == Chunk::Zero).count();
        write!(f, "MemoryImage {{ {} bytes, {} chunks ({zero} zero), {} bytes stored }}", self.size, self.chunks.len(), self.stored_bytes())
    }
}

/// Length of chunk `i` of a memory of `size` bytes.
/// Whether every byte is zero. An OR over the whole slice rather than an
/// early-exit scan: the compiler vectorizes it, which makes a snapshot of a
/// mostly empty guest (and so the primary's pause for a state transfer)
/// several times shorter.
fn is_zero(data: &[u8]) -> bool {
    data.iter().fold(0u8, |acc, &b| acc | b) == 0
}

/// Chunk `i` of guest memory of `size` bytes as it is now; `buf` is
/// scratch space of at least [`CHUNK`] bytes. (State transfer copies
/// memory chunk by chunk while the guest runs, and again the chunks it
/// wrote since, while it is paused.)
pub fn capture_chunk(mem: &GuestMemoryMmap, size: u64, i: usize, buf: &mut [u8]) -> Result<Chunk, String> {
    let gpa = i as u64 * CHUNK;
    let data = buf.get_mut(..chunk_len(size, i)).ok_or("scratch buffer smaller than a chunk")?;
    mem.read_slice(data, GuestAddress(gpa)).map_err(|e| format!("reading guest memory at {gpa:#x}: {e}"))?;
    Ok(if is_zero(data) { Chunk::Zero } else { Chunk::Lz4(lz4_flex::block::compress(data)) })
}

pub fn chunk_len(size: u64, i: usize) -> usize {
    let start = i as u64 * CHUNK;
    size.saturating_sub(start).min(CHUNK) as usize
}

/// Chunks in a memory of `size` bytes.
pub fn chunk_count(size: u64) -> usize {
    size.div_ceil(CHUNK) as usize
}

/// Largest stored chunk a reader accepts (1 MiB + 128 KiB): more than LZ4
/// can take for 1 MiB of incompressible data, and a fixed part of the
/// format whatever the compressor's bound.
pub const MAX_STORED_CHUNK: usize = (CHUNK + CHUNK / 8) as usize;
const _: () = assert!(lz4_flex::block::get_maximum_output_size(CHUNK as usize) <= MAX_STORED_CHUNK);

impl MemoryImage {
    /// Reads and compresses guest memory [0, size).
    pub fn capture(mem: &GuestMemoryMmap, size: u64) -> Result<MemoryImage, String> {
        let mut buf = vec![0u8; CHUNK as usize];
        let chunks = (0..chunk_count(size)).map(|i| capture_chunk(mem, size, i, &mut buf)).collect::<Result<Vec<_>, _>>()?;
        Ok(MemoryImage { size, chunks })
    }

    pub fn check_chunk(size: u64, i: usize, c: &Chunk, scratch: &mut Vec<u8>) -> Result<(), String> {
        if let Chunk::Lz4(z) = c {
            let want = chunk_len(size, i);
            scratch.resize(want, 0);
            match lz4_flex::block::decompress_into(z, scratch) {
                Ok(n) if n == want => {}
                Ok(n) => return Err(format!("decompresses to {n} bytes, not {want}")),
                Err(e) => return Err(format!("is not a valid LZ4 block ({e})")),
            }
        }
        Ok(())
    }

    /// An image from checked chunks (see [`MemoryImage::check_chunk`]);
    /// there must be exactly [`chunk_count`] of them.
    pub fn from_chunks(size: u64, chunks: Vec<Chunk>) -> Result<MemoryImage, String> {
        if chunks.len() != chunk_count(size) {
            return Err(format!("{} memory chunks for {size} bytes (expected {})", chunks.len(), chunk_count(size)));
        }
        Ok(MemoryImage { size, chunks })
    }

    /// Writes the image into guest memory, zero chunks included (a fresh
    /// VM's memory holds the freshly loaded kernel, not the snapshot's).
    /// A zero chunk whose memory is all zeros already is not written:
    /// writing would allocate every page of a fresh VM's memory (reading
    /// untouched memory maps the zero page), which made a restore of a
    /// mostly empty 128 MiB guest take 280 ms on this host instead of a
    /// few.
    pub fn restore(&self, mem: &GuestMemoryMmap) -> Result<(), String> {
        let mut buf = vec![0u8; CHUNK as usize];
        let zeros = vec![0u8; CHUNK as usize];
        for (i, c) in self.chunks.iter().enumerate() {
            let gpa = i as u64 * CHUNK;
            let n = chunk_len(self.size, i);
            let data = match c {
                Chunk::Zero => {
                    mem.read_slice(&mut buf[..n], GuestAddress(gpa)).map_err(|e| format!("reading guest memory at {gpa:#x}: {e}"))?;
                    if is_zero(&buf[..n]) {
                        continue;
                    }
                    &zeros[..n]
                }
                Chunk::Lz4(z) => match lz4_flex::block::decompress_into(z, &mut buf[..n]) {
                    Ok(got) if got == n => &buf[..n],
                    _ => return Err(format!("memory chunk {i} (guest address {gpa:#x}) does not decompress to {n} bytes")),
                },
            };
            mem.write_slice(data, GuestAddress(gpa)).map_err(|e| format!("writing guest memory at {gpa:#x}: {e}"))?;
        }
        Ok(())
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn chunks(&self) -> &[Chunk] {
        &self.chunks
    }

    /// Bytes the chunks take, compressed.
    pub fn stored_bytes(&self) -> u64 {
        self.chunks.iter().map(|c| match c {
            Chunk::Zero => 0,
            Chunk::Lz4(z) => z.len() as u64,
        }).sum()
    }
}
