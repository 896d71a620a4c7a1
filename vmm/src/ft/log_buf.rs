//! The log kept in memory by whichever VMM is primary, from boot: a backup
//! that joins gets all of it from byte 0 and replays up to the present.
//! (Re-protection by replaying from boot: the boot state is the snapshot.)

use std::io::Write;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

#[derive(Default)]
pub struct LogBuf {
    bytes: Mutex<Vec<u8>>,
    grew: Condvar,
}

impl LogBuf {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    pub fn len(&self) -> usize {
        self.bytes.lock().unwrap().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn append(&self, b: &[u8]) {
        self.bytes.lock().unwrap().extend_from_slice(b);
        self.grew.notify_all();
    }

    /// Bytes from `offset` on, waiting up to `timeout` for there to be any.
    pub fn read_from(&self, offset: usize, timeout: Duration) -> Vec<u8> {
        let g = self.bytes.lock().unwrap();
        let (g, _) = self
            .grew
            .wait_timeout_while(g, timeout, |b| b.len() <= offset)
            .unwrap();
        g.get(offset..).map(<[u8]>::to_vec).unwrap_or_default()
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
}
