//! The log kept in memory by whichever VMM is primary: the records its
//! backup has not acknowledged yet. A backup that joins gets a snapshot
//! and the log from the snapshot's offset on (`xfer.rs`); one whose stream
//! broke resumes from what it received (`resume.rs`), which is at least
//! what it acknowledged. So the bytes before the last acknowledged mark
//! (or before the last snapshot) are dropped (`trim_before`,
//! `trim_through_mark`): offsets stay absolute (bytes since the log
//! began), the buffer holds only `[base, len)`.
//!
//! It also knows where each high-water mark ends, so that the stream to a
//! backup can tell which marks it has sent: an acknowledgement of anything
//! more is a lie (see `stream.rs`).

use std::io::Write;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

#[derive(Default)]
struct Inner {
    /// The log's bytes from offset `base` on, after `front` dropped ones:
    /// trimming at every acknowledgement must not move the whole kept log
    /// each time (under the lock the vCPU appends with), so the dropped
    /// prefix is removed only once it is at least half of the buffer.
    bytes: Vec<u8>,
    front: usize,
    base: usize,
    /// (offset just past the mark, its ordinal), in log order.
    marks: Vec<(usize, u64)>,
    /// A mark whose bytes the next append ends with.
    next_mark: Option<u64>,
}

impl Inner {
    /// Offset of the end of the log.
    fn end(&self) -> usize {
        self.base + self.bytes.len() - self.front
    }
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

    /// Offset of the end of the log (bytes ever appended).
    pub fn len(&self) -> usize {
        let g = self.inner.lock().unwrap();
        g.end()
    }

    /// Offset of the first byte still held.
    pub fn base(&self) -> usize {
        self.inner.lock().unwrap().base
    }

    /// Bytes actually held (what `trim_before` keeps bounded).
    pub fn kept(&self) -> usize {
        let g = self.inner.lock().unwrap();
        g.bytes.len() - g.front
    }

    /// Drops the bytes before `offset` (no backup will ever need them: a
    /// backup that joins gets a snapshot). Marks before it are dropped too,
    /// except the last one, so that `last_mark_within` still answers.
    pub fn trim_before(&self, offset: usize) {
        let mut g = self.inner.lock().unwrap();
        let offset = offset.min(g.end());
        if offset <= g.base {
            return;
        }
        g.front += offset - g.base;
        g.base = offset;
        if 2 * g.front >= g.bytes.len() {
            let front = std::mem::take(&mut g.front);
            g.bytes.drain(..front);
        }
        let keep_from = g.marks.partition_point(|&(e, _)| e <= offset).saturating_sub(1);
        g.marks.drain(..keep_from);
    }

    /// A backup acknowledged `ordinal`: drops the bytes it surely holds,
    /// through the end of the *first* mark at that ordinal (or of the last
    /// one before it). Two marks can share an ordinal (an idle exit is
    /// marked before its wait and again after the time it logged), and an
    /// acknowledgement of the first must not drop the bytes up to the
    /// second: a backup whose stream broke in between resumes from there.
    pub fn trim_through_mark(&self, ordinal: u64) {
        let end = {
            let g = self.inner.lock().unwrap();
            let i = g.marks.partition_point(|&(_, o)| o < ordinal);
            match g.marks.get(i) {
                Some(&(end, o)) if o == ordinal => Some(end),
                _ => i.checked_sub(1).map(|i| g.marks[i].0),
            }
        };
        if let Some(end) = end {
            self.trim_before(end);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn append(&self, b: &[u8]) {
        let mut g = self.inner.lock().unwrap();
        g.bytes.extend_from_slice(b);
        if let Some(ord) = g.next_mark.take() {
            let end = g.end();
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

    /// Bytes from `offset` on, waiting up to `timeout` for there to be any;
    /// `Err(base)` if bytes before `offset` were already dropped (the
    /// reader must start over from a fresh snapshot).
    pub fn read_from(&self, offset: usize, timeout: Duration) -> Result<Vec<u8>, usize> {
        let g = self.inner.lock().unwrap();
        let (g, _) = self
            .grew
            .wait_timeout_while(g, timeout, |g| g.end() <= offset)
            .unwrap();
        if offset < g.base {
            return Err(g.base);
        }
        Ok(g.bytes.get(g.front + offset - g.base..).map(<[u8]>::to_vec).unwrap_or_default())
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
        assert_eq!(t.join().unwrap().unwrap(), b"def");
        assert!(log.read_from(6, Duration::from_millis(1)).unwrap().is_empty());
    }

    /// The log is kept from the end of the last acknowledged mark: what a
    /// backup that resumes may still ask for.
    #[test]
    fn an_acknowledged_mark_drops_the_log_through_it() {
        let log = LogBuf::new();
        log.append(b"head");
        log.mark_follows(3);
        log.append(b"exit3");
        log.mark_follows(7);
        log.append(b"exit7");
        log.append(b"more");
        log.trim_through_mark(5);
        assert_eq!((log.base(), log.len()), (9, 18));
        assert_eq!(log.read_from(9, Duration::ZERO).unwrap(), b"exit7more");
        assert_eq!(log.last_mark_within(18), Some(7));
        log.trim_through_mark(7);
        assert_eq!(log.base(), 14);
        log.trim_through_mark(2);
        assert_eq!(log.base(), 14, "an older mark never brings anything back");
    }

    /// Two marks at one ordinal (an idle exit marked before its wait and
    /// after it): an acknowledgement of that ordinal may be the first's,
    /// so the bytes between them stay.
    #[test]
    fn an_acknowledgement_keeps_what_follows_the_first_mark_of_its_ordinal() {
        let log = LogBuf::new();
        log.append(b"head");
        log.mark_follows(5);
        log.append(b"idle5");
        log.append(b"time5");
        log.mark_follows(5);
        log.append(b"done5");
        log.trim_through_mark(5);
        assert_eq!(log.base(), 9, "the bytes after the first mark at 5 were dropped");
        log.trim_through_mark(6);
        assert_eq!(log.base(), 19, "a later ordinal covers both");
    }

    /// A small trim is only noted (the bytes move once the dropped part is
    /// half the buffer): reads, lengths and later appends see no difference.
    #[test]
    fn a_trim_of_less_than_half_reads_the_same() {
        let log = LogBuf::new();
        log.append(b"0123456789");
        log.trim_before(3);
        assert_eq!((log.base(), log.len(), log.kept()), (3, 10, 7));
        assert_eq!(log.read_from(5, Duration::ZERO).unwrap(), b"56789");
        assert_eq!(log.read_from(2, Duration::ZERO), Err(3));
        log.mark_follows(1);
        log.append(b"ab");
        assert_eq!(log.last_mark_within(12), Some(1));
        log.trim_before(8);
        assert_eq!(log.read_from(8, Duration::ZERO).unwrap(), b"89ab");
        assert_eq!((log.base(), log.len(), log.kept()), (8, 12, 4));
    }

    #[test]
    fn trimmed_bytes_are_gone_but_offsets_stay() {
        let log = LogBuf::new();
        log.append(b"header");
        log.mark_follows(7);
        log.append(b"recs+mark"); // ends at 15
        log.append(b"more");
        log.trim_before(15);
        assert_eq!(log.len(), 19);
        assert_eq!(log.kept(), 4);
        assert_eq!(log.read_from(15, Duration::from_millis(1)).unwrap(), b"more");
        assert_eq!(log.read_from(3, Duration::from_millis(1)), Err(15));
        assert_eq!(log.last_mark_within(19), Some(7));
        log.trim_before(100);
        assert_eq!((log.len(), log.kept()), (19, 0));
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
