//! `SecureReader`/`SecureWriter` over real loopback sockets: what goes in
//! comes out, and anything else (another key, garbage, a cut or altered
//! frame) is an error, never a panic and never plaintext.

use super::*;
use std::net::TcpListener;
use std::thread;

fn key(b: u8) -> ClusterKey {
    ClusterKey::from_bytes([b; 32])
}

/// A listener whose next connection is handshaken as responder with `k`.
fn server(k: ClusterKey) -> (String, thread::JoinHandle<io::Result<(SecureReader, SecureWriter)>>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    (addr, thread::spawn(move || accept(l.accept()?.0, &k)))
}

fn kind(e: &io::Error) -> Option<&SecureError> {
    e.get_ref().and_then(|e| e.downcast_ref::<SecureError>())
}

#[test]
fn round_trip_both_ways_in_frames_of_any_size() {
    let (addr, srv) = server(key(1));
    let (mut cr, mut cw) = connect(&addr, &key(1), Duration::from_secs(1)).unwrap();
    let (mut sr, mut sw) = srv.join().unwrap().unwrap();
    super::super::write_line(&mut cw, "hello there").unwrap();
    assert_eq!(super::super::read_line(&mut sr).unwrap().as_deref(), Some("hello there"));
    // Larger than one frame, written from another thread while we read.
    let big: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let b2 = big.clone();
    let t = thread::spawn(move || {
        sw.write_all(&b2).unwrap();
        sw.write_all(b"tail\n").unwrap();
        sw
    });
    let mut got = vec![0u8; big.len()];
    cr.read_exact(&mut got).unwrap();
    assert!(got == big, "the payload changed in transit");
    assert_eq!(super::super::read_line(&mut cr).unwrap().as_deref(), Some("tail"));
    let sw = t.join().unwrap();
    drop(sw);
    drop(sr);
    let mut rest = Vec::new();
    assert_eq!(cr.read_to_end(&mut rest).unwrap(), 0, "clean EOF after the peer closed");
}

#[test]
fn wrong_key_fails_both_sides_and_the_listener_sends_nothing() {
    let (addr, srv) = server(key(1));
    let e = connect(&addr, &key(2), Duration::from_secs(1)).err().expect("connected with a wrong key");
    assert!(matches!(kind(&e), Some(SecureError::ClosedInHandshake)), "{e}");
    assert_eq!(e.kind(), io::ErrorKind::PermissionDenied);
    let e = srv.join().unwrap().err().expect("accepted a wrong key");
    assert!(matches!(kind(&e), Some(SecureError::WrongKey)), "{e}");

    // A raw client speaking a plausible first message gets no byte back.
    let (addr, srv) = server(key(1));
    let mut raw = TcpStream::connect(&addr).unwrap();
    let mut junk = vec![0u8, HANDSHAKE_MSG_LEN as u8];
    junk.extend_from_slice(&[0x41; HANDSHAKE_MSG_LEN]);
    raw.write_all(&junk).unwrap();
    raw.write_all(b"CONSOLE from=0\n").unwrap();
    assert!(srv.join().unwrap().is_err());
    raw.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut got = Vec::new();
    let _ = raw.read_to_end(&mut got);
    assert!(got.is_empty(), "the listener answered a stranger: {got:?}");
}

#[test]
fn silent_slow_and_malformed_handshakes_are_refused_in_time() {
    // Silent: the handshake times out.
    let (addr, srv) = server(key(1));
    let raw = TcpStream::connect(&addr).unwrap();
    let t0 = Instant::now();
    let e = srv.join().unwrap().err().unwrap();
    assert!(matches!(kind(&e), Some(SecureError::HandshakeTimeout(_))), "{e}");
    assert!(t0.elapsed() < HANDSHAKE_TIMEOUT + Duration::from_millis(500));
    drop(raw);
    // A length that is not a handshake: refused at once, nothing read.
    let (addr, srv) = server(key(1));
    let mut raw = TcpStream::connect(&addr).unwrap();
    raw.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    let e = srv.join().unwrap().err().unwrap();
    assert!(matches!(kind(&e), Some(SecureError::BadHandshake(_))), "{e}");
    // Closed without a byte: a probe, not an attack.
    let (addr, srv) = server(key(1));
    drop(TcpStream::connect(&addr).unwrap());
    let e = srv.join().unwrap().err().unwrap();
    assert!(matches!(kind(&e), Some(SecureError::NoHandshake)), "{e}");
}

/// A relay between a client and the server at `addr` that passes both
/// handshake messages, then hands the two raw sockets (client side, server
/// side) to `tamper`.
fn relay(addr: String, tamper: impl FnOnce(TcpStream, TcpStream) + Send + 'static) -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let relay_addr = l.local_addr().unwrap().to_string();
    thread::spawn(move || {
        let (mut from, _) = l.accept().unwrap();
        let mut to = TcpStream::connect(&addr).unwrap();
        let mut m = [0u8; 2 + HANDSHAKE_MSG_LEN];
        from.read_exact(&mut m).unwrap();
        to.write_all(&m).unwrap();
        to.read_exact(&mut m).unwrap();
        from.write_all(&m).unwrap();
        tamper(from, to);
    });
    relay_addr
}

/// The client's next frame of `len` plaintext bytes, read off the wire.
fn frame(from: &mut TcpStream, len: usize) -> Vec<u8> {
    let mut f = vec![0u8; 2 + len + TAG_LEN];
    from.read_exact(&mut f).unwrap();
    f
}

/// A client/server pair through a relay that does `tamper` to the
/// client's frames; the client has sent "hello", then "abc".
fn tampered(k: u8, tamper: impl FnOnce(TcpStream, TcpStream) + Send + 'static) -> (SecureReader, SecureWriter) {
    let (addr, srv) = server(key(k));
    let (_cr, mut cw) = connect(&relay(addr, tamper), &key(k), Duration::from_secs(1)).unwrap();
    cw.write_all(b"hello").unwrap();
    cw.write_all(b"abc").unwrap();
    let (sr, _sw) = srv.join().unwrap().unwrap();
    (sr, cw)
}

#[test]
fn garbled_short_and_truncated_frames_are_errors_not_panics() {
    // One bit flipped in the second frame's ciphertext.
    let (mut sr, _cw) = tampered(3, |mut from, mut to| {
        let hello = frame(&mut from, 5);
        let mut abc = frame(&mut from, 3);
        abc[4] ^= 1;
        to.write_all(&hello).unwrap();
        to.write_all(&abc).unwrap();
        thread::sleep(Duration::from_secs(1));
    });
    let mut b = [0u8; 5];
    sr.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"hello");
    let e = sr.read(&mut b).unwrap_err();
    assert!(matches!(kind(&e), Some(SecureError::Garbled)), "{e}");
    let e = sr.read(&mut b).unwrap_err();
    assert!(matches!(kind(&e), Some(SecureError::Broken(_))), "a broken stream read on: {e}");

    // A length shorter than the tag.
    let (mut sr, _cw) = tampered(3, |_from, mut to| {
        to.write_all(&[0, 3, 1, 2, 3]).unwrap();
        thread::sleep(Duration::from_secs(1));
    });
    let e = sr.read(&mut b).unwrap_err();
    assert!(matches!(kind(&e), Some(SecureError::ShortFrame(3))), "{e}");

    // Cut in the middle of a frame.
    let (mut sr, _cw) = tampered(3, |mut from, mut to| {
        let hello = frame(&mut from, 5);
        to.write_all(&hello[..9]).unwrap();
    });
    let e = sr.read(&mut b).unwrap_err();
    assert!(matches!(kind(&e), Some(SecureError::Truncated)), "{e}");
    assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
}

#[test]
fn a_frame_replayed_or_dropped_is_refused() {
    let (mut sr, _cw) = tampered(4, |mut from, mut to| {
        let hello = frame(&mut from, 5);
        to.write_all(&hello).unwrap();
        to.write_all(&hello).unwrap();
        thread::sleep(Duration::from_secs(1));
    });
    let mut b = [0u8; 5];
    sr.read_exact(&mut b).unwrap();
    let e = sr.read(&mut b).unwrap_err();
    assert!(matches!(kind(&e), Some(SecureError::Garbled)), "a replayed frame was accepted: {e}");

    let (mut sr, _cw) = tampered(4, |mut from, mut to| {
        let _hello = frame(&mut from, 5);
        let abc = frame(&mut from, 3);
        to.write_all(&abc).unwrap();
        thread::sleep(Duration::from_secs(1));
    });
    let e = sr.read(&mut b).unwrap_err();
    assert!(matches!(kind(&e), Some(SecureError::Garbled)), "a frame out of order was accepted: {e}");
}

#[test]
fn a_read_timeout_mid_frame_loses_nothing() {
    let (mut sr, _cw) = tampered(5, |mut from, mut to| {
        let hello = frame(&mut from, 5);
        to.write_all(&hello[..9]).unwrap();
        thread::sleep(Duration::from_millis(300));
        to.write_all(&hello[9..]).unwrap();
        let abc = frame(&mut from, 3);
        to.write_all(&abc).unwrap();
        thread::sleep(Duration::from_secs(1));
    });
    sr.tcp().set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    let mut b = [0u8; 8];
    let mut got = Vec::new();
    let mut timeouts = 0;
    while got.len() < 8 {
        match sr.read(&mut b) {
            Ok(n) => got.extend_from_slice(&b[..n]),
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => timeouts += 1,
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(&got, b"helloabc");
    assert!(timeouts > 0, "the reader never timed out part-way");
}
