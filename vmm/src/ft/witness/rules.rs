//! The witness's rules, without sockets: who may become primary, when a
//! backup joins or is dropped, when it is promoted, and when a VM is lost.
//! Times are [`BootInstant`]s passed in, so the rules are tested with any
//! clock (`tests.rs`).

use super::{or_dash, view_kv, Timeouts, View};
use crate::ft::lease_clock::BootInstant;

#[derive(Default, Clone)]
pub(super) struct State {
    pub(super) t: Timeouts,
    pub(super) view: View,
    lease_until: Option<BootInstant>,
    /// The view in which the current primary was installed.
    primary_since: u64,
    backup_seen: Option<BootInstant>,
    /// The backup said it holds the VM's state (a snapshot, or the log
    /// from boot): only such a backup can take over.
    backup_ready: bool,
    backup_applied: u64,
    sent: u64,
    acked: u64,
    /// Console bytes of the run released, as the primary last reported.
    released: u64,
    /// When the backup of the current view first asked for promotion.
    promote_asked: Option<BootInstant>,
    /// (view promoted from, new primary): makes a retried promote idempotent.
    last_promotion: Option<(u64, String)>,
    /// When the witness last handled a request.
    last_request: Option<BootInstant>,
    /// The run's guest ended (its primary said so): nothing is lost, a new
    /// primary starts a new run without --new-run.
    ended: bool,
}

impl State {
    pub(super) fn new(t: Timeouts) -> State {
        State { t, ..State::default() }
    }

    /// Called before each request. In a running cluster a request comes
    /// every ping interval; a gap longer than a lease means this witness was
    /// stopped or cut off, and the backup's silence over it is the
    /// witness's own, not the backup's: its timeout starts again. (The
    /// first request handled after the gap may be a ping a dead primary
    /// sent before it died; it must not cost the backup its place.)
    pub(super) fn note_request(&mut self, now: BootInstant) {
        if let Some(last) = self.last_request {
            let gap = now.saturating_duration_since(last);
            if gap > self.t.lease && self.view.backup.is_some() {
                log::info!("witness: {gap:?} without any request (this witness was stopped or cut off): the backup's silence meanwhile is not counted");
                self.backup_seen = Some(now);
                self.promote_asked = None;
            }
        }
        self.last_request = Some(now);
    }

    fn lease_alive(&self, now: BootInstant) -> bool {
        self.view.primary.is_some() && self.lease_until.is_some_and(|u| now < u)
    }

    fn backup_alive(&self, now: BootInstant) -> bool {
        self.view.backup.is_some()
            && self.backup_seen.is_some_and(|s| now.saturating_duration_since(s) <= self.t.backup_timeout)
    }

    /// The run's primary is gone and no backup can take over: a backup
    /// that has the state may still be paused (then it is not lost yet).
    fn lost(&self, now: BootInstant) -> bool {
        let backup_can_take_over = self.view.backup.is_some() && self.backup_ready;
        !self.ended && self.view.primary.is_some() && !self.lease_alive(now) && !backup_can_take_over
    }

    /// The primary `me` says its guest ended: the run is over, not lost.
    pub(super) fn ended(&mut self, me: &str) -> Result<String, String> {
        if self.view.primary.as_deref() != Some(me) {
            return Err(format!("{me} is not the primary of view {}", self.view.number));
        }
        if !self.ended {
            log::info!("witness: the guest of run {} ended", or_dash(&self.view.run));
        }
        self.ended = true;
        Ok(view_kv(&self.view))
    }

    /// Install view N+1. The caller grants a lease if it installs a primary.
    fn change(&mut self, primary: Option<String>, backup: Option<String>, now: BootInstant, reason: &str) {
        let number = self.view.number + 1;
        if primary != self.view.primary {
            self.lease_until = None;
            self.sent = 0;
            self.acked = 0;
            self.primary_since = number;
        }
        if backup != self.view.backup {
            self.backup_seen = backup.as_ref().map(|_| now);
            self.backup_ready = false;
            self.backup_applied = 0;
        }
        self.view = View { number, primary, backup, run: self.view.run.clone() };
        self.promote_asked = None;
        log::info!("witness: {} ({reason})", self.view);
    }

    pub(super) fn become_primary(&mut self, me: &str, run: &str, new_run: bool, now: BootInstant) -> Result<String, String> {
        let n = self.view.number;
        if let Some(p) = self.view.primary.clone() {
            if self.lease_alive(now) {
                return if p == me {
                    Ok(view_kv(&self.view))
                } else {
                    Err(format!("a primary is already running: {p} in view {n}"))
                };
            }
            let b = or_dash(&self.view.backup);
            if self.ended {
                log::info!("witness: run {} ended; {me} boots run {run}", or_dash(&self.view.run));
            } else if self.view.backup.is_some() && self.backup_ready {
                if self.view.backup.as_deref() == Some(me) {
                    return Err(format!("{me} is the backup of view {n}: ask for promotion"));
                }
                if self.backup_alive(now) {
                    return Err(format!("primary {p} of view {n} is silent; its backup {b} takes over"));
                }
                if !new_run {
                    return Err(format!(
                        "primary {p} of view {n} is silent and so is its backup {b}, which holds the VM of run {}: it takes over if it comes back; --new-run abandons that VM and boots another",
                        or_dash(&self.view.run)
                    ));
                }
            } else if !new_run {
                let r = or_dash(&self.view.run);
                return Err(format!(
                    "the VM of run {r} is lost: its primary {p} is gone and no backup holds its state ({} bytes of its output or more were released); a new primary would boot another VM: start it with --new-run to do that",
                    self.released
                ));
            }
            if !self.ended {
                log::warn!("witness: run {} abandoned (its VM is lost); {me} boots run {run}", or_dash(&self.view.run));
            }
        }
        self.released = 0;
        self.ended = false;
        self.view.run = Some(run.to_string());
        let reason = if self.view.primary.is_some() { "a new run replaces a lost one" } else { "first primary" };
        // A backup waiting for a primary (no run yet) protects this one;
        // one of a lost run has nothing of this run: it joins again.
        let backup = self.view.backup.clone().filter(|b| self.view.primary.is_none() && self.backup_alive(now) && b != me);
        self.change(Some(me.to_string()), backup, now, reason);
        self.lease_until = Some(now + self.t.lease);
        Ok(view_kv(&self.view))
    }

    /// A backup's keepalive (`view` > 0: the view it last saw), or a
    /// request to join (`view` = 0, a new member).
    pub(super) fn backup_ping(&mut self, me: &str, view: u64, ready: bool, applied: u64, now: BootInstant) -> Result<String, String> {
        let n = self.view.number;
        if view > n {
            return Err(format!("view {view} does not exist yet: the current view is {n}"));
        }
        if self.view.backup.as_deref() == Some(me) {
            self.backup_seen = Some(now);
            self.backup_ready = ready;
            self.backup_applied = applied;
            return Ok(view_kv(&self.view));
        }
        if self.view.primary.as_deref() == Some(me) {
            return Err(format!("{me} is the primary of view {n}, not a backup"));
        }
        if view != 0 {
            // A member's keepalive after it was dropped (paused, cut off):
            // it must join again as a new member, with the state anew,
            // not slip back in with whatever it held.
            return Err(format!("{me} is not in view {n}: it was dropped from the view"));
        }
        if self.backup_alive(now) {
            return Err(format!("view {n} already has backup {}", or_dash(&self.view.backup)));
        }
        if let Some(p) = &self.view.primary {
            // Nobody could bring it the state; and joining would hide
            // that the VM is lost.
            if !self.lease_alive(now) {
                return Err(format!("no live primary to join: primary {p} of view {n} is silent"));
            }
        }
        let reason = if self.view.backup.is_some() { "backup replaces a silent one" } else { "backup joined" };
        self.change(self.view.primary.clone(), Some(me.to_string()), now, reason);
        // A joining backup has nothing yet, whatever it says.
        self.backup_applied = applied;
        Ok(view_kv(&self.view))
    }

    pub(super) fn primary_ping(&mut self, me: &str, view: u64, sent: u64, acked: u64, released: u64, now: BootInstant) -> Result<String, String> {
        let (n, since) = (self.view.number, self.primary_since);
        if self.view.primary.as_deref() != Some(me) {
            let p = or_dash(&self.view.primary);
            return Err(format!("not the primary of view {n} (primary is {p})"));
        }
        if view < since || view > n {
            return Err(format!("view {view} is not one of this primary's views ({since} to {n})"));
        }
        self.lease_until = Some(now + self.t.lease);
        self.sent = sent;
        self.acked = acked;
        self.released = self.released.max(released);
        if self.view.backup.is_some() && !self.backup_alive(now) {
            self.change(self.view.primary.clone(), None, now, "backup silent");
        }
        Ok(view_kv(&self.view))
    }

    /// The primary gives up on its backup: its acknowledgements stopped
    /// (a silent partition between them, which the backup cannot see and
    /// the witness cannot either). Without this, output would be held for
    /// good. The backup, no longer in the view, can never be promoted over
    /// what is released from now on; it joins again.
    pub(super) fn drop_backup(&mut self, me: &str, view: u64, backup: &str, now: BootInstant) -> Result<String, String> {
        let n = self.view.number;
        if self.view.primary.as_deref() != Some(me) || !self.lease_alive(now) {
            return Err(format!("{me} is not the primary of view {n} with a live lease"));
        }
        if view != n || self.view.backup.as_deref() != Some(backup) {
            return Err(format!("stale view {view}: the current view is {n} with backup {}", or_dash(&self.view.backup)));
        }
        self.change(self.view.primary.clone(), None, now, "the primary's backup stopped acknowledging");
        Ok(view_kv(&self.view))
    }

    pub(super) fn promote(&mut self, me: &str, view: u64, lost: bool, ready: bool, now: BootInstant) -> Result<String, String> {
        let n = self.view.number;
        if self.last_promotion.as_ref().is_some_and(|(v, p)| *v == view && p == me)
            && self.view.primary.as_deref() == Some(me)
        {
            // A retried request (its answer was lost): the retrier counts
            // its lease from its own, later, request; so does the witness.
            self.lease_until = Some(now + self.t.lease);
            return Ok(format!("result=granted {}", view_kv(&self.view)));
        }
        if view != n {
            return Err(format!("stale view {view}: the current view is {n}"));
        }
        if self.view.backup.as_deref() != Some(me) {
            return Err(format!("{me} is not the backup of view {n} (backup is {})", or_dash(&self.view.backup)));
        }
        if self.ended {
            // Said only once all of its output was out: nothing to take
            // over (the backup that replayed to the end may stop).
            return Err(format!("the guest of run {} ended: nothing to take over", or_dash(&self.view.run)));
        }
        self.backup_seen = Some(now); // asking proves it is alive
        self.backup_ready = ready;
        if self.view.primary.is_none() {
            // A backup waiting for the first primary: nothing to take over.
            return Ok(format!("result=wait {}", view_kv(&self.view)));
        }
        if !self.lease_alive(now) {
            if !ready {
                // Rules 1, 2 and 5: it could not produce the output the
                // primary released. The VM is lost; say so, do not hang.
                let p = or_dash(&self.view.primary).to_string();
                self.change(self.view.primary.clone(), None, now, "the primary died before its backup had the state");
                return Err(format!(
                    "cannot take over: primary {p} died before this backup had the VM's state (its state transfer had not completed); the VM of run {} is lost",
                    or_dash(&self.view.run)
                ));
            }
            self.change(Some(me.to_string()), None, now, "primary lease expired, backup promoted");
            self.lease_until = Some(now + self.t.lease);
            self.last_promotion = Some((view, me.to_string()));
            return Ok(format!("result=granted {}", view_kv(&self.view)));
        }
        // Only a broken link starts the clock: a backup that merely heard
        // nothing for a while (a slow primary) asks with lost=0 and must not
        // be dropped for it later.
        if !lost {
            // Its link works (again: a stream the primary resumed after
            // losing its lease for a while): a later loss starts anew.
            self.promote_asked = None;
            return Ok(format!("result=wait {}", view_kv(&self.view)));
        }
        let first = *self.promote_asked.get_or_insert(now);
        // The lease is alive, so the primary renewed it after `first` once this much time passed.
        if now.saturating_duration_since(first) > 2 * self.t.lease {
            self.change(self.view.primary.clone(), None, now, "backup lost its link to a live primary");
            return Err(format!("dropped from view {n}: the primary is alive"));
        }
        Ok(format!("result=wait {}", view_kv(&self.view)))
    }

    /// What must survive a restart of the witness (`server.rs` saves it
    /// whenever it changes): the view with its run, and whether the backup
    /// holds the state. The bytes released are saved along, as of then.
    pub(super) fn durable(&self) -> String {
        let (from, to) = self.last_promotion.as_ref().map_or((0, "-"), |(v, p)| (*v, p.as_str()));
        format!("{} ready={} promoted_from={from} promoted={to} ended={}", view_kv(&self.view), self.backup_ready as u8, self.ended as u8)
    }

    pub(super) fn saved_line(&self) -> String {
        format!("{} released={}", self.durable(), self.released)
    }

    /// Takes up a saved state after a restart. The primary may hold a
    /// lease granted just before the restart: it is counted as alive for
    /// one lease from now (nobody is promoted or installed meanwhile, and
    /// its renewals keep it), and the backup as alive for its timeout.
    pub(super) fn restore(&mut self, line: &str, now: BootInstant) -> Result<(), String> {
        let kv: std::collections::HashMap<&str, &str> = line.split_whitespace().filter_map(|t| t.split_once('=')).collect();
        let opt = |k: &str| kv.get(k).map(|v| (*v != "-").then(|| v.to_string()));
        let num = |k: &str| kv.get(k).and_then(|v| v.parse::<u64>().ok());
        let (Some(number), Some(primary), Some(backup), Some(run), Some(ready), Some(released), Some(from), Some(to)) = (
            num("view"),
            opt("primary"),
            opt("backup"),
            opt("run"),
            num("ready"),
            num("released"),
            num("promoted_from"),
            opt("promoted"),
        ) else {
            return Err(format!("not a witness state line: {line:?}"));
        };
        // A promotion granted just before the restart, whose answer may
        // never have arrived: its retry must find it granted.
        self.last_promotion = to.map(|p| (from, p));
        self.ended = num("ended") == Some(1);
        self.view = View { number, primary, backup, run };
        self.lease_until = self.view.primary.as_ref().map(|_| now + self.t.lease);
        self.primary_since = 0;
        self.backup_seen = self.view.backup.as_ref().map(|_| now);
        self.backup_ready = ready == 1;
        self.released = released;
        Ok(())
    }

    /// etcd (`etcd.rs`): the whole state as one value, the durable part
    /// plus what the status shows and the view the primary came in with.
    pub(super) fn stored_line(&self) -> String {
        format!("{} since={} sent={} acked={} applied={}", self.saved_line(), self.primary_since, self.sent, self.acked, self.backup_applied)
    }

    /// What a ping reports (written to etcd at most once a second).
    pub(super) fn progress(&self) -> (u64, u64, u64, u64) {
        (self.sent, self.acked, self.released, self.backup_applied)
    }

    /// etcd: the state from its stored value (`None`: nothing stored yet)
    /// and what the lease keys say now: the primary's lease has
    /// `lease_left` to run (None: gone), the backup's key is alive or not.
    /// Liveness is etcd's (leases), not this process's clock.
    pub(super) fn from_stored(t: Timeouts, line: Option<&str>, lease_left: Option<std::time::Duration>, backup_alive: bool, now: BootInstant) -> Result<State, String> {
        let mut st = State::new(t);
        if let Some(line) = line {
            st.restore(line, now)?;
            let kv: std::collections::HashMap<&str, &str> = line.split_whitespace().filter_map(|t| t.split_once('=')).collect();
            let num = |k: &str| kv.get(k).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
            (st.primary_since, st.sent, st.acked, st.backup_applied) = (num("since"), num("sent"), num("acked"), num("applied"));
        }
        st.lease_until = lease_left.filter(|_| st.view.primary.is_some()).map(|l| now + l);
        st.backup_seen = (backup_alive && st.view.backup.is_some()).then_some(now);
        Ok(st)
    }

    /// etcd: when this backup first asked to be promoted over a live
    /// primary (kept by the asking process, not in etcd).
    pub(super) fn promote_asked(&self) -> Option<BootInstant> {
        self.promote_asked
    }

    pub(super) fn set_promote_asked(&mut self, at: Option<BootInstant>) {
        self.promote_asked = at;
    }

    pub(super) fn status(&self, now: BootInstant) -> String {
        let left = match self.lease_until {
            Some(u) if self.lease_alive(now) => u.saturating_duration_since(now).as_millis().to_string(),
            _ => "-".to_string(),
        };
        let (kv, alive) = (view_kv(&self.view), self.backup_alive(now) as u8);
        format!(
            "{kv} lease_left_ms={left} sent={} acked={} backup_alive={alive} ready={} applied={} released={} lost={} ended={}",
            self.sent,
            self.acked,
            self.backup_ready as u8,
            self.backup_applied,
            self.released,
            self.lost(now) as u8,
            self.ended as u8
        )
    }
}
