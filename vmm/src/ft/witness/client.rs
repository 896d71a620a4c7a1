//! The witness client every role uses: connects lazily, reconnects once
//! per call, 1 s connect/read/write timeouts.

use std::collections::HashMap;
use std::io;

use super::{Promotion, Status, View, WitnessError};
use crate::ft::key::ClusterKey;
use crate::ft::secure::{self, SecureReader, SecureWriter};

const IO_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

/// Client: connects lazily, reconnects on error once per call, 1 s connect/read/write timeouts.
pub struct WitnessClient {
    addr: String,
    key: ClusterKey,
    conn: Option<(SecureReader, SecureWriter)>,
}

impl WitnessClient {
    pub fn new(addr: &str, key: &ClusterKey) -> Self {
        WitnessClient { addr: addr.to_string(), key: key.clone(), conn: None }
    }

    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// A VMM asks to become primary of the VM of run `run`, as member
    /// `me` (`ADDR@ID`). `new_run`: the operator allows it to replace a
    /// lost VM with a new one.
    pub fn become_primary(&mut self, me: &str, run: &str, new_run: bool) -> Result<View, WitnessError> {
        self.check_addr(me)?;
        self.check_addr(run)?;
        self.view_call(&format!("op=become_primary me={me} run={run} new_run={}", new_run as u8))
    }

    /// A backup announces itself / keeps itself alive. Returns the current view.
    /// `ready`: it holds the VM's state; `applied`: the exit it replayed to.
    pub fn backup_ping(&mut self, me: &str, view: u64, ready: bool, applied: u64) -> Result<View, WitnessError> {
        self.check_addr(me)?;
        self.view_call(&format!("op=backup_ping me={me} view={view} ready={} applied={applied}", ready as u8))
    }

    /// The primary renews its lease and reports progress. Returns the current view
    /// (the caller checks whether it is still primary).
    /// `released`: console bytes released so far.
    pub fn primary_ping(&mut self, me: &str, view: u64, sent: u64, acked: u64, released: u64) -> Result<View, WitnessError> {
        self.check_addr(me)?;
        self.view_call(&format!("op=primary_ping me={me} view={view} sent={sent} acked={acked} released={released}"))
    }

    /// The backup of view `view` asks to take over. `lost_connection` = its log
    /// stream broke (EOF/error) rather than just went quiet; `ready`: it
    /// holds the VM's state (without it, it can never take over).
    pub fn promote(&mut self, me: &str, view: u64, lost_connection: bool, ready: bool) -> Result<Promotion, WitnessError> {
        self.check_addr(me)?;
        let line = self.call(&format!("op=promote me={me} view={view} lost={} ready={}", lost_connection as u8, ready as u8))?;
        let kv = self.parse_ok(&line)?;
        match kv.get("result").map(String::as_str) {
            Some("granted") => Ok(Promotion::Granted(self.parse_view(&kv, &line)?)),
            Some("wait") => Ok(Promotion::Wait),
            _ => Err(self.protocol(&line)),
        }
    }

    /// The primary `me` gives up on `backup`, whose acknowledgements stopped.
    pub fn drop_backup(&mut self, me: &str, view: u64, backup: &str) -> Result<View, WitnessError> {
        self.check_addr(me)?;
        self.check_addr(backup)?;
        self.view_call(&format!("op=drop_backup me={me} view={view} backup={backup}"))
    }

    /// The primary `me` says its guest ended.
    pub fn ended(&mut self, me: &str) -> Result<View, WitnessError> {
        self.check_addr(me)?;
        self.view_call(&format!("op=ended me={me}"))
    }

    pub fn view(&mut self) -> Result<View, WitnessError> {
        self.view_call("op=view")
    }

    pub fn status(&mut self) -> Result<Status, WitnessError> {
        let line = self.call("op=status")?;
        let kv = self.parse_ok(&line)?;
        let bad = || self.protocol(&line);
        let num = |k: &str| kv.get(k).and_then(|v| v.parse::<u64>().ok()).ok_or_else(bad);
        Ok(Status {
            view: self.parse_view(&kv, &line)?,
            lease_left_ms: if kv.get("lease_left_ms").is_some_and(|v| v == "-") { None } else { Some(num("lease_left_ms")?) },
            primary_sent: num("sent")?,
            primary_acked: num("acked")?,
            backup_alive: num("backup_alive")? == 1,
            backup_ready: num("ready")? == 1,
            backup_applied: num("applied")?,
            released: num("released")?,
            lost: num("lost")? == 1,
            ended: num("ended")? == 1,
        })
    }

    fn check_addr(&self, me: &str) -> Result<(), WitnessError> {
        if me.is_empty() || me == "-" || me.contains(char::is_whitespace) || me.contains('=') {
            return Err(WitnessError::Refused {
                addr: self.addr.clone(),
                msg: format!("{me:?} is not a usable address (empty, \"-\", whitespace or '=')"),
            });
        }
        Ok(())
    }

    fn view_call(&mut self, req: &str) -> Result<View, WitnessError> {
        let line = self.call(req)?;
        let kv = self.parse_ok(&line)?;
        self.parse_view(&kv, &line)
    }

    fn protocol(&self, line: &str) -> WitnessError {
        WitnessError::Protocol { addr: self.addr.clone(), line: line.to_string() }
    }

    fn parse_ok(&self, line: &str) -> Result<HashMap<String, String>, WitnessError> {
        if let Some(rest) = line.strip_prefix("err") {
            if rest.is_empty() || rest.starts_with(' ') {
                return Err(WitnessError::Refused { addr: self.addr.clone(), msg: rest.trim().to_string() });
            }
        }
        let mut toks = line.split_whitespace();
        if toks.next() != Some("ok") {
            return Err(self.protocol(line));
        }
        toks.map(|t| t.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())).ok_or_else(|| self.protocol(line)))
            .collect()
    }

    fn parse_view(&self, kv: &HashMap<String, String>, line: &str) -> Result<View, WitnessError> {
        let opt = |k: &str| kv.get(k).map(|v| if v == "-" { None } else { Some(v.clone()) });
        match (kv.get("view").and_then(|v| v.parse::<u64>().ok()), opt("primary"), opt("backup"), opt("run")) {
            (Some(number), Some(primary), Some(backup), Some(run)) => Ok(View { number, primary, backup, run }),
            _ => Err(self.protocol(line)),
        }
    }

    /// Send one request line, return the reply line (without newline). A failure on
    /// an already-open connection (e.g. the witness closed it) is retried once on a new one.
    fn call(&mut self, req: &str) -> Result<String, WitnessError> {
        let had_conn = self.conn.is_some();
        let mut result = self.try_call(req);
        if result.is_err() && had_conn {
            self.conn = None;
            result = self.try_call(req);
        }
        result.map_err(|err| {
            self.conn = None;
            let addr = self.addr.clone();
            if err.kind() == io::ErrorKind::PermissionDenied {
                WitnessError::Unauthenticated { addr, err }
            } else {
                WitnessError::Unreachable { addr, err }
            }
        })
    }

    fn try_call(&mut self, req: &str) -> io::Result<String> {
        if self.conn.is_none() {
            let (r, w) = secure::connect(&self.addr, &self.key, IO_TIMEOUT)?;
            r.tcp().set_read_timeout(Some(IO_TIMEOUT))?;
            w.tcp().set_write_timeout(Some(IO_TIMEOUT))?;
            self.conn = Some((r, w));
        }
        let (r, w) = self.conn.as_mut().expect("connected above");
        crate::ft::write_line(w, req)?;
        crate::ft::read_line(r)?
            .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "the witness closed the connection"))
    }
}

