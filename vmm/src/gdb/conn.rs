//! gdb's connection: a TCP socket, read through a buffer (gdbstub reads
//! one byte at a time), whose output can be held back.
//!
//! Why hold output: `monitor goto` moves the replay, which only the exit
//! loop can do, after gdbstub has handled the packet. gdbstub answers the
//! `qRcmd` packet with OK as soon as the handler returns; were that OK
//! sent then, gdb would send its next packet at once and give up on it
//! after `remotetimeout` (2 s) while the replay is still seeking. Held
//! back until the goal is reached, the OK is what gdb waits for, and gdb
//! waits for the end of a monitor command as long as it takes.

use std::cell::Cell;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::rc::Rc;

use gdbstub::conn::{Connection, ConnectionExt};

/// What [`GdbConn::poll`] found without blocking.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Poll {
    Data,
    Nothing,
    Closed,
}

pub struct GdbConn {
    sock: TcpStream,
    buf: Vec<u8>,
    pos: usize,
    /// Set (by the target's `monitor goto`) to hold output back.
    hold: Rc<Cell<bool>>,
    held: Vec<u8>,
    /// When gdb last heard from us while output was held.
    last_alive: std::time::Instant,
}

impl GdbConn {
    pub fn new(sock: TcpStream, hold: Rc<Cell<bool>>) -> GdbConn {
        GdbConn { sock, buf: Vec::with_capacity(4096), pos: 0, hold, held: Vec::new(), last_alive: std::time::Instant::now() }
    }

    /// While output is held, an empty console packet now and then: gdb
    /// gives up on a reply after `remotetimeout` (2 s), but each console
    /// packet of a monitor command starts the wait again, and an empty one
    /// prints nothing.
    pub fn keep_alive(&mut self) {
        if self.hold.get() && self.last_alive.elapsed() >= std::time::Duration::from_millis(500) {
            self.last_alive = std::time::Instant::now();
            let _ = Write::write_all(&mut self.sock, b"$O#4f");
        }
    }

    /// Whether output is held back.
    pub fn holding(&self) -> bool {
        self.hold.get()
    }

    /// Sends `first` (notes for gdb's console), then what was held back.
    pub fn release(&mut self, first: &[u8]) -> std::io::Result<()> {
        self.hold.set(false);
        self.last_alive = std::time::Instant::now();
        let held = std::mem::take(&mut self.held);
        Write::write_all(&mut self.sock, first)?;
        Write::write_all(&mut self.sock, &held)?;
        Write::flush(&mut self.sock)
    }

    /// Whether gdb sent something or closed the connection, without
    /// waiting (while the guest runs: Ctrl-C).
    pub fn poll(&mut self) -> Poll {
        if self.pos < self.buf.len() {
            return Poll::Data;
        }
        let mut b = [0u8; 1];
        // SAFETY: the socket's fd is open while `self.sock` lives; recv
        // writes at most 1 byte into `b`.
        let n = unsafe { libc::recv(self.sock.as_raw_fd(), b.as_mut_ptr().cast(), 1, libc::MSG_PEEK | libc::MSG_DONTWAIT) };
        match n {
            0 => Poll::Closed,
            n if n > 0 => Poll::Data,
            _ => Poll::Nothing,
        }
    }
}

impl Connection for GdbConn {
    type Error = std::io::Error;

    fn write(&mut self, byte: u8) -> Result<(), Self::Error> {
        self.write_all(&[byte])
    }

    fn write_all(&mut self, buf: &[u8]) -> Result<(), Self::Error> {
        if self.hold.get() {
            self.held.extend_from_slice(buf);
            return Ok(());
        }
        Write::write_all(&mut self.sock, buf)
    }

    fn flush(&mut self) -> Result<(), Self::Error> {
        if self.hold.get() {
            return Ok(());
        }
        Write::flush(&mut self.sock)
    }

    fn on_session_start(&mut self) -> Result<(), Self::Error> {
        self.sock.set_nodelay(true)
    }
}

impl ConnectionExt for GdbConn {
    fn read(&mut self) -> Result<u8, Self::Error> {
        if self.pos >= self.buf.len() {
            self.buf.resize(4096, 0);
            let n = loop {
                match Read::read(&mut self.sock, &mut self.buf) {
                    // A signal (SIGINT/SIGTERM to ftvm ends the session).
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted
                        && !crate::stop::INTERRUPTED.load(std::sync::atomic::Ordering::Relaxed) => continue,
                    r => break r,
                }
            };
            let n = n.inspect_err(|_| self.buf.clear())?;
            self.buf.truncate(n);
            self.pos = 0;
            if n == 0 {
                return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "gdb closed the connection"));
            }
        }
        self.pos += 1;
        Ok(self.buf[self.pos - 1])
    }

    fn peek(&mut self) -> Result<Option<u8>, Self::Error> {
        Ok(match self.poll() {
            Poll::Data if self.pos < self.buf.len() => Some(self.buf[self.pos]),
            Poll::Data => {
                let mut b = [0u8; 1];
                TcpStream::peek(&self.sock, &mut b)?;
                Some(b[0])
            }
            _ => None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;
    use std::time::Duration;

    fn pair() -> (GdbConn, TcpStream, Rc<Cell<bool>>) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (server, _) = l.accept().unwrap();
        client.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
        let hold = Rc::new(Cell::new(false));
        (GdbConn::new(server, hold.clone()), client, hold)
    }

    fn read_some(c: &mut TcpStream) -> Vec<u8> {
        let mut b = [0u8; 256];
        match Read::read(c, &mut b) {
            Ok(n) => b[..n].to_vec(),
            Err(_) => Vec::new(),
        }
    }

    #[test]
    fn held_output_goes_out_after_the_notes_on_release() {
        let (mut conn, mut gdb, hold) = pair();
        Connection::write_all(&mut conn, b"$a#61").unwrap();
        assert_eq!(read_some(&mut gdb), b"$a#61");
        hold.set(true);
        Connection::write_all(&mut conn, b"$OK#9a").unwrap();
        Connection::flush(&mut conn).unwrap();
        assert!(read_some(&mut gdb).is_empty(), "held back");
        conn.release(b"$O41#84").unwrap();
        let mut got = Vec::new();
        while got.len() < 13 {
            let more = read_some(&mut gdb);
            assert!(!more.is_empty());
            got.extend(more);
        }
        assert_eq!(got, b"$O41#84$OK#9a");
        assert!(!conn.holding());
    }

    #[test]
    fn reads_are_buffered_and_a_closed_socket_is_seen() {
        let (mut conn, mut gdb, _) = pair();
        assert_eq!(conn.poll(), Poll::Nothing);
        Write::write_all(&mut gdb, b"+$?#3f").unwrap();
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(conn.poll(), Poll::Data);
        assert_eq!(conn.peek().unwrap(), Some(b'+'));
        let got: Vec<u8> = (0..6).map(|_| conn.read().unwrap()).collect();
        assert_eq!(got, b"+$?#3f");
        drop(gdb);
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(conn.poll(), Poll::Closed);
        assert!(conn.read().is_err());
    }
}
