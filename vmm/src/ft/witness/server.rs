//! The witness server: parses requests, applies `rules.rs` under one lock,
//! answers. Key holders only (`secure.rs`).

use std::collections::HashMap;
use std::io::{self, BufRead, Read, Write};
use std::net::{SocketAddr, TcpListener};
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

fn handle(state: &Mutex<State>, line: &str) -> String {
    match handle_inner(state, line) {
        Ok(s) => format!("ok {s}"),
        Err(e) => format!("err {}", e.replace(['\n', '\r'], " ")),
    }
}

fn handle_inner(state: &Mutex<State>, line: &str) -> Result<String, String> {
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
    let mut st = state.lock().unwrap_or_else(|e| e.into_inner());
    let now = BootInstant::now();
    match op {
        "become_primary" => st.become_primary(me()?, name("run")?, flag("new_run")?, now),
        "backup_ping" => st.backup_ping(me()?, num("view")?, flag("ready")?, num("applied")?, now),
        "primary_ping" => {
            let (me, view, sent, acked, released) = (me()?, num("view")?, num("sent")?, num("acked")?, num("released")?);
            st.primary_ping(me, view, sent, acked, released, now)
        }
        "promote" => st.promote(me()?, num("view")?, flag("lost")?, flag("ready")?, now),
        "view" => Ok(view_kv(&st.view)),
        "status" => Ok(st.status(now)),
        _ => Err(format!("unknown op {op:?}")),
    }
}

fn serve_conn(conn: Conn, state: &Mutex<State>) {
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
    state: Arc<Mutex<State>>,
    key: ClusterKey,
}

impl Witness {
    pub fn bind(addr: &str, key: ClusterKey) -> Result<Witness, WitnessError> {
        Self::bind_with(addr, Timeouts::default(), key)
    }

    pub fn bind_with(addr: &str, timeouts: Timeouts, key: ClusterKey) -> Result<Witness, WitnessError> {
        let listener =
            TcpListener::bind(addr).map_err(|err| WitnessError::Listen { addr: addr.to_string(), err })?;
        Ok(Witness { listener, state: Arc::new(Mutex::new(State::new(timeouts))), key })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().expect("bound listener has an address")
    }

    /// Accept connections forever, one thread each (at most
    /// `secure::MAX_CONNS`), key holders only. Returns only if the
    /// listener fails.
    pub fn serve(self) -> io::Result<()> {
        let state = self.state;
        secure::serve(self.listener, self.key, "witness", "witness-conn", move |c| serve_conn(c, &state))
    }
}
