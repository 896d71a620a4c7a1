//! The embedded witness's client (`ftvm witness` at HOST:PORT): one
//! request line, one reply line, over the cluster key's secure channel;
//! connects lazily, reconnects once per call, 1 s connect/read/write
//! timeouts.

use std::io;
use std::time::Duration;

use super::{check_name, parse_kv, status_from, view_from, Promotion, Status, View, WitnessApi, WitnessError, LEASE};
use crate::ft::key::ClusterKey;
use crate::ft::secure::{self, SecureReader, SecureWriter};

const IO_TIMEOUT: Duration = Duration::from_secs(1);

pub(super) struct TcpWitness {
    addr: String,
    key: ClusterKey,
    conn: Option<(SecureReader, SecureWriter)>,
}

impl TcpWitness {
    pub(super) fn new(addr: &str, key: &ClusterKey) -> Self {
        TcpWitness { addr: addr.to_string(), key: key.clone(), conn: None }
    }

    fn check(&self, name: &str) -> Result<(), WitnessError> {
        check_name(name).map_err(|msg| WitnessError::Refused { addr: self.addr.clone(), msg })
    }

    fn view_call(&mut self, req: &str) -> Result<View, WitnessError> {
        let line = self.call(req)?;
        let kv = self.parse_ok(&line)?;
        view_from(&kv).ok_or_else(|| self.protocol(&line))
    }

    fn protocol(&self, line: &str) -> WitnessError {
        WitnessError::Protocol { addr: self.addr.clone(), line: line.to_string() }
    }

    fn parse_ok(&self, line: &str) -> Result<std::collections::HashMap<String, String>, WitnessError> {
        if let Some(rest) = line.strip_prefix("err") {
            if rest.is_empty() || rest.starts_with(' ') {
                return Err(WitnessError::Refused { addr: self.addr.clone(), msg: rest.trim().to_string() });
            }
        }
        match line.strip_prefix("ok").filter(|r| r.is_empty() || r.starts_with(' ')) {
            Some(rest) => parse_kv(rest).ok_or_else(|| self.protocol(line)),
            None => Err(self.protocol(line)),
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

impl WitnessApi for TcpWitness {
    fn become_primary(&mut self, me: &str, run: &str, new_run: bool) -> Result<View, WitnessError> {
        self.check(me)?;
        self.check(run)?;
        self.view_call(&format!("op=become_primary me={me} run={run} new_run={}", new_run as u8))
    }

    fn backup_ping(&mut self, me: &str, view: u64, ready: bool, applied: u64) -> Result<View, WitnessError> {
        self.check(me)?;
        self.view_call(&format!("op=backup_ping me={me} view={view} ready={} applied={applied}", ready as u8))
    }

    fn primary_ping(&mut self, me: &str, view: u64, sent: u64, acked: u64, released: u64) -> Result<View, WitnessError> {
        self.check(me)?;
        self.view_call(&format!("op=primary_ping me={me} view={view} sent={sent} acked={acked} released={released}"))
    }

    fn promote(&mut self, me: &str, view: u64, lost_connection: bool, ready: bool) -> Result<Promotion, WitnessError> {
        self.check(me)?;
        let line = self.call(&format!("op=promote me={me} view={view} lost={} ready={}", lost_connection as u8, ready as u8))?;
        let kv = self.parse_ok(&line)?;
        super::promotion_from(&kv).ok_or_else(|| self.protocol(&line))
    }

    fn drop_backup(&mut self, me: &str, view: u64, backup: &str) -> Result<View, WitnessError> {
        self.check(me)?;
        self.check(backup)?;
        self.view_call(&format!("op=drop_backup me={me} view={view} backup={backup}"))
    }

    fn ended(&mut self, me: &str) -> Result<View, WitnessError> {
        self.check(me)?;
        self.view_call(&format!("op=ended me={me}"))
    }

    fn view(&mut self) -> Result<View, WitnessError> {
        self.view_call("op=view")
    }

    fn status(&mut self) -> Result<Status, WitnessError> {
        let line = self.call("op=status")?;
        let kv = self.parse_ok(&line)?;
        status_from(&kv).ok_or_else(|| self.protocol(&line))
    }

    fn lease(&self) -> Duration {
        LEASE
    }

    fn describe(&self) -> String {
        self.addr.clone()
    }
}
