//! Group commit on the log stream: when the primary puts a high-water mark
//! (an `Event::Progress` record) into its log and flushes it to the backup.
//!
//! A mark is what the backup acknowledges, and an acknowledgement is what
//! releases held output. Marking every exit that produced output (one
//! console byte each in a burst) made the primary flush, and the backup
//! acknowledge, tens of thousands of times a second. Instead, like a
//! database's group commit, one mark covers everything logged before it:
//!
//! * output is waiting and no mark is in flight (the backup acknowledged
//!   the last one): mark now, so held output waits one round trip;
//! * output is waiting behind a mark in flight: mark again only after
//!   [`OUTPUT_BOUND`], so output waits at most about a round trip plus the
//!   bound (the output rule's added-latency goal is 3 ms at p99);
//! * records but no output: mark once [`BATCH_RECORDS`] have built up or
//!   after [`LAG_BOUND`], which keeps the backup close behind;
//! * the guest went idle (`hlt`), or nothing was marked for
//!   [`HEARTBEAT`]: mark, so the backup knows the primary is alive;
//! * with no backup in the view nothing waits on a mark: heartbeats only.
//!
//! The output rule itself is unchanged: a byte leaves only once the backup
//! acknowledged the ordinal that produced it (`gate`).

use std::time::{Duration, Instant};

use super::HEARTBEAT;

/// Longest a mark waits behind one in flight while output is held.
pub const OUTPUT_BOUND: Duration = Duration::from_millis(1);
/// Longest logged records wait for a mark when no output is held.
pub const LAG_BOUND: Duration = Duration::from_millis(5);
/// Records that make a batch full.
pub const BATCH_RECORDS: u64 = 512;

/// What the gate says, in one look, for the decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GateLook {
    /// A backup is in the view: output waits for its acknowledgements.
    pub need_ack: bool,
    /// Highest ordinal the backup acknowledged.
    pub acked: u64,
    /// Output is held that was produced after the last mark.
    pub unmarked_output: bool,
}

/// The primary's group-commit state.
#[derive(Debug)]
pub struct GroupCommit {
    last_mark: u64,
    last_at: Instant,
    unmarked_records: u64,
}

impl GroupCommit {
    pub fn new(now: Instant) -> Self {
        // Nothing marked yet: the first opportunity marks.
        GroupCommit { last_mark: 0, last_at: now.checked_sub(HEARTBEAT).unwrap_or(now), unmarked_records: 1 }
    }

    /// A record went into the log.
    pub fn logged(&mut self) {
        self.unmarked_records += 1;
    }

    /// Ordinal of the last mark.
    pub fn last_mark(&self) -> u64 {
        self.last_mark
    }

    /// Whether to mark (and flush) at this exit.
    pub fn due(&self, now: Instant, g: GateLook, idle: bool) -> bool {
        let since = now.saturating_duration_since(self.last_at);
        if since >= HEARTBEAT {
            return true;
        }
        if idle {
            return self.unmarked_records > 0 || g.unmarked_output;
        }
        if !g.need_ack {
            return false;
        }
        if g.unmarked_output {
            let in_flight = g.acked < self.last_mark;
            return !in_flight || since >= OUTPUT_BOUND;
        }
        self.unmarked_records >= BATCH_RECORDS || (self.unmarked_records > 0 && since >= LAG_BOUND)
    }

    /// A mark at `ordinal` was logged and flushed.
    pub fn marked(&mut self, now: Instant, ordinal: u64) {
        self.last_mark = ordinal;
        self.last_at = now;
        self.unmarked_records = 0;
    }
}

/// How far (in exits) the backup may fall behind before the primary's
/// guest is slowed: this bounds the log the backup must still replay when
/// it takes over, and so the failover time.
pub const MAX_LAG_EXITS: u64 = 50_000;
/// The longest the guest is held at one exit waiting for a slow backup;
/// a backup that is gone is dropped from the view by the witness first.
pub const MAX_LAG_WAIT: Duration = Duration::from_secs(5);

/// Whether the primary at `ordinal` must wait for the backup.
pub fn too_far_behind(ordinal: u64, g: GateLook) -> bool {
    g.need_ack && ordinal.saturating_sub(g.acked) > MAX_LAG_EXITS
}

#[cfg(test)]
mod tests {
    use super::*;

    fn look(need_ack: bool, acked: u64, unmarked_output: bool) -> GateLook {
        GateLook { need_ack, acked, unmarked_output }
    }

    fn fresh(t0: Instant) -> GroupCommit {
        let mut c = GroupCommit::new(t0);
        c.marked(t0, 100);
        c
    }

    #[test]
    fn first_opportunity_marks() {
        let t0 = Instant::now();
        assert!(GroupCommit::new(t0).due(t0, look(true, 0, false), false));
    }

    #[test]
    fn output_marks_at_once_when_nothing_is_in_flight() {
        let t0 = Instant::now();
        let c = fresh(t0);
        assert!(c.due(t0, look(true, 100, true), false));
        // The last mark is not acknowledged yet: wait, up to the bound.
        assert!(!c.due(t0, look(true, 99, true), false));
        assert!(!c.due(t0 + OUTPUT_BOUND / 2, look(true, 99, true), false));
        assert!(c.due(t0 + OUTPUT_BOUND, look(true, 99, true), false));
    }

    #[test]
    fn a_burst_of_output_marks_once_per_round_trip() {
        // One output byte per exit, 10 µs apart; the backup acknowledges
        // each mark 200 µs after it is made.
        let t0 = Instant::now();
        let mut c = fresh(t0);
        let mut acked = 100;
        let mut pending_ack: Option<(Instant, u64)> = None;
        let mut marks = 0;
        for i in 1..=1000u64 {
            let now = t0 + Duration::from_micros(10 * i);
            if let Some((at, ord)) = pending_ack {
                if now >= at {
                    acked = ord;
                    pending_ack = None;
                }
            }
            c.logged();
            let ord = 100 + i;
            if c.due(now, look(true, acked, true), false) {
                c.marked(now, ord);
                marks += 1;
                pending_ack = Some((now + Duration::from_micros(200), ord));
            }
        }
        // 10 ms of burst, a 200 µs round trip: about 50 marks, not 1000.
        assert!((40..=60).contains(&marks), "{marks} marks");
    }

    #[test]
    fn records_without_output_wait_for_a_full_batch_or_the_bound() {
        let t0 = Instant::now();
        let mut c = fresh(t0);
        c.logged();
        assert!(!c.due(t0, look(true, 100, false), false));
        assert!(c.due(t0 + LAG_BOUND, look(true, 100, false), false));
        for _ in 0..BATCH_RECORDS {
            c.logged();
        }
        assert!(c.due(t0, look(true, 100, false), false));
    }

    #[test]
    fn idle_marks_what_is_unmarked_and_heartbeats() {
        let t0 = Instant::now();
        let mut c = fresh(t0);
        assert!(!c.due(t0, look(true, 100, false), true), "nothing to mark");
        assert!(c.due(t0 + HEARTBEAT, look(true, 100, false), true), "heartbeat");
        c.logged();
        assert!(c.due(t0, look(true, 100, false), true));
    }

    #[test]
    fn without_a_backup_only_heartbeats() {
        let t0 = Instant::now();
        let mut c = fresh(t0);
        for _ in 0..10 * BATCH_RECORDS {
            c.logged();
        }
        assert!(!c.due(t0 + LAG_BOUND, look(false, 0, true), false));
        assert!(c.due(t0 + HEARTBEAT, look(false, 0, true), false));
    }

    #[test]
    fn lag_throttle_only_with_a_backup() {
        assert!(!too_far_behind(MAX_LAG_EXITS, look(true, 0, false)));
        assert!(too_far_behind(MAX_LAG_EXITS + 1, look(true, 0, false)));
        assert!(!too_far_behind(MAX_LAG_EXITS + 1, look(false, 0, false)));
        assert!(!too_far_behind(5, look(true, 10, false)), "acked ahead of the ordinal");
    }
}
