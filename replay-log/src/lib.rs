//! ftvm's replay log: the record types, their versioned binary encoding
//! (FORMAT.md), and reading/writing over files and streams. No KVM here.
//!
//! The same bytes are used for a log file and for the primary→backup TCP
//! stream, so everything here works on plain `Read`/`Write`.

mod codec;
mod display;
mod error;
mod reader;
mod record;
mod stats;
mod writer;

pub use error::LogError;
pub use reader::LogReader;
pub use record::*;
pub use stats::{stats, LogStats};
pub use writer::LogWriter;

/// First bytes of every log; the trailing NUL keeps text tools from
/// mistaking a log for text.
pub const MAGIC: [u8; 8] = *b"FTVMLOG\0";

/// The format version this build writes and the highest it reads.
/// Bumped on any change an older reader could misread (FORMAT.md).
pub const FORMAT_VERSION: u16 = 4;

/// A record body may not exceed this many bytes: the body length is the low
/// 24 bits of the frame's length word (the high 8 bits are its check byte,
/// FORMAT.md "Records"). The writer refuses larger records.
pub const MAX_RECORD_BODY: u32 = (1 << 24) - 1;

/// Same idea as [`MAX_RECORD_BODY`], for the header payload.
pub const MAX_HEADER_PAYLOAD: u32 = 1 << 20;

/// CRC-32/ISO-HDLC of the concatenated `parts`, as every checksum of the
/// log is computed (FORMAT.md, "Conventions"); snapshots use the same one.
pub fn crc32(parts: &[&[u8]]) -> u32 {
    codec::crc32(parts)
}

impl Header {
    /// The header payload of FORMAT.md ("Header"): the fields only, without
    /// magic, version, length or checksum. Snapshots name their guest with
    /// the same bytes.
    pub fn to_payload(&self) -> Result<Vec<u8>, LogError> {
        codec::encode_header_payload(self)
    }

    /// Reads a header payload (bytes after the known fields are ignored,
    /// as in a log); the error says what is wrong.
    pub fn from_payload(p: &[u8]) -> Result<Header, String> {
        codec::decode_header_payload(p)
    }
}

impl ExitKind {
    /// The exit kind's code and detail as a record stores them
    /// (FORMAT.md, "Exit kinds").
    pub fn to_code(self) -> (u8, u64) {
        codec::exit_parts(self)
    }

    /// The exit kind of a code and detail; strict as the log reader is.
    pub fn from_code(code: u8, detail: u64) -> Result<ExitKind, String> {
        codec::exit_from_parts(code, detail)
    }
}
