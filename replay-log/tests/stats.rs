mod common;

use common::*;
use replay_log::*;

#[test]
fn stats_counts_kinds_bytes_and_end() {
    let records = three();
    let mut all = records.clone();
    all.insert(1, rec(3, 0, ExitKind::Trap(1), Event::Time { ns: 500 }));
    all.insert(2, rec(4, 0, ExitKind::Trap(1), Event::Time { ns: 90 }));
    let data = encode(&all);
    let b = boundaries(&all);
    let (s, err) = stats(LogReader::new(&data[..], "s").unwrap());
    assert!(err.is_none());
    assert_eq!(s.records, 5);
    assert_eq!(s.header_bytes, b[0]);
    assert_eq!(s.total_bytes(), data.len() as u64);
    assert_eq!(s.bytes, data.len() as u64 - b[0]);
    assert_eq!(s.by_kind["time"], (2, 2 * all[1].encoded_len()));
    assert_eq!(s.by_kind["wallclock"].0, 1);
    assert_eq!(s.by_kind["serial-in"], (1, all[3].encoded_len()));
    assert_eq!(s.by_kind["end"].0, 1);
    assert_eq!(s.by_kind.len(), 4);
    assert_eq!(s.last_ordinal, 9);
    assert_eq!(s.guest_ns, Some(500));
    assert!(s.ended);
}

#[test]
fn stats_keeps_the_good_prefix_of_a_cut_log() {
    let records = three();
    let data = encode(&records);
    let b = boundaries(&records);
    let (s, err) = stats(LogReader::new(&data[..b[2] as usize + 1], "s").unwrap());
    assert_eq!(s.records, 2);
    assert_eq!(s.total_bytes(), b[2]);
    assert!(!s.ended);
    assert_eq!(s.guest_ns, None);
    assert!(matches!(err, Some(LogError::Truncated { record: 2, .. })));
}

#[test]
fn add_by_hand() {
    let mut s = LogStats::default();
    let r = rec(42, 0, ExitKind::Hlt, Event::Progress { frames_out: 0 });
    s.add(&r, r.encoded_len());
    assert_eq!((s.records, s.bytes, s.last_ordinal), (1, 42, 42));
    assert_eq!(s.by_kind["progress"], (1, 42));
}
