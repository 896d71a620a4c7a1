//! Fault tolerance: a primary streams its log to a backup that replays it
//! in lockstep; a witness holds the view and the primary's lease; output
//! leaves only once the backup has the log that produced it. See
//! docs/DESIGN.md, "Fault tolerance".

pub mod backup;
pub mod backup_inputs;
pub mod commit;
pub mod gate;
pub mod listener;
pub mod log_buf;
pub mod primary;
pub mod remote_console;
pub mod stream;
pub mod witness;

use std::io::{BufRead, Write};
use std::time::Duration;

/// A backup that hears nothing on its log stream for this long asks the
/// witness whether the primary is still alive.
pub const SILENCE: Duration = Duration::from_millis(300);
/// How often an idle primary sends a high-water mark.
pub const HEARTBEAT: Duration = Duration::from_millis(50);

/// Reads one `\n`-terminated line (without the newline); `None` at EOF.
pub fn read_line(r: &mut impl BufRead) -> std::io::Result<Option<String>> {
    let mut s = String::new();
    if r.read_line(&mut s)? == 0 {
        return Ok(None);
    }
    while s.ends_with('\n') || s.ends_with('\r') {
        s.pop();
    }
    Ok(Some(s))
}

pub fn write_line(w: &mut impl Write, line: &str) -> std::io::Result<()> {
    w.write_all(format!("{line}\n").as_bytes())?;
    w.flush()
}
