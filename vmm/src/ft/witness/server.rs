//! The witness server: parses requests, applies `rules.rs` under one lock,
//! answers. Key holders only (`secure.rs`).

use std::collections::HashMap;
use std::io::{self, BufRead, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::rules::State;
use super::{view_kv, Timeouts, WitnessError};
use crate::ft::key::ClusterKey;
use crate::ft::lease_clock::BootInstant;
use crate::ft::secure::{self, Conn};

const IO_TIMEOUT: Duration = Duration::from_secs(1);
const MAX_LINE: u64 = 4096;
/// A connection with no request for this long is closed (its client
/// reconnects on its next call): a peer that vanished keeps no slot.
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// The witness's state and where it is saved.
pub(super) struct Shared {
    state: Mutex<State>,
    file: Option<StateFile>,
}

/// The saved state: one line in a file, replaced atomically (written to a
/// temporary file, synced, renamed over it, the directory synced) before
/// any reply that reveals a change to it, so that a witness that crashes
/// and restarts never answers from a view older than one it gave out.
/// A hand-written line: a handful of fields, no need for a format crate.
struct StateFile {
    path: PathBuf,
    saved: Mutex<String>,
    /// An exclusive `flock` on `PATH.lock`, held while this witness runs:
    /// two witnesses on one file would each overwrite the other's view.
    _lock: std::fs::File,
}

const STATE_MAGIC: &str = "ftvm-witness-state 1";

impl StateFile {
    fn lock(path: &Path) -> Result<std::fs::File, String> {
        use std::os::fd::AsRawFd;
        let lock_path = path.with_extension("lock");
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| format!("{}: {e}", lock_path.display()))?;
        // SAFETY: `f` is an open file for the whole call; flock only
        // takes an advisory lock on it.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return Err(format!("another witness holds {} ({})", lock_path.display(), io::Error::last_os_error()));
        }
        Ok(f)
    }

    /// Saves the state if what must survive changed; false if that
    /// failed (the caller then takes the change back).
    fn save(&self, st: &State) -> bool {
        let key = st.durable();
        let mut saved = self.saved.lock().unwrap_or_else(|e| e.into_inner());
        if *saved == key {
            return true;
        }
        let tmp = self.path.with_extension("tmp");
        let wrote = (|| -> io::Result<()> {
            let mut f = std::fs::File::create(&tmp)?;
            writeln!(f, "{STATE_MAGIC}\n{}", st.saved_line())?;
            f.sync_all()?;
            std::fs::rename(&tmp, &self.path)?;
            if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::File::open(dir)?.sync_all()?;
            }
            Ok(())
        })();
        match wrote {
            Ok(()) => {
                *saved = key;
                true
            }
            Err(e) => {
                log::error!("witness: cannot save its state to {}: {e}; the change is refused", self.path.display());
                false
            }
        }
    }
}

fn handle(shared: &Shared, line: &str) -> String {
    let mut st = shared.state.lock().unwrap_or_else(|e| e.into_inner());
    // A change that cannot be saved is taken back and refused: a restart
    // must never bring back a view older than one that was given out.
    let before = shared.file.as_ref().map(|_| st.clone());
    let reply = match handle_inner(&mut st, line) {
        Ok(s) => format!("ok {s}"),
        Err(e) => format!("err {}", e.replace(['\n', '\r'], " ")),
    };
    if let (Some(f), Some(before)) = (&shared.file, before) {
        if !f.save(&st) {
            *st = before;
            return format!("err the witness cannot save its state to {}", f.path.display());
        }
    }
    reply
}

fn handle_inner(st: &mut State, line: &str) -> Result<String, String> {
    let mut toks = line.split_whitespace();
    let op = toks.next().and_then(|t| t.strip_prefix("op=")).ok_or("a request must start with op=")?;
    let args = toks
        .map(|t| t.split_once('=').ok_or_else(|| format!("bad token {t:?}: expected key=value")))
        .collect::<Result<HashMap<&str, &str>, String>>()?;
    let get = |k: &str| args.get(k).copied().ok_or_else(|| format!("op={op} needs {k}="));
    let num = |k: &str| get(k)?.parse::<u64>().map_err(|_| format!("{k}= must be a number"));
    let flag = |k: &str| match get(k)? {
        "1" | "true" => Ok(true),
        "0" | "false" => Ok(false),
        _ => Err(format!("{k}= must be 0 or 1")),
    };
    let name = |k: &str| match get(k)? {
        "-" => Err(format!("{k}= must name something, not -")),
        a => Ok(a),
    };
    let me = || name("me");
    let now = BootInstant::now();
    st.note_request(now);
    match op {
        "become_primary" => st.become_primary(me()?, name("run")?, flag("new_run")?, now),
        "backup_ping" => st.backup_ping(me()?, num("view")?, flag("ready")?, num("applied")?, now),
        "primary_ping" => {
            let (me, view, sent, acked, released) = (me()?, num("view")?, num("sent")?, num("acked")?, num("released")?);
            st.primary_ping(me, view, sent, acked, released, now)
        }
        "promote" => st.promote(me()?, num("view")?, flag("lost")?, flag("ready")?, now),
        "drop_backup" => st.drop_backup(me()?, num("view")?, name("backup")?, now),
        "ended" => st.ended(me()?),
        "view" => Ok(view_kv(&st.view)),
        "status" => Ok(st.status(now)),
        _ => Err(format!("unknown op {op:?}")),
    }
}

fn serve_conn(conn: Conn, state: &Shared) {
    let Conn { mut reader, mut writer, .. } = conn;
    if reader.tcp().set_read_timeout(Some(IDLE_TIMEOUT)).is_err() || writer.tcp().set_write_timeout(Some(IO_TIMEOUT)).is_err() {
        return;
    }
    let mut buf = Vec::new();
    loop {
        buf.clear();
        if matches!((&mut reader).take(MAX_LINE).read_until(b'\n', &mut buf), Ok(0) | Err(_)) {
            return;
        }
        if buf.last() != Some(&b'\n') && buf.len() as u64 >= MAX_LINE {
            let _ = writer.write_all(b"err request line too long\n");
            return;
        }
        let line = String::from_utf8_lossy(&buf);
        let reply = handle(state, line.trim());
        if writer.write_all(format!("{reply}\n").as_bytes()).is_err() {
            return;
        }
    }
}

/// The witness server.
pub struct Witness {
    listener: TcpListener,
    state: State,
    file: Option<StateFile>,
    key: ClusterKey,
}

impl Witness {
    pub fn bind(addr: &str, key: ClusterKey) -> Result<Witness, WitnessError> {
        Self::bind_with(addr, Timeouts::default(), key)
    }

    pub fn bind_with(addr: &str, timeouts: Timeouts, key: ClusterKey) -> Result<Witness, WitnessError> {
        let listener =
            TcpListener::bind(addr).map_err(|err| WitnessError::Listen { addr: addr.to_string(), err })?;
        Ok(Witness { listener, state: State::new(timeouts), file: None, key })
    }

    /// Keeps the state in `path` across restarts: takes it up if the file
    /// exists (a restart), creates it otherwise. Without it, a restarted
    /// witness knows no view and the running VM's roles are fenced.
    pub fn with_state_file(mut self, path: &Path) -> Result<Witness, WitnessError> {
        let bad = |msg: String| WitnessError::State { path: path.display().to_string(), msg };
        let lock = StateFile::lock(path).map_err(bad)?;
        match std::fs::read_to_string(path) {
            Ok(text) => {
                let mut lines = text.lines();
                if lines.next() != Some(STATE_MAGIC) {
                    return Err(bad(format!("not a witness state file (its first line is not {STATE_MAGIC:?})")));
                }
                let line = lines.next().ok_or_else(|| bad("no state line after the header".into()))?;
                self.state.restore(line, BootInstant::now()).map_err(bad)?;
                log::info!("witness: took up the saved {}", self.state.view);
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(bad(e.to_string())),
        }
        let file = StateFile { path: path.to_path_buf(), saved: Mutex::new(String::new()), _lock: lock };
        if !file.save(&self.state) {
            return Err(bad("cannot write it (see above)".into()));
        }
        self.file = Some(file);
        Ok(self)
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().expect("bound listener has an address")
    }

    /// Accept connections forever, one thread each (at most
    /// `secure::MAX_CONNS`), key holders only. Returns only if the
    /// listener fails.
    pub fn serve(self) -> io::Result<()> {
        let shared = Arc::new(Shared { state: Mutex::new(self.state), file: self.file });
        secure::serve(self.listener, self.key, "witness", "witness-conn", move |c| serve_conn(c, &shared))
    }
}
