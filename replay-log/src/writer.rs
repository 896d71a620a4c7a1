//! Writing a log to a file or a socket.
//!
//! Records are buffered because the recorder appends one per VM exit and a
//! syscall each would dominate. Anything that must be durable or visible to
//! the backup before the guest's output escapes needs an explicit `flush`.

use std::io::Write;

use crate::codec;
use crate::{Header, LogError, Record};

/// Past this much buffered data the writer hands it to the inner writer.
const BUF_TARGET: usize = 64 * 1024;

/// Writes a header, then records, to any `Write`. Dropping it flushes on a
/// best-effort basis (errors are lost); call `flush`/`into_inner` to see them.
pub struct LogWriter<W: Write> {
    /// Always `Some` until `into_inner` takes it; an `Option` only because
    /// `Drop` forbids moving fields out otherwise.
    inner: Option<W>,
    name: String,
    buf: Vec<u8>,
    /// Bytes accepted, header included, whether or not flushed yet.
    accepted: u64,
    /// Bytes the inner writer has taken without error.
    delivered: u64,
    records: u64,
    /// After a failed write the inner writer may hold part of a frame, and
    /// appending more would turn a clean truncation into corruption.
    failed: bool,
}

impl<W: Write> LogWriter<W> {
    pub fn new(inner: W, header: &Header) -> Result<Self, LogError> {
        Self::with_name(inner, header, "log output")
    }

    /// Like `new`, with a name (path or peer) for error messages.
    pub fn with_name(inner: W, header: &Header, name: &str) -> Result<Self, LogError> {
        let buf = codec::encode_header(header)?;
        let mut w = LogWriter {
            inner: Some(inner),
            name: name.to_string(),
            accepted: buf.len() as u64,
            buf,
            delivered: 0,
            records: 0,
            failed: false,
        };
        // The reader validates the header before anything else, and a
        // backup waiting on a socket should not wait for the first records.
        w.flush()?;
        Ok(w)
    }

    /// Buffers one record. A record whose body would exceed
    /// [`MAX_RECORD_BODY`](crate::MAX_RECORD_BODY) (the frame's 24-bit length
    /// field) is refused with `TooLarge` and nothing is written for it.
    pub fn append(&mut self, rec: &Record) -> Result<(), LogError> {
        self.check_failed()?;
        let before = self.buf.len();
        codec::encode_frame(rec, &mut self.buf)?;
        self.accepted += (self.buf.len() - before) as u64;
        self.records += 1;
        if self.buf.len() >= BUF_TARGET {
            self.write_buf()?;
        }
        Ok(())
    }

    /// Pushes every appended record to the inner writer and flushes it.
    pub fn flush(&mut self) -> Result<(), LogError> {
        self.check_failed()?;
        self.write_buf()?;
        let offset = self.delivered;
        let inner = self.inner.as_mut().expect("inner present until into_inner");
        inner.flush().map_err(|err| {
            self.failed = true;
            LogError::Io {
                source_name: self.name.clone(),
                offset,
                err,
            }
        })
    }

    /// Header included; counts appended records even before they are flushed.
    pub fn bytes_written(&self) -> u64 {
        self.accepted
    }

    pub fn records_written(&self) -> u64 {
        self.records
    }

    pub fn get_ref(&self) -> &W {
        self.inner.as_ref().expect("inner present until into_inner")
    }

    /// Flushes, then gives back the inner writer. On error the inner writer
    /// is dropped: what it holds is an incomplete log.
    pub fn into_inner(mut self) -> Result<W, LogError> {
        self.flush()?;
        Ok(self.inner.take().expect("inner present until into_inner"))
    }

    fn write_buf(&mut self) -> Result<(), LogError> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let inner = self.inner.as_mut().expect("inner present until into_inner");
        match inner.write_all(&self.buf) {
            Ok(()) => {
                self.delivered += self.buf.len() as u64;
                self.buf.clear();
                Ok(())
            }
            Err(err) => {
                self.failed = true;
                Err(LogError::Io {
                    source_name: self.name.clone(),
                    offset: self.delivered,
                    err,
                })
            }
        }
    }

    fn check_failed(&self) -> Result<(), LogError> {
        if self.failed {
            return Err(LogError::Io {
                source_name: self.name.clone(),
                offset: self.delivered,
                err: std::io::Error::other("an earlier write to the log failed"),
            });
        }
        Ok(())
    }
}

impl<W: Write> Drop for LogWriter<W> {
    fn drop(&mut self) {
        if self.inner.is_some() && !self.failed {
            let _ = self.flush();
        }
    }
}
