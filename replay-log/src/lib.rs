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
pub const FORMAT_VERSION: u16 = 2;

/// A record body may not exceed this many bytes: the body length is the low
/// 24 bits of the frame's length word (the high 8 bits are its check byte,
/// FORMAT.md "Records"). The writer refuses larger records.
pub const MAX_RECORD_BODY: u32 = (1 << 24) - 1;

/// Same idea as [`MAX_RECORD_BODY`], for the header payload.
pub const MAX_HEADER_PAYLOAD: u32 = 1 << 20;
