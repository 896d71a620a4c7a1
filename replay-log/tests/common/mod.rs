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
        net_mac: Some([0x52, 0x54, 0, 0x12, 0x34, 0x56]),
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
        ExitKind::Resync,
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
        Event::Check { regs_digest: 0 },
        Event::Pages { pages: vec![(0, vec![0; 4096]), (!0xfff, (0..4096).map(|i| i as u8).collect())] },
        Event::Pages { pages: Vec::new() },
        Event::VcpuState { state: vec![1, 2, 3] },
        Event::VcpuState { state: Vec::new() },
        Event::NetRx { frame: (0..1514).map(|i| i as u8).collect() },
        Event::NetRx { frame: Vec::new() },
        Event::NetTx { len: u32::MAX, digest: 0x0123_4567_89ab_cdef },
        Event::Progress { frames_out: 0 },
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

/// `n` records shaped like a real recording: a boot wall clock, then mostly
/// clock reads and emulated-instruction values at port and trap exits, with
/// serial input of varied sizes (some needing 2 length bytes), interrupts,
/// register checks and progress markers, and an `End` last.
pub fn recording(n: u64) -> Vec<Record> {
    assert!(n >= 2);
    let mut out = vec![rec(
        0,
        0x10_0000,
        ExitKind::Boot,
        Event::WallClock {
            epoch_secs: 1_700_000_000,
        },
    )];
    for i in 1..n - 1 {
        let rip = 0x10_0000 + (i * 0x9e37) % 0x4_0000;
        let (exit, event) = match i % 11 {
            0 | 4 | 8 => (ExitKind::IoIn(0x40), Event::Time { ns: i * 1_000_003 }),
            1 | 5 => (
                ExitKind::Trap(1),
                Event::Time {
                    ns: i * i * 0x1_0001,
                },
            ),
            2 => (
                ExitKind::IoIn(0x3f8),
                Event::SerialIn {
                    // 1 .. 600 bytes: lengths from one to two nonzero bytes.
                    bytes: (0..(i * 37) % 600 + 1).map(|b| (b * 7 + i) as u8).collect(),
                },
            ),
            3 => (
                ExitKind::IrqWindowOpen,
                Event::Interrupt {
                    vector: 0x20 + (i % 16) as u8,
                },
            ),
            6 => (
                ExitKind::MmioRead(0xfee0_0030),
                Event::Time { ns: 0x5_0014 },
            ),
            7 => (
                ExitKind::Hlt,
                Event::Check {
                    regs_digest: i.wrapping_mul(0x9e37_79b9_7f4a_7c15),
                },
            ),
            9 => (ExitKind::IoOut(0x3f8), Event::Progress { frames_out: 0 }),
            _ => (ExitKind::Msr(0x10), Event::Time { ns: i << 20 }),
        };
        out.push(rec(i, rip, exit, event));
    }
    out.push(rec(
        n - 1,
        0x10_0100,
        ExitKind::Stop,
        Event::End {
            reason: EndReason::Exit(0),
            regs_digest: 0x1234,
            mem_digest: 0x5678,
        },
    ));
    out
}

/// CRC-8/SMBUS, written independently of the crate's so the tests check
/// the format rather than the implementation against itself.
pub fn crc8(data: &[u8]) -> u8 {
    data.iter().fold(0u8, |mut crc, &b| {
        crc ^= b;
        for _ in 0..8 {
            crc = (crc << 1) ^ if crc & 0x80 != 0 { 0x07 } else { 0 };
        }
        crc
    })
}

/// A frame's length word (FORMAT.md): 24-bit length, then its check byte.
pub fn length_word(len: u32) -> [u8; 4] {
    assert!(len < 1 << 24);
    let [a, b, c, _] = len.to_le_bytes();
    [a, b, c, crc8(&[a, b, c])]
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
