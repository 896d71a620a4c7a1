//! Authentication and privacy for every FT connection (witness requests,
//! the log stream and its acknowledgements, consoles): each TCP connection
//! starts with a Noise handshake, `Noise_NNpsk0_25519_ChaChaPoly_BLAKE2s`
//! (through `snow`), with the cluster key (`key.rs`) as pre-shared key.
//!
//! Why this pattern: both sides are ephemeral (forward secrecy: a key
//! stolen later does not open recorded traffic), and the PSK is mixed in
//! before the first message, so the initiator's first message already
//! proves it holds the key. A listener sends nothing, not even a banner,
//! to a peer whose first message fails: a stranger learns nothing, and
//! cannot feed any protocol a byte. The responder's answer proves the key
//! the other way. (A recorded first message can be replayed, but the
//! replayer cannot derive the session keys, so it gets nothing either.)
//!
//! After the handshake every message is a frame: a 2-byte big-endian length
//! (at most 65535, Noise's limit) and a ChaCha20-Poly1305 ciphertext with
//! its tag, under the next nonce of that direction. `SecureReader` and
//! `SecureWriter` are the two halves (the roles read and write one
//! connection from different threads); each keeps its own nonce over a
//! shared `snow::StatelessTransportState`. Every existing line/frame
//! protocol runs unchanged on top of them.
//!
//! Limits: [`serve`] keeps at most [`MAX_CONNS`] connections per listener
//! (more are closed at once), one named thread each, and closes a peer that
//! has not finished its handshake within [`HANDSHAKE_TIMEOUT`]. Refusals
//! are logged as one rate-limited warning line with the peer's address.

use std::fmt;
use std::io::{self, BufRead, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use snow::StatelessTransportState;

use super::key::ClusterKey;

pub const NOISE_PATTERN: &str = "Noise_NNpsk0_25519_ChaChaPoly_BLAKE2s";
/// Bound into the handshake hash: a peer speaking another version of the
/// FT protocols fails the handshake instead of misreading them.
const PROLOGUE: &[u8] = b"ftvm fault tolerance, protocol 1";
/// A peer must finish its handshake within this long.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(2);
/// Connections one listener serves at once (one thread each).
pub const MAX_CONNS: usize = 64;
const MAX_MSG: usize = 65535;
const TAG_LEN: usize = 16;
/// Most plaintext bytes in one frame.
pub const MAX_PLAINTEXT: usize = MAX_MSG - TAG_LEN;
/// Both NNpsk0 handshake messages: an ephemeral key (32) and the tag of an
/// empty payload (16).
const HANDSHAKE_MSG_LEN: usize = 48;

#[derive(Debug, thiserror::Error)]
pub enum SecureError {
    #[error("the peer closed the connection during the handshake (it does not accept this cluster key, is not an ftvm FT endpoint, or is overloaded)")]
    ClosedInHandshake,
    #[error("the peer closed the connection without a handshake")]
    NoHandshake,
    #[error("the peer does not hold the cluster key (its handshake failed authentication)")]
    WrongKey,
    #[error("no handshake within {0:?}")]
    HandshakeTimeout(Duration),
    #[error("not an ftvm handshake (a first message of {0} bytes)")]
    BadHandshake(usize),
    #[error("a frame of {0} bytes is shorter than its authentication tag")]
    ShortFrame(usize),
    #[error("a frame failed authentication (garbled in transit, or not from the peer)")]
    Garbled,
    #[error("the connection closed in the middle of a frame")]
    Truncated,
    #[error("an earlier error broke this connection: {0}")]
    Broken(String),
    #[error("noise: {0}")]
    Noise(String),
}

impl From<SecureError> for io::Error {
    fn from(e: SecureError) -> io::Error {
        use SecureError as S;
        let kind = match e {
            S::ClosedInHandshake | S::WrongKey => io::ErrorKind::PermissionDenied,
            S::HandshakeTimeout(_) => io::ErrorKind::TimedOut,
            S::NoHandshake | S::Truncated => io::ErrorKind::UnexpectedEof,
            _ => io::ErrorKind::InvalidData,
        };
        io::Error::new(kind, e)
    }
}

fn noise(e: snow::Error) -> io::Error {
    SecureError::Noise(e.to_string()).into()
}

/// Reads `buf` full by `deadline`; returns how much arrived before EOF.
fn read_by(tcp: &TcpStream, buf: &mut [u8], deadline: Instant) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(SecureError::HandshakeTimeout(HANDSHAKE_TIMEOUT).into());
        }
        tcp.set_read_timeout(Some(left))?;
        match (&*tcp).read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

fn send_handshake(tcp: &TcpStream, msg: &[u8], deadline: Instant) -> io::Result<()> {
    let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
    tcp.set_write_timeout(Some(left))?;
    let mut frame = (msg.len() as u16).to_be_bytes().to_vec();
    frame.extend_from_slice(msg);
    (&*tcp).write_all(&frame)
}

fn recv_handshake(tcp: &TcpStream, deadline: Instant, initiator: bool) -> io::Result<[u8; HANDSHAKE_MSG_LEN]> {
    let mut len = [0u8; 2];
    match read_by(tcp, &mut len, deadline)? {
        2 => {}
        0 if initiator => return Err(SecureError::ClosedInHandshake.into()),
        0 => return Err(SecureError::NoHandshake.into()),
        _ => return Err(SecureError::Truncated.into()),
    }
    let len = u16::from_be_bytes(len) as usize;
    if len != HANDSHAKE_MSG_LEN {
        return Err(SecureError::BadHandshake(len).into());
    }
    let mut msg = [0u8; HANDSHAKE_MSG_LEN];
    if read_by(tcp, &mut msg, deadline)? < HANDSHAKE_MSG_LEN {
        return Err(if initiator { SecureError::ClosedInHandshake } else { SecureError::Truncated }.into());
    }
    Ok(msg)
}

/// Runs the handshake on `tcp` (within [`HANDSHAKE_TIMEOUT`]) and splits
/// the connection into its two halves. The socket's timeouts are cleared
/// afterwards; callers set their own.
fn handshake(tcp: TcpStream, key: &ClusterKey, initiator: bool) -> io::Result<(SecureReader, SecureWriter)> {
    let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
    let params = NOISE_PATTERN.parse().map_err(noise)?;
    let builder = snow::Builder::new(params).psk(0, key.bytes()).and_then(|b| b.prologue(PROLOGUE)).map_err(noise)?;
    let mut hs = if initiator { builder.build_initiator() } else { builder.build_responder() }.map_err(noise)?;
    let mut msg = [0u8; HANDSHAKE_MSG_LEN];
    let mut payload = [0u8; HANDSHAKE_MSG_LEN];
    if initiator {
        let n = hs.write_message(&[], &mut msg).map_err(noise)?;
        send_handshake(&tcp, &msg[..n], deadline)?;
        let answer = recv_handshake(&tcp, deadline, true)?;
        hs.read_message(&answer, &mut payload).map_err(|_| SecureError::WrongKey)?;
    } else {
        let first = recv_handshake(&tcp, deadline, false)?;
        hs.read_message(&first, &mut payload).map_err(|_| SecureError::WrongKey)?;
        let n = hs.write_message(&[], &mut msg).map_err(noise)?;
        send_handshake(&tcp, &msg[..n], deadline)?;
    }
    let t = Arc::new(hs.into_stateless_transport_mode().map_err(noise)?);
    tcp.set_read_timeout(None)?;
    tcp.set_write_timeout(None)?;
    let reader = SecureReader {
        tcp: tcp.try_clone()?,
        t: t.clone(),
        nonce: 0,
        rbuf: vec![0; 2 + MAX_MSG],
        start: 0,
        end: 0,
        plain: vec![0; MAX_MSG],
        pos: 0,
        len: 0,
        broken: None,
    };
    Ok((reader, SecureWriter { tcp, t, nonce: 0, buf: vec![0; 2 + MAX_MSG], broken: false }))
}

/// Connects to `addr` and authenticates with `key`.
pub fn connect(addr: &str, key: &ClusterKey, timeout: Duration) -> io::Result<(SecureReader, SecureWriter)> {
    let mut last = io::Error::new(io::ErrorKind::InvalidInput, format!("{addr} resolves to no address"));
    for sa in addr.to_socket_addrs()? {
        match TcpStream::connect_timeout(&sa, timeout) {
            Ok(tcp) => {
                let _ = tcp.set_nodelay(true);
                return handshake(tcp, key, true);
            }
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// The server side of [`connect`], on an accepted connection.
pub fn accept(tcp: TcpStream, key: &ClusterKey) -> io::Result<(SecureReader, SecureWriter)> {
    let _ = tcp.set_nodelay(true);
    handshake(tcp, key, false)
}

/// The receiving half: decrypts frames; `BufRead` over their plaintext.
/// It reads whatever the socket has (one system call for many small
/// frames, as a `BufReader` would). A read timeout on the socket
/// (`tcp().set_read_timeout`) surfaces as `WouldBlock`/`TimedOut` and keeps
/// a partly received frame for the next call; a garbled, truncated or
/// forged frame is an error for good.
pub struct SecureReader {
    tcp: TcpStream,
    t: Arc<StatelessTransportState>,
    nonce: u64,
    /// Ciphertext received and not yet decrypted: `rbuf[start..end]`; room
    /// for the largest frame.
    rbuf: Vec<u8>,
    start: usize,
    end: usize,
    plain: Vec<u8>,
    pos: usize,
    len: usize,
    broken: Option<String>,
}

impl SecureReader {
    /// The socket, for timeouts, addresses and shutdown (never for data).
    pub fn tcp(&self) -> &TcpStream {
        &self.tcp
    }

    fn fail(&mut self, e: SecureError) -> io::Result<bool> {
        self.broken = Some(e.to_string());
        Err(e.into())
    }

    /// Receives and decrypts the next frame; false at a clean EOF.
    fn next_frame(&mut self) -> io::Result<bool> {
        if let Some(why) = &self.broken {
            return Err(SecureError::Broken(why.clone()).into());
        }
        loop {
            let have = self.end - self.start;
            if have >= 2 {
                let len = u16::from_be_bytes([self.rbuf[self.start], self.rbuf[self.start + 1]]) as usize;
                if len < TAG_LEN {
                    return self.fail(SecureError::ShortFrame(len));
                }
                if have >= 2 + len {
                    let body = self.start + 2..self.start + 2 + len;
                    let Ok(n) = self.t.read_message(self.nonce, &self.rbuf[body], &mut self.plain) else {
                        return self.fail(SecureError::Garbled);
                    };
                    self.nonce += 1;
                    self.start += 2 + len;
                    self.pos = 0;
                    self.len = n;
                    return Ok(true);
                }
            }
            if self.end == self.rbuf.len() {
                // The frame's start is at `start`: move it to the front, where
                // the largest frame fits.
                self.rbuf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            match (&self.tcp).read(&mut self.rbuf[self.end..]) {
                Ok(0) if have == 0 => return Ok(false),
                Ok(0) => return self.fail(SecureError::Truncated),
                Ok(n) => self.end += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}

impl BufRead for SecureReader {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        while self.pos == self.len {
            if !self.next_frame()? {
                return Ok(&[]);
            }
        }
        Ok(&self.plain[self.pos..self.len])
    }

    fn consume(&mut self, n: usize) {
        self.pos = (self.pos + n).min(self.len);
    }
}

impl Read for SecureReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let avail = self.fill_buf()?;
        let n = avail.len().min(out.len());
        out[..n].copy_from_slice(&avail[..n]);
        self.consume(n);
        Ok(n)
    }
}

/// The sending half: each `write` sends one frame of up to
/// [`MAX_PLAINTEXT`] bytes at once (nothing is buffered, `flush` is a
/// no-op). A failed write leaves the peer mid-frame, so the writer refuses
/// every later write.
pub struct SecureWriter {
    tcp: TcpStream,
    t: Arc<StatelessTransportState>,
    nonce: u64,
    buf: Vec<u8>,
    broken: bool,
}

impl SecureWriter {
    pub fn tcp(&self) -> &TcpStream {
        &self.tcp
    }
}

impl Write for SecureWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if self.broken {
            return Err(io::Error::new(io::ErrorKind::BrokenPipe, "an earlier write on this connection failed"));
        }
        if data.is_empty() {
            return Ok(0);
        }
        let n = data.len().min(MAX_PLAINTEXT);
        let c = self.t.write_message(self.nonce, &data[..n], &mut self.buf[2..]).map_err(noise)?;
        self.nonce += 1;
        self.buf[..2].copy_from_slice(&(c as u16).to_be_bytes());
        if let Err(e) = (&self.tcp).write_all(&self.buf[..2 + c]) {
            self.broken = true;
            return Err(e);
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// One authenticated connection handed to a listener's handler.
pub struct Conn {
    pub reader: SecureReader,
    pub writer: SecureWriter,
    pub peer: SocketAddr,
    /// Holds the connection's place under [`MAX_CONNS`] until dropped.
    pub slot: Slot,
}

/// A listener's count of open connections, given back on drop.
pub struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Accepts on `l` until it fails: at most [`MAX_CONNS`] connections at
/// once, each in its own thread named `thread`, which runs the handshake
/// and hands an authenticated connection to `handle`. Refused peers get
/// nothing. `who` names the role in log lines.
pub fn serve<F>(l: TcpListener, key: ClusterKey, who: &'static str, thread: &'static str, handle: F) -> io::Result<()>
where
    F: Fn(Conn) + Send + Sync + 'static,
{
    let handle = Arc::new(handle);
    let open = Arc::new(AtomicUsize::new(0));
    for tcp in l.incoming() {
        let tcp = match tcp {
            Ok(t) => t,
            Err(e) if transient(&e) => {
                log::debug!("{who}: accept: {e}");
                // Out of descriptors or memory: let connections close.
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
            Err(e) => return Err(e),
        };
        let peer = tcp.peer_addr().unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
        if open.fetch_add(1, Ordering::SeqCst) >= MAX_CONNS {
            open.fetch_sub(1, Ordering::SeqCst);
            drop(tcp);
            refused(who, peer, &format!("{MAX_CONNS} connections are open already"));
            continue;
        }
        let slot = Slot(open.clone());
        let (key, handle) = (key.clone(), handle.clone());
        let serve_one = move || match accept(tcp, &key) {
            Ok((reader, writer)) => handle(Conn { reader, writer, peer, slot }),
            Err(e) => {
                let probe = e.get_ref().and_then(|e| e.downcast_ref::<SecureError>()).is_some_and(|e| matches!(e, SecureError::NoHandshake));
                if probe {
                    log::debug!("{who}: {peer} closed the connection without a handshake");
                } else {
                    refused(who, peer, &e);
                }
            }
        };
        if let Err(e) = std::thread::Builder::new().name(thread.into()).spawn(serve_one) {
            log::warn!("{who}: cannot start a thread for a connection from {peer}: {e}");
        }
    }
    Ok(())
}

fn transient(e: &io::Error) -> bool {
    use io::ErrorKind as K;
    matches!(e.kind(), K::ConnectionAborted | K::ConnectionReset | K::Interrupted | K::WouldBlock | K::OutOfMemory)
        || matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM | libc::EPROTO))
}

/// When the last refusal was logged, and how many were not logged since.
static REFUSALS: Mutex<(Option<Instant>, u64)> = Mutex::new((None, 0));

/// One warning line per refused peer, at most one a second (a flood of
/// strangers must not flood the log either).
fn refused(who: &str, peer: SocketAddr, why: &dyn fmt::Display) {
    let mut r = REFUSALS.lock().unwrap_or_else(|e| e.into_inner());
    let now = Instant::now();
    if r.0.is_some_and(|t| now.saturating_duration_since(t) < Duration::from_secs(1)) {
        r.1 += 1;
        log::debug!("{who}: refused a connection from {peer}: {why}");
        return;
    }
    let more = std::mem::take(&mut r.1);
    r.0 = Some(now);
    let more = if more > 0 { format!(" ({more} more refused before this one, not shown)") } else { String::new() };
    log::warn!("{who}: refused a connection from {peer}: {why}{more}");
}

#[cfg(test)]
#[path = "secure_tests.rs"]
mod tests;
