//! Fault tolerance: a primary streams its log to a backup that replays it
//! in lockstep; a witness holds the view and the primary's lease; output
//! leaves only once the backup has the log that produced it. See
//! docs/DESIGN.md, "Fault tolerance".

pub mod backup;
pub mod backup_inputs;
pub mod commit;
pub mod gate;
pub mod held;
pub mod held_frames;
pub mod hello;
pub mod key;
pub mod listener;
pub mod log_buf;
pub mod net;
pub mod primary;
pub mod promoter;
pub mod remote_console;
pub mod resume;
pub mod secure;
pub mod stream;
pub mod lease_clock;
pub mod witness;
pub mod xfer;

use std::io::{BufRead, Read, Write};
use std::time::Duration;

/// A backup that hears nothing on its log stream for this long asks the
/// witness whether the primary is still alive.
pub const SILENCE: Duration = Duration::from_millis(300);
/// How often an idle primary sends a high-water mark.
pub const HEARTBEAT: Duration = Duration::from_millis(50);

/// Longest line any FT protocol reads (requests, hellos, acks, console
/// frame headers): a peer cannot make a reader buffer more.
pub const MAX_LINE: usize = 4096;

/// Reads one `\n`-terminated line (without the newline); `None` at EOF.
/// A line longer than [`MAX_LINE`] is an `InvalidData` error, found after
/// reading at most `MAX_LINE + 1` bytes of it.
pub fn read_line(r: &mut impl BufRead) -> std::io::Result<Option<String>> {
    let mut b = Vec::new();
    if r.by_ref().take(MAX_LINE as u64 + 1).read_until(b'\n', &mut b)? == 0 {
        return Ok(None);
    }
    if b.last() != Some(&b'\n') && b.len() > MAX_LINE {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, format!("a line longer than {MAX_LINE} bytes")));
    }
    while b.last().is_some_and(|&c| c == b'\n' || c == b'\r') {
        b.pop();
    }
    String::from_utf8(b).map(Some).map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidData, "a line that is not UTF-8"))
}

pub fn write_line(w: &mut impl Write, line: &str) -> std::io::Result<()> {
    w.write_all(format!("{line}\n").as_bytes())?;
    w.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_line_is_bounded() {
        let mut r = std::io::Cursor::new(b"ok\r\nsecond\nlast".to_vec());
        assert_eq!(read_line(&mut r).unwrap().as_deref(), Some("ok"));
        assert_eq!(read_line(&mut r).unwrap().as_deref(), Some("second"));
        assert_eq!(read_line(&mut r).unwrap().as_deref(), Some("last"));
        assert_eq!(read_line(&mut r).unwrap(), None);
        let mut exact = vec![b'x'; MAX_LINE];
        exact.push(b'\n');
        assert_eq!(read_line(&mut std::io::Cursor::new(exact)).unwrap().map(|l| l.len()), Some(MAX_LINE));
        // A line that never ends: an error after MAX_LINE + 1 bytes, not a
        // buffer the size of whatever the peer sends.
        let mut endless = std::io::BufReader::new(std::io::repeat(b'x'));
        let e = read_line(&mut endless).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidData);
    }
}
