//! The output rule. Guest console bytes are tagged with the exit ordinal
//! that produced them and leave only when (a) this VMM is the primary with a
//! live lease and (b) the backup has acknowledged the log through that
//! ordinal (or there is no backup in the view). Released bytes are numbered
//! by their offset in the console stream, so a console client that follows
//! the primary across a failover drops what it has already seen.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use super::lease_clock::BootInstant;
use super::held::Held;
use super::held_frames::HeldFrames;
use crate::devices::OutputSink;
use crate::net::FrameSink;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Never releases anything (a backup, or a fenced primary).
    Silent,
    /// Releases under a lease; `need_ack` while the view has a backup.
    Primary { need_ack: bool },
}

struct State {
    role: Role,
    lease_until: Option<BootInstant>,
    acked: u64,
    /// Which backup's acknowledgements count: bumped for each new backup,
    /// so a late ack from the previous one cannot release output.
    ack_gen: u64,
    pending: Held,
    /// The tail of the released output: bytes `[base, base + len)` of the
    /// console stream (at most about 2 × [`KEEP_RELEASED`]).
    released: Vec<u8>,
    base: u64,
    emitted: u64,
    ended: Option<String>,
    /// Console input delivered to the guest: (ordinal, total bytes so far),
    /// waiting for the backup to acknowledge that ordinal.
    inputs: VecDeque<(u64, u64)>,
    /// Console input bytes that are in the log and safe with the backup.
    input_acked: u64,
    /// The exit that produced the last byte released: a backup that joins
    /// from boot is ready to take over only once it holds the log that far.
    released_ordinal: u64,
    /// Frames the guest's network card sent, under the same rule.
    frames: HeldFrames,
}

/// Released console output kept for console clients that reconnect (after
/// a failover, a dropped connection): the last 1 MiB or so. A client that
/// asks for older bytes gets the kept tail, after a notice.
pub const KEEP_RELEASED: usize = 1 << 20;
/// The most console output a state transfer carries (`emitted_tail`): held
/// output beyond it (a guest printing 64 MiB while its backup joins) is cut
/// from the front, and a console sees the gap said.
pub const MAX_TAIL: usize = 64 << 20;

pub struct Gate {
    s: Mutex<State>,
    changed: Condvar,
}

/// What a console client is sent next.
pub enum Next {
    Data { seq: u64, bytes: Vec<u8> },
    End(String),
    Nothing,
    /// The guest is gone but this VMM may not speak for it (no lease, or
    /// not primary): hang up, the client will find the primary.
    HangUp,
}

impl Gate {
    pub fn new(role: Role) -> Arc<Gate> {
        Arc::new(Gate {
            s: Mutex::new(State {
                role,
                lease_until: None,
                acked: 0,
                ack_gen: 0,
                pending: Held::default(),
                released: Vec::new(),
                base: 0,
                emitted: 0,
                ended: None,
                inputs: VecDeque::new(),
                input_acked: 0,
                released_ordinal: 0,
                frames: HeldFrames::default(),
            }),
            changed: Condvar::new(),
        })
    }

    fn settle_inputs(s: &mut State) {
        let all = matches!(s.role, Role::Primary { need_ack: false });
        while let Some(&(ord, total)) = s.inputs.front() {
            if !all && ord > s.acked {
                break;
            }
            s.input_acked = s.input_acked.max(total);
            s.inputs.pop_front();
        }
    }

    /// Console input up to `total` bytes was delivered at exit `ordinal`.
    pub fn note_input(&self, ordinal: u64, total: u64) {
        let mut s = self.s.lock().unwrap();
        s.inputs.push_back((ordinal, total));
        Self::settle_inputs(&mut s);
    }

    /// How many console input bytes the log holds safely (logged, and
    /// acknowledged by the backup if there is one).
    pub fn input_acked(&self) -> u64 {
        self.s.lock().unwrap().input_acked
    }

    fn release(&self, s: &mut State) {
        Self::settle_inputs(s);
        let Role::Primary { need_ack } = s.role else { return };
        if s.lease_until.is_none_or(|t| BootInstant::now() >= t) {
            return;
        }
        let before = s.released.len();
        let through = need_ack.then_some(s.acked);
        let State { pending, released, .. } = s;
        if let Some(ord) = pending.release(through, released) {
            s.released_ordinal = ord;
        }
        s.frames.release(through);
        if s.released.len() != before {
            self.changed.notify_all();
        }
        if s.released.len() > 2 * KEEP_RELEASED {
            let cut = s.released.len() - KEEP_RELEASED;
            s.released.drain(..cut);
            s.base += cut as u64;
        }
    }

    pub fn emit(&self, ordinal: u64, bytes: &[u8]) {
        let mut s = self.s.lock().unwrap();
        s.emitted += bytes.len() as u64;
        s.pending.push(ordinal, bytes);
        self.release(&mut s);
        // A backup never releases: of its guest's output it needs only the
        // tail a console may still miss when it takes over (what the old
        // primary had not released), as the primary keeps only a released
        // tail. Older bytes are forgotten, their numbers kept.
        if s.role == Role::Silent && s.pending.len() > 2 * KEEP_RELEASED {
            let cut = s.pending.len() - KEEP_RELEASED;
            s.pending.forget(cut);
            s.base += (s.released.len() + cut) as u64;
            s.released.clear();
        }
    }

    /// A frame the guest's card sent at exit `ordinal`: held until the
    /// output rule lets it go, then written to the frame output. A backup
    /// (silent) holds it too, unless its primary already sent it: what is
    /// still held when it takes over goes out then (`held_frames.rs`).
    pub fn send_frame(&self, ordinal: u64, frame: &[u8]) {
        let mut s = self.s.lock().unwrap();
        s.frames.push(ordinal, frame);
        self.release(&mut s);
    }

    /// The primary this VMM backs has put every frame through exit
    /// `through` on the wire (its high-water mark said so).
    pub fn frames_sent_elsewhere(&self, through: u64) {
        self.s.lock().unwrap().frames.sent_elsewhere(through);
    }

    /// A backup that took over goes live: no frame from now on was sent
    /// by the old primary (`HeldFrames::live`).
    pub fn frames_live(&self) {
        self.s.lock().unwrap().frames.live();
    }

    /// The frames held now, for a state transfer (`held_frames.rs`).
    pub fn frames_held(&self) -> super::held_frames::FramesHeld {
        self.s.lock().unwrap().frames.held()
    }

    /// A new backup restored from a snapshot: what its primary held then
    /// is held here too, until the primary's marks say it was sent.
    pub fn hold_frames(&self, held: super::held_frames::FramesHeld) {
        let mut s = self.s.lock().unwrap();
        s.frames.sent_elsewhere(held.out_through);
        for (ordinal, f) in &held.frames {
            s.frames.push(*ordinal, f);
        }
        self.release(&mut s);
    }

    /// Every frame the guest sent through this exit is on the wire: what
    /// this primary's marks tell its backup.
    pub fn frames_out(&self) -> u64 {
        self.s.lock().unwrap().frames.out_through()
    }

    /// Where released frames go (the tap).
    pub fn set_frame_out(&self, out: Box<dyn FrameSink>) {
        self.s.lock().unwrap().frames.set_out(out);
    }

    /// Frames (released, dropped, held now), for summaries.
    pub fn frame_counts(&self) -> (u64, u64, usize) {
        let s = self.s.lock().unwrap();
        (s.frames.released, s.frames.dropped, s.frames.len())
    }

    /// Frames a backup replayed that its primary had sent (not sent again).
    pub fn frames_sent_before(&self) -> u64 {
        self.s.lock().unwrap().frames.sent_before
    }

    /// The backup has the log through `ordinal`.
    pub fn ack(&self, ordinal: u64) {
        let generation = self.s.lock().unwrap().ack_gen;
        self.ack_from(generation, ordinal);
    }

    /// An acknowledgement from the backup of generation `generation`
    /// (see [`Gate::reset_acks`]); ignored if another backup came since.
    pub fn ack_from(&self, generation: u64, ordinal: u64) {
        let mut s = self.s.lock().unwrap();
        if generation != s.ack_gen {
            return;
        }
        s.acked = s.acked.max(ordinal);
        self.release(&mut s);
    }

    /// What group commit needs to know, in one lock.
    pub fn look(&self, last_mark: u64) -> super::commit::GateLook {
        let s = self.s.lock().unwrap();
        super::commit::GateLook {
            need_ack: matches!(s.role, Role::Primary { need_ack: true }),
            acked: s.acked,
            unmarked_output: s.pending.last_ordinal().is_some_and(|ord| ord > last_mark)
                || s.frames.last_ordinal().is_some_and(|ord| ord > last_mark)
                || s.inputs.back().is_some_and(|&(ord, _)| ord > last_mark),
        }
    }

    pub fn acked(&self) -> u64 {
        self.s.lock().unwrap().acked
    }

    pub fn set_lease(&self, until: BootInstant) {
        let mut s = self.s.lock().unwrap();
        s.lease_until = Some(until);
        self.release(&mut s);
    }

    /// A new view: who we are and whether output waits for a backup.
    pub fn set_role(&self, role: Role) {
        let mut s = self.s.lock().unwrap();
        s.role = role;
        self.release(&mut s);
    }

    /// A new backup starts with nothing acknowledged; returns the
    /// generation its acknowledgements must carry.
    pub fn reset_acks(&self) -> u64 {
        let mut s = self.s.lock().unwrap();
        s.acked = 0;
        s.ack_gen += 1;
        s.ack_gen
    }

    pub fn role(&self) -> Role {
        self.s.lock().unwrap().role
    }

    /// The lease ran out at least `d` ago (or there is none).
    pub fn lease_gone_for(&self, d: Duration) -> bool {
        self.s.lock().unwrap().lease_until.is_none_or(|t| BootInstant::now() >= t + d)
    }

    pub fn lease_live(&self) -> bool {
        self.s.lock().unwrap().lease_until.is_some_and(|t| BootInstant::now() < t)
    }

    /// Bytes emitted so far, released or not.
    pub fn emitted(&self) -> u64 {
        self.s.lock().unwrap().emitted
    }

    /// Console bytes released so far (the sequence number of the next).
    pub fn released_len(&self) -> u64 {
        let s = self.s.lock().unwrap();
        s.base + s.released.len() as u64
    }

    /// The last `max` bytes the guest emitted, released or held, and the
    /// number of the first: what a backup that joins by snapshot needs of
    /// the output before it, to release what is still held when it takes
    /// over and to serve a console that was a little behind.
    /// Everything still held goes (up to [`MAX_TAIL`]), and at most `max`
    /// bytes of the released tail before it.
    pub fn emitted_tail(&self, max: usize) -> (u64, Vec<u8>) {
        let s = self.s.lock().unwrap();
        let all = s.released.len() + s.pending.len();
        let keep = (s.pending.len() + max.min(s.released.len())).min(MAX_TAIL);
        let bytes: Vec<u8> = s.released.iter().chain(s.pending.bytes()).skip(all - keep).copied().collect();
        (s.emitted - bytes.len() as u64, bytes)
    }

    /// The exit that produced the last released byte (0: none yet).
    pub fn released_ordinal(&self) -> u64 {
        self.s.lock().unwrap().released_ordinal
    }

    /// For a VM restored from a snapshot: the console had already sent
    /// `bytes` bytes, so this gate's output is numbered from there.
    pub fn start_at(&self, bytes: u64) {
        let mut s = self.s.lock().unwrap();
        s.base = bytes;
        s.emitted = bytes;
    }

    pub fn pending_len(&self) -> usize {
        self.s.lock().unwrap().pending.len()
    }

    /// The guest is gone; clients get `msg` once they have everything.
    pub fn end(&self, msg: String) {
        let mut s = self.s.lock().unwrap();
        s.ended = Some(msg);
        self.changed.notify_all();
    }

    /// Waits until everything emitted has been released, up to `timeout`:
    /// console output and held network frames alike (the guest's last
    /// frames, a reply sent just before it powered off, are output under
    /// the same rule, and `wind_down` ends the process after this).
    pub fn drain(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let mut s = self.s.lock().unwrap();
            self.release(&mut s);
            if s.pending.is_empty() && s.frames.is_empty() {
                return true;
            }
            drop(s);
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// For a console client that has everything before `from`: at most
    /// `max` bytes of what follows.
    pub fn next(&self, from: u64, max: usize, timeout: Duration) -> Next {
        let s = self.s.lock().unwrap();
        let (s, _) = self
            .changed
            .wait_timeout_while(s, timeout, |s| s.base + s.released.len() as u64 <= from && s.ended.is_none())
            .unwrap();
        if s.base + (s.released.len() as u64) > from {
            // Bytes before the kept tail are gone: the client gets the
            // tail (its sequence number says where it starts).
            let from = from.max(s.base);
            let i = (from - s.base) as usize;
            let end = s.released.len().min(i + max);
            Next::Data { seq: from, bytes: s.released[i..end].to_vec() }
        } else if let Some(m) = &s.ended {
            let may_speak = matches!(s.role, Role::Primary { .. }) && s.lease_until.is_some_and(|t| BootInstant::now() < t);
            if may_speak && s.pending.is_empty() {
                Next::End(m.clone())
            } else {
                Next::HangUp
            }
        } else {
            Next::Nothing
        }
    }
}

/// The guest's console sink when fault tolerance is on.
pub struct GateSink {
    pub gate: Arc<Gate>,
    pub ordinal: Arc<AtomicU64>,
}

impl OutputSink for GateSink {
    fn emit(&mut self, bytes: &[u8]) {
        self.gate.emit(self.ordinal.load(Ordering::Relaxed), bytes);
    }
}

/// The network card's frame sink when fault tolerance is on: frames go
/// to the gate, tagged with the exit that sent them.
pub struct GateFrames {
    pub gate: Arc<Gate>,
    pub ordinal: Arc<AtomicU64>,
}

impl FrameSink for GateFrames {
    fn transmit(&mut self, frame: &[u8]) {
        self.gate.send_frame(self.ordinal.load(Ordering::Relaxed), frame);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(n: Next) -> String {
        match n {
            Next::Data { bytes, .. } => String::from_utf8(bytes).unwrap(),
            Next::End(m) => format!("END {m}"),
            Next::Nothing => "nothing".into(),
            Next::HangUp => "hang up".into(),
        }
    }

    #[test]
    fn output_waits_for_the_ack_of_its_ordinal() {
        let g = Gate::new(Role::Primary { need_ack: true });
        g.set_lease(BootInstant::now() + Duration::from_secs(10));
        g.emit(5, b"ab");
        g.emit(7, b"cd");
        assert_eq!(text(g.next(0, 64, Duration::ZERO)), "nothing");
        g.ack(6);
        assert_eq!(text(g.next(0, 64, Duration::ZERO)), "ab");
        g.ack(7);
        assert_eq!(text(g.next(1, 64, Duration::ZERO)), "bcd");
        assert_eq!(text(g.next(1, 2, Duration::ZERO)), "bc", "a frame holds at most `max` bytes");
        g.end("bye".into());
        assert_eq!(text(g.next(4, 64, Duration::ZERO)), "END bye");
        g.set_role(Role::Silent);
        assert_eq!(text(g.next(4, 64, Duration::ZERO)), "hang up");
    }

    #[test]
    fn released_output_keeps_a_bounded_tail_numbered_as_before() {
        let g = Gate::new(Role::Primary { need_ack: false });
        g.set_lease(BootInstant::now() + Duration::from_secs(10));
        let chunk = vec![b'x'; KEEP_RELEASED / 2];
        for i in 0..6 {
            g.emit(i, &chunk);
        }
        let total = 3 * KEEP_RELEASED as u64;
        assert_eq!(g.released_len(), total);
        assert!(g.s.lock().unwrap().released.len() <= 2 * KEEP_RELEASED);
        // A client that has the last byte gets nothing new; one from byte 0
        // gets the kept tail, numbered where it starts.
        assert!(matches!(g.next(total, 64, Duration::ZERO), Next::Nothing));
        match g.next(0, 64, Duration::ZERO) {
            Next::Data { seq, bytes } => {
                assert!(seq > 0 && seq + 64 <= total, "{seq}");
                assert_eq!(bytes.len(), 64);
            }
            _ => panic!("no data"),
        }
    }

    #[test]
    fn a_restored_vm_numbers_its_output_after_the_snapshot() {
        let g = Gate::new(Role::Primary { need_ack: false });
        g.set_lease(BootInstant::now() + Duration::from_secs(10));
        g.start_at(1000);
        g.emit(1, b"ab");
        assert_eq!((g.released_len(), g.emitted()), (1002, 1002));
        match g.next(1001, 64, Duration::ZERO) {
            Next::Data { seq, bytes } => assert_eq!((seq, bytes), (1001, b"b".to_vec())),
            _ => panic!("no data"),
        }
    }

    #[test]
    fn no_lease_or_silent_role_releases_nothing() {
        let g = Gate::new(Role::Silent);
        g.set_lease(BootInstant::now() + Duration::from_secs(10));
        g.emit(1, b"x");
        g.ack(100);
        assert_eq!(g.released_len(), 0);
        let g = Gate::new(Role::Primary { need_ack: false });
        g.emit(1, b"x");
        assert_eq!(g.released_len(), 0, "released without a lease");
        g.set_lease(BootInstant::now() - Duration::from_millis(1));
        g.emit(2, b"y");
        assert_eq!(g.released_len(), 0, "released on an expired lease");
        g.set_lease(BootInstant::now() + Duration::from_secs(1));
        assert_eq!(g.released_len(), 2);
    }

    #[test]
    fn a_backup_keeps_a_bounded_tail_of_its_output_with_its_numbers() {
        let g = Gate::new(Role::Silent);
        let chunk = vec![b'x'; 64 << 10];
        for i in 0..64u64 {
            g.emit(i + 1, &chunk);
        }
        let total = 64 * chunk.len() as u64;
        assert_eq!(g.emitted(), total);
        assert!(g.pending_len() <= 2 * KEEP_RELEASED, "{}", g.pending_len());
        // Promoted: what it kept is released with the right numbers.
        g.set_lease(BootInstant::now() + Duration::from_secs(10));
        g.set_role(Role::Primary { need_ack: false });
        match g.next(total - 10, 1 << 16, Duration::ZERO) {
            Next::Data { seq, bytes } => assert_eq!((seq, bytes.len()), (total - 10, 10)),
            _ => panic!("the tail is not served"),
        }
    }

    #[test]
    fn a_state_transfer_takes_all_held_output_and_a_released_tail() {
        let g = Gate::new(Role::Primary { need_ack: true });
        g.set_lease(BootInstant::now() + Duration::from_secs(10));
        g.emit(1, b"abc");
        g.emit(2, b"de");
        g.ack(1);
        assert_eq!(g.released_len(), 3);
        assert_eq!(g.emitted_tail(1), (2, b"cde".to_vec()), "one released byte, all held ones");
        assert_eq!(g.emitted_tail(0), (3, b"de".to_vec()), "held bytes go whatever the tail");
        assert_eq!(g.emitted_tail(100), (0, b"abcde".to_vec()));
    }

    #[test]
    fn a_late_ack_from_the_previous_backup_releases_nothing() {
        let g = Gate::new(Role::Primary { need_ack: true });
        g.set_lease(BootInstant::now() + Duration::from_secs(10));
        let old = g.reset_acks();
        g.emit(5, b"x");
        let new = g.reset_acks();
        g.ack_from(old, 100);
        assert_eq!(g.released_len(), 0, "released on the old backup's ack");
        g.ack_from(new, 5);
        assert_eq!(g.released_len(), 1);
    }

    #[test]
    fn backup_leaving_the_view_frees_output() {
        let g = Gate::new(Role::Primary { need_ack: true });
        g.set_lease(BootInstant::now() + Duration::from_secs(10));
        g.emit(3, b"z");
        assert_eq!(g.released_len(), 0);
        g.set_role(Role::Primary { need_ack: false });
        assert_eq!(g.released_len(), 1);
        assert!(g.drain(Duration::ZERO));
    }

    #[derive(Clone, Default)]
    struct Wire(Arc<std::sync::Mutex<Vec<Vec<u8>>>>);
    impl FrameSink for Wire {
        fn transmit(&mut self, f: &[u8]) {
            self.0.lock().unwrap().push(f.to_vec());
        }
    }

    /// A gate in `role` with a live lease, its frames going to a wire.
    fn wired(role: Role) -> (Arc<Gate>, Wire) {
        let g = Gate::new(role);
        let wire = Wire::default();
        g.set_frame_out(Box::new(wire.clone()));
        g.set_lease(BootInstant::now() + Duration::from_secs(5));
        (g, wire)
    }

    #[test]
    fn frames_wait_for_the_ack_of_their_exit_and_a_backup_sends_none() {
        let (g, wire) = wired(Role::Primary { need_ack: true });
        g.send_frame(3, b"a");
        g.send_frame(4, b"b");
        assert!(wire.0.lock().unwrap().is_empty());
        assert!(g.look(2).unmarked_output, "group commit marks for a held frame");
        g.ack(3);
        assert_eq!(*wire.0.lock().unwrap(), vec![b"a".to_vec()]);
        g.ack(4);
        assert_eq!(wire.0.lock().unwrap().len(), 2);
        assert_eq!(g.frame_counts(), (2, 0, 0));
        // Without a backup in the view, at once; without a lease, never.
        g.set_role(Role::Primary { need_ack: false });
        g.send_frame(9, b"c");
        assert_eq!(wire.0.lock().unwrap().len(), 3);
        let h = Gate::new(Role::Primary { need_ack: false });
        let w2 = Wire::default();
        h.set_frame_out(Box::new(w2.clone()));
        h.send_frame(1, b"x");
        assert!(w2.0.lock().unwrap().is_empty(), "no lease");
        h.set_lease(BootInstant::now() + Duration::from_secs(5));
        assert_eq!(w2.0.lock().unwrap().len(), 1);
        // A backup never transmits while it is one.
        let (b, w3) = wired(Role::Silent);
        b.send_frame(1, b"y");
        b.ack(1);
        assert!(w3.0.lock().unwrap().is_empty());
        assert_eq!(g.frames_out(), 9, "the primary's marks say what it sent");
    }

    /// The frame-at-promotion rule: a backup sends, once promoted, exactly
    /// the frames its primary's marks do not say were sent, whenever it
    /// replayed them (before or after the promotion), in order.
    #[test]
    fn a_promoted_backup_sends_the_frames_its_primary_did_not_and_no_other() {
        let (b, wire) = wired(Role::Silent);
        // The log so far: frames at exits 3, 5, 5, 8; a mark says the
        // primary sent through exit 4 (its backup acked 4).
        b.frames_sent_elsewhere(0);
        b.send_frame(3, b"a");
        b.send_frame(5, b"b");
        b.frames_sent_elsewhere(4);
        b.send_frame(5, b"c");
        b.send_frame(8, b"d");
        assert!(wire.0.lock().unwrap().is_empty(), "a backup transmits nothing");
        // A later mark (received before the replay reached exit 12)
        // covers exit 6; the primary dies; the backup is promoted while its
        // replay is at exit 8, then replays 9 and 12 and goes live.
        b.frames_sent_elsewhere(6);
        b.set_role(Role::Primary { need_ack: false });
        b.send_frame(9, b"e");
        b.send_frame(12, b"f");
        let sent: Vec<Vec<u8>> = wire.0.lock().unwrap().clone();
        assert_eq!(sent, vec![b"d".to_vec(), b"e".to_vec(), b"f".to_vec()], "8, 9, 12 were never sent by the primary; 3, 5 were");
        assert_eq!(b.frames_sent_before(), 3);
        assert_eq!(b.frame_counts(), (3, 0, 0));
        // A replayed frame the primary sent is not sent after promotion
        // either (a mark received before, replayed after).
        let (c, w2) = wired(Role::Silent);
        c.frames_sent_elsewhere(20);
        c.set_role(Role::Primary { need_ack: false });
        c.send_frame(15, b"old");
        c.send_frame(21, b"new");
        assert_eq!(*w2.0.lock().unwrap(), vec![b"new".to_vec()]);
        // Live at the exit where the log ended, which a mark covered: the
        // gratuitous ARP sent there is new, not the old primary's.
        c.frames_sent_elsewhere(30);
        c.frames_live();
        c.send_frame(30, b"arp");
        assert_eq!(w2.0.lock().unwrap().last().unwrap(), b"arp");
        // Its own marks go on from there.
        assert_eq!(c.frames_out(), 30);
        c.send_frame(31, b"next");
        assert_eq!(c.frames_out(), 31);
    }

    /// A state transfer: the new backup holds what its primary held at
    /// the snapshot and sends it only if promoted before the primary's
    /// marks say it went out.
    #[test]
    fn a_new_backup_holds_the_frames_its_primary_held_at_the_snapshot() {
        let p = Gate::new(Role::Primary { need_ack: true });
        p.set_lease(BootInstant::now() + Duration::from_secs(5));
        p.send_frame(2, b"sent");
        p.ack(2);
        p.send_frame(4, b"held");
        let held = p.frames_held();
        assert_eq!((held.out_through, held.frames.len()), (2, 1));
        for promoted_first in [true, false] {
            let (b, wire) = wired(Role::Silent);
            b.hold_frames(held.clone());
            if !promoted_first {
                b.frames_sent_elsewhere(4);
            }
            b.set_role(Role::Primary { need_ack: false });
            let want: Vec<Vec<u8>> = if promoted_first { vec![b"held".to_vec()] } else { vec![] };
            assert_eq!(*wire.0.lock().unwrap(), want);
        }
    }

    /// One exit's frames straddling a new view (found by review): some
    /// went out while there was no backup, the rest are held for the
    /// backup that just joined. Marks and the transfer must not say that
    /// exit is sent, or a takeover loses the rest.
    #[test]
    fn an_exit_half_sent_when_a_backup_joins_is_not_said_sent() {
        let p = Gate::new(Role::Primary { need_ack: false });
        p.set_lease(BootInstant::now() + Duration::from_secs(5));
        p.send_frame(10, b"f1");
        assert_eq!(p.frames_out(), 10);
        p.reset_acks();
        p.set_role(Role::Primary { need_ack: true });
        p.send_frame(10, b"f2");
        assert_eq!(p.frames_out(), 9, "f2 of exit 10 is held");
        let held = p.frames_held();
        assert_eq!((held.out_through, held.frames.clone()), (9, vec![(10, b"f2".to_vec())]));
        let (b, wire) = wired(Role::Silent);
        b.hold_frames(held);
        b.frames_sent_elsewhere(p.frames_out());
        b.set_role(Role::Primary { need_ack: false });
        assert_eq!(*wire.0.lock().unwrap(), vec![b"f2".to_vec()]);
        p.ack(10);
        assert_eq!(p.frames_out(), 10);
    }

    #[test]
    fn drain_waits_for_held_frames_too() {
        let (g, wire) = wired(Role::Primary { need_ack: true });
        g.send_frame(3, b"last");
        assert_eq!(g.pending_len(), 0, "no console output held");
        assert!(!g.drain(Duration::from_millis(20)), "drained with a frame held");
        let acker = {
            let g = g.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(30));
                g.ack(3);
            })
        };
        assert!(g.drain(Duration::from_secs(5)));
        acker.join().unwrap();
        assert_eq!(*wire.0.lock().unwrap(), vec![b"last".to_vec()]);
        assert_eq!(g.frame_counts(), (1, 0, 0));
    }

    #[test]
    fn held_frames_are_bounded_by_dropping_the_oldest() {
        let g = Gate::new(Role::Primary { need_ack: true });
        g.set_lease(BootInstant::now() + Duration::from_secs(5));
        for i in 0..5000u64 {
            g.send_frame(i + 1, &[0; 60]);
        }
        let (released, dropped, held) = g.frame_counts();
        assert_eq!((released, dropped, held), (0, 5000 - 4096, 4096));
        // The newest are kept: the ack of the last one releases them all.
        g.ack(5000);
        assert_eq!(g.frame_counts(), (4096, 5000 - 4096, 0));
    }
}
