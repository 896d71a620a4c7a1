//! Cut and damaged logs: the reader must say Truncated vs Corrupt, and
//! name the right record and offset.

mod common;

use common::*;
use replay_log::*;

#[test]
fn truncation_at_every_byte_offset() {
    let records = three();
    let full = encode(&records);
    let b = boundaries(&records);
    assert_eq!(*b.last().unwrap(), full.len() as u64);
    let header_len = b[0] as usize;

    for cut in 0..=full.len() {
        let data = &full[..cut];
        if cut < header_len {
            match LogReader::new(data, "cut.ftlog") {
                Err(
                    e @ LogError::Truncated {
                        offset: 0,
                        record: 0,
                        ..
                    },
                ) => {
                    let msg = e.to_string();
                    assert!(msg.contains("cut.ftlog") && msg.contains("header"), "{msg}");
                }
                Err(e) => panic!("cut {cut}: {e}"),
                Ok(_) => panic!("cut {cut}: header accepted"),
            }
            continue;
        }
        let mut r = LogReader::new(data, "cut.ftlog").unwrap();
        let whole = b[1..].iter().filter(|&&e| e as usize <= cut).count();
        for want in &records[..whole] {
            assert_eq!(&r.next_record().unwrap().unwrap(), want, "cut {cut}");
        }
        let at_boundary = b.contains(&(cut as u64));
        match r.next_record() {
            Ok(None) if at_boundary => {}
            Err(LogError::Truncated {
                source_name,
                offset,
                record,
            }) if !at_boundary => {
                assert_eq!(source_name, "cut.ftlog");
                assert_eq!(offset, b[whole], "cut {cut}");
                assert_eq!(record, whole as u64, "cut {cut}");
            }
            other => panic!("cut {cut}: {other:?}"),
        }
        assert_eq!(r.offset(), b[whole]);
        assert_eq!(r.records_read(), whole as u64);
    }
}

#[test]
fn truncated_message_names_source_offset_and_record() {
    let records = three();
    let full = encode(&records);
    let b = boundaries(&records);
    let (_, err) = read_all(&full[..b[2] as usize + 3]);
    let msg = err.unwrap_err().to_string();
    assert_eq!(
        msg,
        format!(
            "test.ftlog ends inside record #2 at byte offset {} (truncated log)",
            b[2]
        )
    );
}

/// Reads `data` to the end and asserts it yields `records[..i]`, then
/// `Corrupt` for record `i` at `start`, with the full message. Returns the
/// complaint.
fn expect_corrupt(data: &[u8], records: &[Record], i: usize, start: u64, ctx: &str) -> String {
    let (got, err) = read_all(data);
    assert!(got[..] == records[..i], "{ctx}: got {} records", got.len());
    match err {
        Err(
            ref e @ LogError::Corrupt {
                offset,
                record,
                ref what,
                ..
            },
        ) => {
            assert_eq!((offset, record), (start, i as u64), "{ctx}");
            assert_eq!(
                e.to_string(),
                format!("corrupt record #{i} at byte offset {start} in test.ftlog: {what}"),
                "{ctx}"
            );
            what.clone()
        }
        other => panic!("{ctx}: {other:?}"),
    }
}

/// A single damaged byte at `pos` of the frame starting at `start`: the
/// length word's check byte catches it there, the frame checksum elsewhere.
fn expected_complaint(pos: usize, start: usize) -> &'static str {
    if pos < start + 4 {
        "record length field damaged (check byte "
    } else {
        "checksum mismatch"
    }
}

#[test]
fn flipped_byte_anywhere_in_a_record_is_corrupt_never_truncated() {
    let records = three();
    let full = encode(&records);
    let b = boundaries(&records);
    for i in 0..records.len() {
        let (start, end) = (b[i] as usize, b[i + 1] as usize);
        // Length word, body and checksum, with several kinds of damage.
        for pos in start..end {
            for mask in [0x01, 0x5a, 0x80, 0xff] {
                let mut data = full.clone();
                data[pos] ^= mask;
                let ctx = format!("byte {pos} ^ {mask:#04x}");
                let what = expect_corrupt(&data, &records, i, start as u64, &ctx);
                assert!(
                    what.starts_with(expected_complaint(pos, start)),
                    "{ctx}: {what}"
                );
            }
        }
    }
}

#[test]
fn every_change_to_a_length_word_is_corrupt() {
    let records = three();
    let full = encode(&records);
    let b = boundaries(&records);
    for (i, &start) in b[..records.len()].iter().enumerate() {
        let start = start as usize;
        for pos in start..start + 4 {
            for mask in 1..=255u8 {
                let mut data = full.clone();
                data[pos] ^= mask;
                let ctx = format!("byte {pos} ^ {mask:#04x}");
                let what = expect_corrupt(&data, &records, i, start as u64, &ctx);
                let [l0, l1, l2, check] = data[start..start + 4].try_into().unwrap();
                assert_eq!(
                    what,
                    format!(
                        "record length field damaged (check byte {check:#04x}, expected {:#04x})",
                        crc8(&[l0, l1, l2])
                    ),
                    "{ctx}"
                );
            }
        }
    }
}

#[test]
fn length_word_is_judged_before_waiting_for_the_body() {
    // Only the damaged length word has arrived (a file still being written,
    // a slow socket): that is already corruption, not a frame in progress.
    let records = three();
    let b = boundaries(&records);
    let start = b[1] as usize;
    let mut data = encode(&records);
    data[start + 2] ^= 0x10; // length now points far past the end
    for have in [start + 4, start + 5, b[2] as usize, data.len()] {
        let (got, err) = read_all(&data[..have]);
        assert_eq!(got, records[..1], "{have} bytes");
        match err {
            Err(LogError::Corrupt {
                offset,
                record: 1,
                what,
                ..
            }) => {
                assert_eq!(offset, b[1]);
                assert!(what.starts_with("record length field damaged"), "{what}");
            }
            other => panic!("{have} bytes: {other:?}"),
        }
    }
    // The same one byte at a time, like a socket.
    let mut r = LogReader::new(Trickle(&data[..start + 4]), "peer").unwrap();
    assert_eq!(r.next_record().unwrap().unwrap(), records[0]);
    assert!(matches!(
        r.next_record(),
        Err(LogError::Corrupt { record: 1, .. })
    ));
}

#[test]
fn damaged_length_message() {
    let records = three();
    let b = boundaries(&records);
    let start = b[1] as usize;
    let mut data = encode(&records);
    let word: [u8; 4] = data[start..start + 4].try_into().unwrap();
    data[start + 3] = word[3] ^ 0xff;
    let (_, err) = read_all(&data);
    assert_eq!(
        err.unwrap_err().to_string(),
        format!(
            "corrupt record #1 at byte offset {start} in test.ftlog: \
             record length field damaged (check byte {:#04x}, expected {:#04x})",
            word[3] ^ 0xff,
            word[3]
        )
    );
}

#[test]
fn huge_length_is_corrupt_not_an_allocation() {
    // The largest length a word can hold, with a valid check byte, is the
    // body limit: nothing larger can even be expressed.
    let records = three();
    let b = boundaries(&records);
    let mut data = encode(&records);
    let start = b[1] as usize;
    data[start..start + 4].copy_from_slice(&length_word(MAX_RECORD_BODY));
    assert_eq!(length_word(MAX_RECORD_BODY), [0xff, 0xff, 0xff, 0x0f]);
    // Points past the end, and its check byte is right: a cut log.
    let (got, err) = read_all(&data);
    assert_eq!(got, records[..1]);
    assert!(
        matches!(err, Err(LogError::Truncated { record: 1, offset, .. }) if offset == b[1]),
        "{err:?}"
    );
    // Any other top byte is a damaged length word, judged on 4 bytes.
    data[start + 3] = 0x80;
    let (got, err) = read_all(&data[..start + 4]);
    assert_eq!(got, records[..1]);
    assert!(
        matches!(err, Err(LogError::Corrupt { record: 1, ref what, .. }) if what.contains("length")),
        "{err:?}"
    );
}

#[test]
fn small_length_change_inside_the_log_is_corrupt() {
    let records = three();
    let b = boundaries(&records);
    for delta in [1u8, 2, 4] {
        let mut data = encode(&records);
        data[b[0] as usize] ^= delta; // record 0's length, still within the log
        let what = expect_corrupt(&data, &records, 0, b[0], &format!("delta {delta}"));
        assert!(what.starts_with("record length field damaged"), "{what}");
    }
}

#[test]
fn only_a_checked_length_past_the_end_is_truncated() {
    let records = three();
    let b = boundaries(&records);
    let start = b[2] as usize;
    let len = (b[3] - b[2]) as u32 - 8; // record 2's body

    // A damaged length that overshoots EOF: corrupt, not a cut.
    let mut data = encode(&records);
    data[start] ^= 0x40;
    let what = expect_corrupt(&data, &records, 2, b[2], "flipped");
    assert!(what.starts_with("record length field damaged"), "{what}");

    // A length word that checks out but wants more than there is: the data
    // ends early, which is a truncated log.
    let mut data = encode(&records);
    assert_eq!(data[start..start + 4], length_word(len));
    data[start..start + 4].copy_from_slice(&length_word(len + 0x40));
    let (got, err) = read_all(&data);
    assert_eq!(got, records[..2]);
    assert!(
        matches!(err, Err(LogError::Truncated { record: 2, offset, .. }) if offset == b[2]),
        "{err:?}"
    );
}

#[test]
fn crc8_helper_is_crc8_smbus() {
    assert_eq!(crc8(b"123456789"), 0xf4);
}

/// A log like a real recording: every byte position of the record area
/// damaged in turn is `Corrupt` at the record holding it, never `Truncated`
/// and never accepted.
#[test]
fn every_byte_of_a_long_recording_flipped_is_corrupt() {
    let records = recording(300);
    let full = encode(&records);
    let b = boundaries(&records);
    assert_eq!(*b.last().unwrap(), full.len() as u64);
    // The mix has serial frames whose length needs two bytes.
    assert!(records.iter().any(|r| r.encoded_len() > 256 + 8));
    const MASKS: [u8; 8] = [0xff, 0x01, 0x80, 0x5a, 0x10, 0xa5, 0x02, 0x40];
    let mut data = full.clone();
    let mut i = 0;
    for pos in b[0] as usize..full.len() {
        while pos >= b[i + 1] as usize {
            i += 1;
        }
        let start = b[i] as usize;
        let mask = MASKS[pos % MASKS.len()];
        data[pos] ^= mask;
        let ctx = format!("byte {pos} ^ {mask:#04x} (record #{i})");
        let what = expect_corrupt(&data, &records, i, start as u64, &ctx);
        assert!(
            what.starts_with(expected_complaint(pos, start)),
            "{ctx}: {what}"
        );
        data[pos] ^= mask;
    }
    assert_eq!(data, full);
}

#[test]
fn a_long_recording_cut_anywhere_is_truncated_or_a_clean_end() {
    let records = recording(300);
    let full = encode(&records);
    let b = boundaries(&records);
    let mut whole = 0;
    for cut in b[0] as usize..=full.len() {
        while whole < records.len() && b[whole + 1] as usize <= cut {
            whole += 1;
        }
        let (got, err) = read_all(&full[..cut]);
        assert!(got[..] == records[..whole], "cut {cut}");
        match err {
            Ok(()) => assert_eq!(cut as u64, b[whole], "cut {cut}: clean end mid-frame"),
            Err(LogError::Truncated { offset, record, .. }) => {
                assert_eq!((offset, record), (b[whole], whole as u64), "cut {cut}");
                assert_ne!(cut as u64, b[whole], "cut {cut}: boundary reported as cut");
            }
            Err(e) => panic!("cut {cut}: {e}"),
        }
    }
}

/// Writes one frame with a correct checksum around an arbitrary body, to
/// reach the checks behind the checksum.
fn frame(body: &[u8]) -> Vec<u8> {
    let mut f = length_word(body.len() as u32).to_vec();
    f.extend_from_slice(body);
    let crc = crc32fast::hash(&f);
    f.extend_from_slice(&crc.to_le_bytes());
    f
}

fn body(kind: u8, exit: u8, detail: u64, payload: &[u8]) -> Vec<u8> {
    let mut b = vec![kind];
    b.extend_from_slice(&3u64.to_le_bytes());
    b.extend_from_slice(&0x1000u64.to_le_bytes());
    b.push(exit);
    b.extend_from_slice(&detail.to_le_bytes());
    b.extend_from_slice(payload);
    b
}

#[test]
fn checksummed_but_invalid_bodies_are_corrupt() {
    let cases: &[(&str, Vec<u8>)] = &[
        ("unknown event kind", body(99, 1, 0, &[])),
        ("event kind code 0", body(0, 1, 0, &[])),
        ("retired event kind 5 (version 1's Value)", body(5, 1, 0, &[0; 8])),
        ("pages: short count", body(9, 11, 0, &[1, 0])),
        ("pages: count without pages", body(9, 11, 0, &[1, 0, 0, 0])),
        ("pages: huge count", body(9, 11, 0, &[0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0])),
        ("pages: unaligned page", body(9, 11, 0, &[&[1u8, 0, 0, 0][..], &7u64.to_le_bytes(), &lz4_flex::block::compress(&[0u8; 4096])].concat())),
        ("pages: data too short", body(9, 11, 0, &[&[1u8, 0, 0, 0][..], &0u64.to_le_bytes(), &lz4_flex::block::compress(&[0u8; 100])].concat())),
        ("pages: not lz4", body(9, 11, 0, &[&[1u8, 0, 0, 0][..], &0u64.to_le_bytes(), &[0xffu8; 20][..]].concat())),
        ("resync with detail", body(10, 11, 1, &[])),
        ("unknown exit kind", body(7, 42, 0, &[])),
        ("detail on boot", body(7, 1, 5, &[])),
        ("port too wide", body(7, 2, 0x1_0000, &[])),
        ("msr too wide", body(7, 9, 1 << 32, &[])),
        ("short time payload", body(2, 1, 0, &[1, 2, 3])),
        ("long progress payload", body(7, 1, 0, &[0])),
        ("bad end reason", body(8, 10, 0, &[9; 18])),
        (
            "status on reset",
            body(
                8,
                10,
                0,
                &[1, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            ),
        ),
        ("body shorter than fixed part", vec![7, 0, 0]),
    ];
    let good = three();
    for (name, b) in cases {
        let mut data = encode(&good[..1]);
        let start = data.len() as u64;
        data.extend_from_slice(&frame(b));
        let (got, err) = read_all(&data);
        assert_eq!(got, good[..1], "{name}");
        match err {
            Err(LogError::Corrupt {
                offset, record: 1, ..
            }) => assert_eq!(offset, start, "{name}"),
            other => panic!("{name}: {other:?}"),
        }
    }
    // Sanity: the helper does make valid frames.
    let mut data = encode(&[]);
    data.extend_from_slice(&frame(&body(7, 1, 0, &5u64.to_le_bytes())));
    let (got, err) = read_all(&data);
    err.unwrap();
    assert_eq!(got, vec![rec(3, 0x1000, ExitKind::Boot, Event::Progress { frames_out: 5 })]);
}

#[test]
fn corruption_is_sticky() {
    let records = three();
    let b = boundaries(&records);
    let mut data = encode(&records);
    data[b[1] as usize + 6] ^= 1;
    let mut r = LogReader::new(&data[..], "x").unwrap();
    r.next_record().unwrap().unwrap();
    for _ in 0..3 {
        assert!(matches!(
            r.next_record(),
            Err(LogError::Corrupt { record: 1, .. })
        ));
    }
    assert_eq!(r.offset(), b[1]);
}

#[test]
fn bad_magic_is_not_a_log() {
    for data in [&b"#!/bin/sh\necho hi\n"[..], b"FTVMLOX", b"x"] {
        let err = LogReader::new(data, "script.sh").err().expect("error");
        assert!(matches!(err, LogError::NotALog { .. }), "{err:?}");
        assert_eq!(
            err.to_string(),
            "script.sh is not an ftvm log (bad magic at byte 0)"
        );
    }
}

fn set_version(data: &mut [u8], version: u16) {
    data[8..10].copy_from_slice(&version.to_le_bytes());
    let payload_len = u32::from_le_bytes(data[10..14].try_into().unwrap()) as usize;
    let crc_at = 14 + payload_len;
    let crc = crc32fast::hash(&data[8..crc_at]);
    data[crc_at..crc_at + 4].copy_from_slice(&crc.to_le_bytes());
}

#[test]
fn higher_or_zero_version_is_refused() {
    for v in [FORMAT_VERSION + 1, u16::MAX, 0] {
        let mut data = encode(&three());
        set_version(&mut data, v);
        match LogReader::new(&data[..], "new.ftlog") {
            Err(e @ LogError::Version { .. }) => {
                let LogError::Version {
                    found, supported, ..
                } = e
                else {
                    unreachable!()
                };
                assert_eq!((found, supported), (v, FORMAT_VERSION));
                assert!(e.to_string().contains("new.ftlog"));
            }
            Err(e) => panic!("{e}"),
            Ok(_) => panic!("version {v} accepted"),
        }
    }
}

#[test]
fn header_damage_is_corrupt_header() {
    let data = encode(&three());
    let header_len = boundaries(&[])[0] as usize;
    // Every header byte after the version field (whose damage reads as a
    // version error, checked before the checksum).
    for pos in 10..header_len {
        let mut d = data.clone();
        d[pos] ^= 0x01;
        match LogReader::new(&d[..], "h.ftlog") {
            Err(
                e @ LogError::Corrupt {
                    offset: 0,
                    record: 0,
                    ..
                },
            ) => {
                let msg = e.to_string();
                assert!(
                    msg.starts_with("corrupt header at byte offset 0 in h.ftlog: header"),
                    "{msg}"
                );
            }
            // Growing the header length past the data reads as a cut log.
            Err(LogError::Truncated {
                offset: 0,
                record: 0,
                ..
            }) if (10..14).contains(&pos) => {}
            Err(e) => panic!("byte {pos}: {e}"),
            Ok(_) => panic!("byte {pos}: damaged header accepted"),
        }
    }
}

#[test]
fn checksummed_but_malformed_header_is_corrupt() {
    let mut data = encode(&[]);
    // Initrd flag 2, then fix the checksum so only the field check catches it.
    data[14 + 32] = 2;
    set_version(&mut data, FORMAT_VERSION);
    let err = LogReader::new(&data[..], "h").err().unwrap();
    assert!(
        matches!(err, LogError::Corrupt { record: 0, offset: 0, ref what, .. } if what.contains("initrd")),
        "{err:?}"
    );
}

#[test]
fn header_may_grow_within_a_version() {
    // FORMAT.md: readers ignore header payload bytes after the known fields.
    let full = encode(&three());
    let payload_len = u32::from_le_bytes(full[10..14].try_into().unwrap()) as usize;
    let end = 14 + payload_len;
    let mut data = full[..end].to_vec();
    data.extend_from_slice(b"future");
    data[10..14].copy_from_slice(&((payload_len + 6) as u32).to_le_bytes());
    data.extend_from_slice(&crc32fast::hash(&data[8..]).to_le_bytes());
    data.extend_from_slice(&full[end + 4..]);
    let mut r = LogReader::new(&data[..], "x").unwrap();
    assert_eq!(r.header(), &header());
    assert_eq!(r.next_record().unwrap().unwrap(), three()[0]);
}

#[test]
fn data_after_the_end_record_is_corrupt_when_the_end_is_final() {
    let mut records = three();
    records.retain(|r| !matches!(r.event, Event::End { .. }));
    records.push(rec(9, 0x100300, ExitKind::Stop, Event::End { reason: EndReason::Exit(0), regs_digest: 1, mem_digest: 2 }));
    let clean = encode(&records);
    let end_off = clean.len() as u64;
    // A whole valid record after the end, or a single junk byte.
    let mut more = records.clone();
    more.push(rec(10, 0x100400, ExitKind::Hlt, Event::Check { regs_digest: 3 }));
    for (what, data) in [("a record", encode(&more)), ("a byte", [clean.clone(), vec![0]].concat())] {
        let mut r = LogReader::new(&data[..], "tail.ftlog").unwrap().end_is_final();
        for _ in 0..records.len() {
            r.next_record().unwrap().unwrap();
        }
        let e = r.next_record().unwrap_err();
        assert!(matches!(e, LogError::Corrupt { offset, .. } if offset == end_off), "{what}: {e}");
        assert!(e.to_string().contains("data after the end record"), "{e}");
        // Without the flag, a reader still reads on (streams, tests).
        let mut r = LogReader::new(&data[..], "tail.ftlog").unwrap();
        for _ in 0..records.len() {
            r.next_record().unwrap().unwrap();
        }
        assert!(r.next_record().is_ok() || what == "a byte");
    }
    let mut r = LogReader::new(&clean[..], "ok.ftlog").unwrap().end_is_final();
    for _ in 0..records.len() {
        r.next_record().unwrap().unwrap();
    }
    assert!(r.next_record().unwrap().is_none());
}
