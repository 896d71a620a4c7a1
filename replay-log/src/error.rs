//! One error type for reading and writing, so callers (CLI, replay, the
//! backup's stream reader) can tell "the log stopped early" (`Truncated`)
//! from "the log is damaged" (`Corrupt`) and report where.

use std::io;

/// Every variant that concerns a place in a log names the source (path or
/// peer), the byte offset and the record number, because the first thing a
/// user does with a bad log is look at those bytes.
///
/// Offsets in `Corrupt` and `Truncated` are where the damaged record (or
/// the header) *starts*, which is also the length of the valid prefix:
/// `truncate -s OFFSET` leaves a clean log. Records are numbered from 0
/// after the header; header problems carry `offset: 0, record: 0`, and
/// their message says "header" instead of a record number (no record can
/// start at byte 0).
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// The underlying reader or writer failed; `offset` is the log offset of
    /// the first byte that could not be read or written.
    #[error("I/O error on {source_name} at byte offset {offset}")]
    Io {
        source_name: String,
        offset: u64,
        #[source]
        err: io::Error,
    },

    #[error("{source_name} is not an ftvm log (bad magic at byte 0)")]
    NotALog { source_name: String },

    #[error(
        "{source_name} has log format version {found}; this build of ftvm reads versions 1 to {supported}"
    )]
    Version {
        source_name: String,
        found: u16,
        supported: u16,
    },

    #[error("corrupt {} at byte offset {offset} in {source_name}: {what}", place(*.record, *.offset))]
    Corrupt {
        source_name: String,
        offset: u64,
        record: u64,
        what: String,
    },

    #[error("{source_name} ends inside {} at byte offset {offset} (truncated log)", place(*.record, *.offset))]
    Truncated {
        source_name: String,
        offset: u64,
        record: u64,
    },

    /// The writer refused something the format cannot hold; nothing was
    /// written for it, so the log stays valid.
    #[error("cannot write to log: {what}")]
    TooLarge { what: String },
}

/// The header is the only thing that starts at byte 0.
fn place(record: u64, offset: u64) -> String {
    if offset == 0 {
        "header".to_string()
    } else {
        format!("record #{record}")
    }
}

impl LogError {
    /// True when the log is intact but stops early: a crashed recorder or a
    /// dropped connection rather than damage.
    pub fn is_truncated(&self) -> bool {
        matches!(self, LogError::Truncated { .. })
    }
}
