//! Shared fixtures for the replay-log tests.
#![allow(dead_code)]

use std::io::{self, Read};

use replay_log::*;

pub fn header() -> Header {
    Header {
        kernel_sha256: [0xab; 32],
        initrd_sha256: Some([0x11; 32]),
        mem_bytes: 256 << 20,
        cmdline: "console=ttyS0 ftvm.test=ümlaut".to_string(),
        ftvm_version: "0.1.0".to_string(),
        kernel_name: "built-in test guest".to_string(),
    }
}

pub fn rec(ordinal: u64, rip: u64, exit: ExitKind, event: Event) -> Record {
    Record {
        pos: Position { ordinal, rip, exit },
        event,
    }
}

/// Every ExitKind and every Event variant at least once, with extreme values.
pub fn all_variants() -> Vec<Record> {
    let exits = [
        ExitKind::Boot,
        ExitKind::IoIn(0x40),
        ExitKind::IoOut(u16::MAX),
        ExitKind::MmioRead(0xfee0_0000),
        ExitKind::MmioWrite(u64::MAX),
        ExitKind::Hlt,
        ExitKind::IrqWindowOpen,
        ExitKind::Trap(u64::MAX),
        ExitKind::Msr(u32::MAX),
        ExitKind::Stop,
    ];
    let events = [
        Event::WallClock {
            epoch_secs: 1_700_000_000,
        },
        Event::Time { ns: u64::MAX },
        Event::SerialIn {
            bytes: b"ab\n\x00\xff\"".to_vec(),
        },
        Event::SerialIn { bytes: Vec::new() },
        Event::Interrupt { vector: 0xff },
        Event::Value {
            value: 0x1234_5678_9abc_def0,
        },
        Event::Check { regs_digest: 0 },
        Event::Progress,
        Event::End {
            reason: EndReason::Exit(0xfe),
            regs_digest: 1,
            mem_digest: u64::MAX,
        },
        Event::End {
            reason: EndReason::Reset,
            regs_digest: 2,
            mem_digest: 3,
        },
        Event::End {
            reason: EndReason::Interrupted,
            regs_digest: 4,
            mem_digest: 5,
        },
    ];
    let mut out = Vec::new();
    let mut ordinal = 0;
    for exit in exits {
        for event in events.iter().cloned() {
            out.push(rec(ordinal, 0x10_0000 + ordinal * 3, exit, event));
            ordinal += 1;
        }
    }
    out
}

/// Three small records of different kinds, for byte-by-byte damage tests.
pub fn three() -> Vec<Record> {
    vec![
        rec(
            0,
            0x100000,
            ExitKind::Boot,
            Event::WallClock {
                epoch_secs: 1_700_000_000,
            },
        ),
        rec(
            7,
            0x100234,
            ExitKind::IoIn(0x3f8),
            Event::SerialIn {
                bytes: b"hi\n".to_vec(),
            },
        ),
        rec(
            9,
            0x100300,
            ExitKind::Stop,
            Event::End {
                reason: EndReason::Exit(0),
                regs_digest: 7,
                mem_digest: 8,
            },
        ),
    ]
}

pub fn encode(records: &[Record]) -> Vec<u8> {
    let mut w = LogWriter::new(Vec::new(), &header()).unwrap();
    for r in records {
        w.append(r).unwrap();
    }
    w.into_inner().unwrap()
}

/// Byte offsets where the header ends and each record ends.
pub fn boundaries(records: &[Record]) -> Vec<u64> {
    let mut w = LogWriter::new(Vec::new(), &header()).unwrap();
    let mut out = vec![w.bytes_written()];
    for r in records {
        w.append(r).unwrap();
        out.push(w.bytes_written());
    }
    out
}

pub fn read_all(bytes: &[u8]) -> (Vec<Record>, Result<(), LogError>) {
    let mut r = LogReader::new(bytes, "test.ftlog").unwrap();
    let mut recs = Vec::new();
    loop {
        match r.next_record() {
            Ok(Some(rec)) => recs.push(rec),
            Ok(None) => return (recs, Ok(())),
            Err(e) => return (recs, Err(e)),
        }
    }
}

/// A reader that hands out at most one byte per `read`, like a slow socket.
pub struct Trickle<'a>(pub &'a [u8]);

impl Read for Trickle<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.0.is_empty() || buf.is_empty() {
            return Ok(0);
        }
        buf[0] = self.0[0];
        self.0 = &self.0[1..];
        Ok(1)
    }
}

pub fn temp_path(name: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!(
        "replay-log-test-{}-{name}.ftlog",
        std::process::id()
    ))
}
