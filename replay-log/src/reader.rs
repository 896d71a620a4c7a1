//! Reading a log from a file or a socket.
//!
//! Sockets deliver frames in arbitrary pieces and may time out mid-frame
//! (the backup uses read timeouts to notice a silent primary), so the
//! reader keeps a partly received frame across calls instead of losing its
//! place: after an `Io` error such as `WouldBlock`/`TimedOut`, or after
//! `Truncated` on a file that is still growing, calling `next_record` again
//! carries on where the bytes stopped.

use std::fs::File;
use std::io::{self, BufReader, Read};
use std::path::Path;

use crate::codec::{self, FRAME_OVERHEAD, HEADER_PREFIX_LEN};
use crate::{Header, LogError, Record, FORMAT_VERSION, MAGIC, MAX_HEADER_PAYLOAD, MAX_RECORD_BODY};

/// Reads a log from any `Read`. Reads are issued in frame-sized pieces, so
/// give it a buffered reader (`open` does; wrap sockets in `BufReader`).
pub struct LogReader<R: Read> {
    inner: R,
    source: String,
    header: Header,
    /// The format version the log was written in.
    version: u16,
    /// Offset just past the last whole record returned.
    offset: u64,
    records: u64,
    /// The frame being assembled: `frame[..filled]` has arrived.
    frame: Vec<u8>,
    filled: usize,
    /// Once framing is in doubt nothing after it can be trusted, so the
    /// first corruption is repeated rather than decoding garbage.
    corrupt: Option<(u64, u64, String)>,
    /// An `End` record was returned.
    ended: bool,
    /// Refuse anything after an `End` record (see [`LogReader::end_is_final`]).
    end_is_final: bool,
}

impl LogReader<BufReader<File>> {
    pub fn open(path: &Path) -> Result<Self, LogError> {
        let name = path.display().to_string();
        let file = File::open(path).map_err(|err| LogError::Io {
            source_name: name.clone(),
            offset: 0,
            err,
        })?;
        LogReader::new(BufReader::with_capacity(256 * 1024, file), &name)
    }
}

impl<R: Read> LogReader<R> {
    pub fn new(mut inner: R, source: &str) -> Result<Self, LogError> {
        let io_err = |offset: usize, err| LogError::Io {
            source_name: source.to_string(),
            offset: offset as u64,
            err,
        };
        let truncated = || LogError::Truncated {
            source_name: source.to_string(),
            offset: 0,
            record: 0,
        };
        let corrupt = |what: String| LogError::Corrupt {
            source_name: source.to_string(),
            offset: 0,
            record: 0,
            what,
        };

        let mut prefix = [0u8; HEADER_PREFIX_LEN];
        let got = read_full(&mut inner, &mut prefix).map_err(|(n, e)| io_err(n, e))?;
        // Judge the magic on whatever arrived, so a short non-log file is
        // "not a log" rather than "truncated".
        let magic_seen = got.min(MAGIC.len());
        if prefix[..magic_seen] != MAGIC[..magic_seen] {
            return Err(LogError::NotALog {
                source_name: source.to_string(),
            });
        }
        if got < HEADER_PREFIX_LEN {
            return Err(truncated());
        }
        // Checked before anything else: a newer version may lay out the
        // rest differently, and "too new" is the useful message then.
        let version = u16::from_le_bytes([prefix[8], prefix[9]]);
        if version == 0 || version > FORMAT_VERSION {
            return Err(LogError::Version {
                source_name: source.to_string(),
                found: version,
                supported: FORMAT_VERSION,
            });
        }
        let payload_len = u32::from_le_bytes(prefix[10..14].try_into().expect("4 bytes"));
        if payload_len > MAX_HEADER_PAYLOAD {
            return Err(corrupt(format!(
                "header length {payload_len} exceeds the {MAX_HEADER_PAYLOAD}-byte limit"
            )));
        }
        let mut rest = vec![0u8; payload_len as usize + 4];
        let got =
            read_full(&mut inner, &mut rest).map_err(|(n, e)| io_err(HEADER_PREFIX_LEN + n, e))?;
        if got < rest.len() {
            return Err(truncated());
        }
        let (payload, crc_bytes) = rest.split_at(payload_len as usize);
        let stored = u32::from_le_bytes(crc_bytes.try_into().expect("4 bytes"));
        let computed = codec::crc32(&[&prefix[MAGIC.len()..], payload]);
        if stored != computed {
            return Err(corrupt(format!(
                "header checksum mismatch (stored {stored:#010x}, computed {computed:#010x})"
            )));
        }
        let header = codec::decode_header_payload(payload).map_err(corrupt)?;

        Ok(LogReader {
            inner,
            source: source.to_string(),
            header,
            version,
            offset: (HEADER_PREFIX_LEN + rest.len()) as u64,
            records: 0,
            frame: Vec::new(),
            filled: 0,
            corrupt: None,
            ended: false,
            end_is_final: false,
        })
    }

    /// A recording ends at its `End` record: with this, any byte after it
    /// is reported as corruption (a second run appended, junk), so that
    /// `replay`, `log dump` and `log stats` agree on what the file is.
    pub fn end_is_final(mut self) -> Self {
        self.end_is_final = true;
        self
    }

    /// The format version the log was written in (at most
    /// [`FORMAT_VERSION`]).
    pub fn version(&self) -> u16 {
        self.version
    }

    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The name given to `new` (or the path given to `open`).
    pub fn source_name(&self) -> &str {
        &self.source
    }

    /// Offset just past the last whole record returned; bytes of a partly
    /// received frame are not counted until the frame is complete.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    pub fn records_read(&self) -> u64 {
        self.records
    }

    /// The underlying reader, to read something other than records from
    /// it between two records (a stream that embeds other frames, e.g.
    /// ftvm's state transfer after the header). Only valid where no record
    /// has been partly read: right after `new`, or after `next_record`
    /// returned a record.
    pub fn get_mut(&mut self) -> &mut R {
        &mut self.inner
    }

    /// Gives back the underlying reader, dropping any partly received frame.
    pub fn into_inner(self) -> R {
        self.inner
    }

    pub fn next_record(&mut self) -> Result<Option<Record>, LogError> {
        if let Some((offset, record, what)) = &self.corrupt {
            return Err(LogError::Corrupt {
                source_name: self.source.clone(),
                offset: *offset,
                record: *record,
                what: what.clone(),
            });
        }

        if self.ended && self.end_is_final {
            // Anything after the end record (a second run appended, junk)
            // makes the file something other than one recording.
            return if self.fill_to(1)? {
                Err(self.fail("data after the end record".into()))
            } else {
                Ok(None)
            };
        }
        if !self.fill_to(4)? {
            return if self.filled == 0 {
                Ok(None)
            } else {
                Err(self.truncated())
            };
        }
        // Judged as soon as the word is in, before waiting for the body: a
        // damaged length must be reported as damage, never as a log that
        // stops early because the length points past the end of the data.
        // (A 24-bit length cannot exceed MAX_RECORD_BODY, so no huge
        // allocation either.)
        let word = self.frame[..4].try_into().expect("4 bytes");
        let len = match codec::parse_length_word(word) {
            Ok(len) => len,
            Err(what) => return Err(self.fail(what)),
        };
        debug_assert!(len <= MAX_RECORD_BODY);
        let body_end = 4 + len as usize;
        if !self.fill_to(body_end + 4)? {
            return Err(self.truncated());
        }

        let stored = u32::from_le_bytes(
            self.frame[body_end..body_end + 4]
                .try_into()
                .expect("4 bytes"),
        );
        let computed = codec::crc32(&[&self.frame[..body_end]]);
        if stored != computed {
            return Err(self.fail(format!(
                "checksum mismatch (stored {stored:#010x}, computed {computed:#010x})"
            )));
        }
        let rec = match codec::decode_body(&self.frame[4..body_end], self.version) {
            Ok(rec) => rec,
            Err(what) => return Err(self.fail(what)),
        };

        self.offset += (len as usize + FRAME_OVERHEAD) as u64;
        self.records += 1;
        self.filled = 0;
        // Don't keep a buffer sized for one rare huge record forever.
        if self.frame.len() > 1 << 20 {
            self.frame = Vec::new();
        }
        self.ended = matches!(rec.event, crate::Event::End { .. });
        Ok(Some(rec))
    }

    /// Reads until `frame[..want]` is filled. `Ok(false)` means EOF came
    /// first; what did arrive stays in `frame[..filled]`.
    fn fill_to(&mut self, want: usize) -> Result<bool, LogError> {
        if self.frame.len() < want {
            self.frame.resize(want, 0);
        }
        while self.filled < want {
            match self.inner.read(&mut self.frame[self.filled..want]) {
                Ok(0) => return Ok(false),
                Ok(n) => self.filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(err) => {
                    return Err(LogError::Io {
                        source_name: self.source.clone(),
                        offset: self.offset + self.filled as u64,
                        err,
                    })
                }
            }
        }
        Ok(true)
    }

    fn truncated(&self) -> LogError {
        LogError::Truncated {
            source_name: self.source.clone(),
            offset: self.offset,
            record: self.records,
        }
    }

    fn fail(&mut self, what: String) -> LogError {
        self.corrupt = Some((self.offset, self.records, what.clone()));
        LogError::Corrupt {
            source_name: self.source.clone(),
            offset: self.offset,
            record: self.records,
            what,
        }
    }
}

/// Like `read_exact`, but reports how much arrived before EOF instead of
/// failing, so the caller can tell "no log at all" from "cut short".
/// On error, also says how many bytes had arrived.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> Result<usize, (usize, io::Error)> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err((got, e)),
        }
    }
    Ok(got)
}
