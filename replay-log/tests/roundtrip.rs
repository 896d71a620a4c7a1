//! Values survive writer → reader unchanged, over every transport shape.

mod common;

use std::cell::RefCell;
use std::io::{self, Read, Write};
use std::rc::Rc;

use common::*;
use replay_log::*;

#[test]
fn every_variant_round_trips_through_memory() {
    let records = all_variants();
    let bytes = encode(&records);
    let mut r = LogReader::new(&bytes[..], "mem").unwrap();
    assert_eq!(r.header(), &header());
    let header_len = r.offset();
    let mut expect_offset = header_len;
    for want in &records {
        let got = r.next_record().unwrap().expect("record");
        assert_eq!(&got, want);
        expect_offset += want.encoded_len();
        assert_eq!(r.offset(), expect_offset);
    }
    assert_eq!(r.next_record().unwrap(), None);
    // A clean end stays a clean end.
    assert_eq!(r.next_record().unwrap(), None);
    assert_eq!(r.records_read(), records.len() as u64);
    assert_eq!(r.offset(), bytes.len() as u64);
}

#[test]
fn header_without_initrd_round_trips() {
    let h = Header {
        initrd_sha256: None,
        cmdline: String::new(),
        ..header()
    };
    let w = LogWriter::new(Vec::new(), &h).unwrap();
    let bytes = w.into_inner().unwrap();
    let mut r = LogReader::new(&bytes[..], "mem").unwrap();
    assert_eq!(r.header(), &h);
    assert_eq!(r.next_record().unwrap(), None);
}

#[test]
fn every_variant_round_trips_through_a_file() {
    let path = temp_path("roundtrip");
    let records = all_variants();
    let file = std::fs::File::create(&path).unwrap();
    let mut w = LogWriter::with_name(file, &header(), &path.display().to_string()).unwrap();
    for r in &records {
        w.append(r).unwrap();
    }
    let written = w.bytes_written();
    assert_eq!(w.records_written(), records.len() as u64);
    w.into_inner().unwrap().sync_all().unwrap();
    assert_eq!(std::fs::metadata(&path).unwrap().len(), written);

    let mut r = LogReader::open(&path).unwrap();
    assert_eq!(r.header(), &header());
    let mut got = Vec::new();
    while let Some(rec) = r.next_record().unwrap() {
        got.push(rec);
    }
    std::fs::remove_file(&path).unwrap();
    assert_eq!(got, records);
    assert_eq!(r.offset(), written);
}

#[test]
fn open_names_the_path_when_missing() {
    let path = temp_path("does-not-exist");
    let err = LogReader::open(&path).err().expect("error");
    assert!(matches!(err, LogError::Io { .. }));
    assert!(
        err.to_string().contains(&path.display().to_string()),
        "{err}"
    );
}

#[test]
fn one_byte_reads_give_the_same_records() {
    let records = all_variants();
    let bytes = encode(&records);
    let mut r = LogReader::new(Trickle(&bytes), "peer 10.0.0.2:7000").unwrap();
    for want in &records {
        assert_eq!(&r.next_record().unwrap().unwrap(), want);
    }
    assert_eq!(r.next_record().unwrap(), None);
}

/// A socket with a read timeout: bytes come in pieces with timeouts between.
struct Stuttering {
    chunks: Vec<Option<Vec<u8>>>,
}

impl Read for Stuttering {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.chunks.is_empty() {
            return Ok(0);
        }
        match self.chunks.remove(0) {
            None => Err(io::Error::new(io::ErrorKind::WouldBlock, "timed out")),
            Some(mut c) => {
                let n = c.len().min(buf.len());
                buf[..n].copy_from_slice(&c[..n]);
                if n < c.len() {
                    self.chunks.insert(0, Some(c.split_off(n)));
                }
                Ok(n)
            }
        }
    }
}

#[test]
fn timeout_mid_frame_resumes_without_losing_bytes() {
    let records = three();
    let bytes = encode(&records);
    let b = boundaries(&records);
    let (h, r0, r1) = (b[0] as usize, b[1] as usize, b[2] as usize);
    // Timeouts inside the length field, inside a body, and at a boundary.
    let chunks = vec![
        Some(bytes[..h + 2].to_vec()),
        None,
        Some(bytes[h + 2..r0 + 10].to_vec()),
        None,
        None,
        Some(bytes[r0 + 10..r1].to_vec()),
        None,
        Some(bytes[r1..].to_vec()),
    ];
    let mut r = LogReader::new(Stuttering { chunks }, "peer").unwrap();
    let mut got = Vec::new();
    let mut timeouts = 0;
    loop {
        match r.next_record() {
            Ok(Some(rec)) => got.push(rec),
            Ok(None) => break,
            Err(LogError::Io { err, offset, .. }) => {
                assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
                assert!(offset >= r.offset());
                timeouts += 1;
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(timeouts, 4);
    assert_eq!(got, records);
}

/// A file the recorder is still writing: Truncated now, more records later.
#[derive(Clone)]
struct Growing(Rc<RefCell<(Vec<u8>, usize)>>);

impl Read for Growing {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut s = self.0.borrow_mut();
        let (data, pos) = &mut *s;
        let n = (data.len() - *pos).min(buf.len());
        buf[..n].copy_from_slice(&data[*pos..*pos + n]);
        *pos += n;
        Ok(n)
    }
}

#[test]
fn truncated_tail_of_a_growing_log_continues_once_bytes_arrive() {
    let records = three();
    let bytes = encode(&records);
    let b = boundaries(&records);
    let cut = b[1] as usize + 5;
    let shared = Growing(Rc::new(RefCell::new((bytes[..cut].to_vec(), 0))));
    let mut r = LogReader::new(shared.clone(), "growing").unwrap();
    assert_eq!(r.next_record().unwrap().unwrap(), records[0]);
    assert!(r.next_record().unwrap_err().is_truncated());
    shared.0.borrow_mut().0.extend_from_slice(&bytes[cut..]);
    assert_eq!(r.next_record().unwrap().unwrap(), records[1]);
    assert_eq!(r.next_record().unwrap().unwrap(), records[2]);
    assert_eq!(r.next_record().unwrap(), None);
}

/// Counts what reaches the inner writer, and can be told to fail.
#[derive(Default)]
struct Probe {
    data: Vec<u8>,
    flushes: usize,
    fail_after: Option<usize>,
}

impl Write for &mut Probe {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if let Some(limit) = self.fail_after {
            if self.data.len() >= limit {
                return Err(io::Error::new(io::ErrorKind::BrokenPipe, "peer went away"));
            }
            let n = buf.len().min(limit - self.data.len());
            self.data.extend_from_slice(&buf[..n]);
            return Ok(n);
        }
        self.data.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        self.flushes += 1;
        Ok(())
    }
}

#[test]
fn header_is_written_at_once_and_flush_reaches_the_inner_writer() {
    let mut probe = Probe::default();
    let mut w = LogWriter::new(&mut probe, &header()).unwrap();
    let header_len = w.bytes_written();
    assert_eq!(w.records_written(), 0);
    let recs = three();
    w.append(&recs[0]).unwrap();
    assert_eq!(w.bytes_written(), header_len + recs[0].encoded_len());
    w.flush().unwrap();
    drop(w);
    assert_eq!(probe.data.len() as u64, header_len + recs[0].encoded_len());
    assert!(probe.flushes >= 2);
    let (got, end) = read_all(&probe.data);
    assert_eq!(got, recs[..1]);
    end.unwrap();
}

#[test]
fn dropping_the_writer_flushes() {
    let mut out = Vec::new();
    {
        let mut w = LogWriter::new(&mut out, &header()).unwrap();
        for r in three() {
            w.append(&r).unwrap();
        }
    }
    assert_eq!(read_all(&out).0, three());
}

#[test]
fn write_failure_is_reported_and_sticks() {
    let mut probe = Probe {
        fail_after: Some(200),
        ..Probe::default()
    };
    let mut w = LogWriter::with_name(&mut probe, &header(), "peer 10.0.0.2:7000").unwrap();
    let big = rec(
        1,
        0,
        ExitKind::Hlt,
        Event::SerialIn {
            bytes: vec![b'x'; 100_000],
        },
    );
    let err = w.append(&big).unwrap_err();
    match &err {
        LogError::Io {
            source_name, err, ..
        } => {
            assert_eq!(source_name, "peer 10.0.0.2:7000");
            assert_eq!(err.kind(), io::ErrorKind::BrokenPipe);
        }
        e => panic!("{e}"),
    }
    assert!(err.to_string().contains("peer 10.0.0.2:7000"));
    assert!(matches!(w.append(&three()[0]), Err(LogError::Io { .. })));
    assert!(matches!(w.flush(), Err(LogError::Io { .. })));
}

#[test]
fn oversized_record_is_refused_and_leaves_the_log_valid() {
    let mut w = LogWriter::new(Vec::new(), &header()).unwrap();
    let recs = three();
    w.append(&recs[0]).unwrap();
    // One byte over the limit: the body length would not fit 24 bits.
    let huge = rec(
        1,
        0,
        ExitKind::Hlt,
        Event::SerialIn {
            bytes: vec![0; MAX_RECORD_BODY as usize - 26 + 1],
        },
    );
    let before = w.bytes_written();
    match w.append(&huge) {
        Err(LogError::TooLarge { what }) => {
            assert!(what.contains(&format!("limit {MAX_RECORD_BODY}")), "{what}")
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(w.bytes_written(), before);
    assert_eq!(w.records_written(), 1);
    w.append(&recs[1]).unwrap();
    let bytes = w.into_inner().unwrap();
    assert_eq!(read_all(&bytes).0, recs[..2]);
}

#[test]
fn largest_allowed_record_round_trips() {
    // 26 fixed body bytes + payload = exactly the limit.
    let payload = MAX_RECORD_BODY as usize - 26;
    let r = rec(
        1,
        0,
        ExitKind::Hlt,
        Event::SerialIn {
            bytes: vec![7; payload],
        },
    );
    assert_eq!(MAX_RECORD_BODY, (1 << 24) - 1);
    let bytes = encode(std::slice::from_ref(&r));
    let start = boundaries(&[])[0] as usize;
    // Length ff ff ff, check byte crc8(ff ff ff) = 0x0f.
    assert_eq!(bytes[start..start + 4], [0xff, 0xff, 0xff, 0x0f]);
    assert_eq!(read_all(&bytes).0, vec![r]);
}

#[test]
fn display_forms() {
    let r = rec(
        1234,
        0x100234,
        ExitKind::IoIn(0x40),
        Event::Time { ns: 1_234_567 },
    );
    assert_eq!(
        r.to_string(),
        "@1234 rip=0x100234 io-in(0x40) time ns=1234567"
    );
    let serial = Event::SerialIn {
        bytes: b"ab\n".to_vec(),
    };
    assert_eq!(serial.to_string(), "serial-in \"ab\\n\"");
    let odd = Event::SerialIn {
        bytes: b"\"\x1b\xff".to_vec(),
    };
    assert_eq!(odd.to_string(), r#"serial-in "\"\x1b\xff""#);
    assert_eq!(ExitKind::Msr(0x10).to_string(), "msr(0x10)");
    assert_eq!(ExitKind::IrqWindowOpen.to_string(), "irq-window");
    assert_eq!(
        Event::End {
            reason: EndReason::Exit(3),
            regs_digest: 1,
            mem_digest: 2
        }
        .to_string(),
        "end reason=exit(3) regs_digest=0x0000000000000001 mem_digest=0x0000000000000002"
    );
    // Every variant has a one-line form that starts with its kind name.
    for r in all_variants() {
        let s = r.event.to_string();
        assert!(s.starts_with(r.event.kind_name()), "{s}");
        assert!(!r.to_string().contains('\n'));
    }
}

/// The worked example in FORMAT.md; if this changes, the format changed.
#[test]
fn format_md_worked_example() {
    let r = rec(
        5,
        0x100234,
        ExitKind::IoIn(0x40),
        Event::Time { ns: 1_234_567 },
    );
    let mut frame = encode(std::slice::from_ref(&r));
    let header_len = boundaries(&[])[0] as usize;
    frame.drain(..header_len);
    let hex: Vec<String> = frame.iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(
        hex.join(" "),
        "22 00 00 95 \
         02 05 00 00 00 00 00 00 00 34 02 10 00 00 00 00 00 \
         02 40 00 00 00 00 00 00 00 \
         87 d6 12 00 00 00 00 00 \
         5f c9 72 b8"
    );
    assert_eq!(r.encoded_len(), 42);
}
