//! The guest console on the host side: bytes the guest writes go to stdout,
//! bytes typed on stdin are queued for the serial port.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError};

use crate::devices::OutputSink;

/// Guest output straight to stdout (line-buffered by std).
pub struct StdoutSink;

impl OutputSink for StdoutSink {
    fn emit(&mut self, bytes: &[u8]) {
        let mut out = std::io::stdout().lock();
        // A closed stdout (e.g. `| head`) must not kill the VM; the log
        // still records everything.
        let _ = out.write_all(bytes);
    }
}

/// Bytes typed for the guest, read by a thread so the vCPU never blocks on
/// stdin.
pub struct ConsoleInput {
    rx: Option<Receiver<Vec<u8>>>,
    pending: VecDeque<u8>,
}

impl ConsoleInput {
    /// No input at all (replay, or `--no-stdin`).
    pub fn none() -> Self {
        ConsoleInput { rx: None, pending: VecDeque::new() }
    }

    /// Input that arrives on a channel (fault-tolerant console clients).
    pub fn from_channel(rx: Receiver<Vec<u8>>) -> Self {
        ConsoleInput { rx: Some(rx), pending: VecDeque::new() }
    }

    /// Reads `src` on its own thread until EOF.
    pub fn spawn<R: Read + Send + 'static>(mut src: R) -> Self {
        let (tx, rx) = crossbeam_channel::unbounded();
        std::thread::Builder::new()
            .name("ftvm-stdin".into())
            .spawn(move || {
                let mut buf = [0u8; 4096];
                loop {
                    match src.read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => {
                            if tx.send(buf[..n].to_vec()).is_err() {
                                break;
                            }
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                        Err(_) => break,
                    }
                }
            })
            .expect("spawning the stdin thread");
        ConsoleInput { rx: Some(rx), pending: VecDeque::new() }
    }

    /// Moves whatever has arrived into the pending queue; with a timeout,
    /// waits up to that long for the first bytes.
    pub fn poll(&mut self, wait: Option<Duration>) {
        let Some(rx) = &self.rx else {
            if let Some(d) = wait {
                std::thread::sleep(d);
            }
            return;
        };
        if let Some(d) = wait {
            match rx.recv_timeout(d) {
                Ok(b) => self.pending.extend(b),
                Err(RecvTimeoutError::Timeout) => return,
                Err(RecvTimeoutError::Disconnected) => {
                    self.rx = None;
                    return;
                }
            }
        }
        while let Some(rx) = &self.rx {
            match rx.try_recv() {
                Ok(b) => self.pending.extend(b),
                Err(crossbeam_channel::TryRecvError::Empty) => break,
                Err(crossbeam_channel::TryRecvError::Disconnected) => self.rx = None,
            }
        }
    }

    /// The channel typed bytes arrive on, for a wait on it and others.
    pub fn receiver(&self) -> Option<&Receiver<Vec<u8>>> {
        self.rx.as_ref()
    }

    /// Whether more input may still come.
    pub fn open(&self) -> bool {
        self.rx.is_some()
    }

    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    pub fn take(&mut self, n: usize) -> Vec<u8> {
        let n = n.min(self.pending.len());
        self.pending.drain(..n).collect()
    }
}
