//! The log kept in memory by whichever VMM is primary, from boot: a backup
//! that joins gets all of it from byte 0 and replays up to the present.
//! (Re-protection by replaying from boot: the boot state is the snapshot.)
//!
//! It also knows where each high-water mark ends, so that the stream to a
//! backup can tell which marks it has sent: an acknowledgement of anything
//! more is a lie (see `stream.rs`).

use std::io::Write;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

#[derive(Default)]
struct Inner {
    bytes: Vec<u8>,
    /// (offset just past the mark, its ordinal), in log order.
    marks: Vec<(usize, u64)>,
    /// A mark whose bytes the next append ends with.
    next_mark: Option<u64>,
}

#[derive(Default)]
pub struct LogBuf {
    inner: Mutex<Inner>,
    grew: Condvar,
}

impl LogBuf {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    pub fn len(&self) -> usize {
        self.inner.lock().unwrap().bytes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn append(&self, b: &[u8]) {
        let mut g = self.inner.lock().unwrap();
        g.bytes.extend_from_slice(b);
        if let Some(ord) = g.next_mark.take() {
            let end = g.bytes.len();
            g.marks.push((end, ord));
        }
        drop(g);
        self.grew.notify_all();
    }

    /// Says that the bytes of a high-water mark at `ordinal` come next and
    /// end the next append. The log writer hands over its buffer in one
    /// write when flushed, so a writer that calls this just before
    /// appending the mark record and flushes right after it is exact; the
    /// mark is noted in the same step as its bytes, never after a reader
    /// could have seen them.
    pub fn mark_follows(&self, ordinal: u64) {
        self.inner.lock().unwrap().next_mark = Some(ordinal);
    }

    /// The ordinal of the last mark wholly within the first `len` bytes.
    pub fn last_mark_within(&self, len: usize) -> Option<u64> {
        let g = self.inner.lock().unwrap();
        let i = g.marks.partition_point(|&(end, _)| end <= len);
        i.checked_sub(1).map(|i| g.marks[i].1)
    }

    /// Bytes from `offset` on, waiting up to `timeout` for there to be any.
    pub fn read_from(&self, offset: usize, timeout: Duration) -> Vec<u8> {
        let g = self.inner.lock().unwrap();
        let (g, _) = self
            .grew
            .wait_timeout_while(g, timeout, |g| g.bytes.len() <= offset)
            .unwrap();
        g.bytes.get(offset..).map(<[u8]>::to_vec).unwrap_or_default()
    }
}

/// `Write` into a `LogBuf`, for a `LogWriter`.
pub struct LogBufWriter(pub Arc<LogBuf>);

impl Write for LogBufWriter {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.append(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readers_wait_for_growth() {
        let log = LogBuf::new();
        let l2 = log.clone();
        let t = std::thread::spawn(move || l2.read_from(3, Duration::from_secs(5)));
        std::thread::sleep(Duration::from_millis(20));
        LogBufWriter(log.clone()).write_all(b"abcdef").unwrap();
        assert_eq!(t.join().unwrap(), b"def");
        assert!(log.read_from(6, Duration::from_millis(1)).is_empty());
    }

    #[test]
    fn marks_are_known_by_where_they_end() {
        let log = LogBuf::new();
        log.append(b"header");
        assert_eq!(log.last_mark_within(100), None);
        log.mark_follows(7);
        log.append(b"recs+mark"); // ends at 15
        log.append(b"more");
        log.mark_follows(9);
        log.append(b"mark"); // ends at 23
        assert_eq!(log.last_mark_within(14), None);
        assert_eq!(log.last_mark_within(15), Some(7));
        assert_eq!(log.last_mark_within(22), Some(7));
        assert_eq!(log.last_mark_within(23), Some(9));
        assert_eq!(log.last_mark_within(usize::MAX), Some(9));
    }
}
