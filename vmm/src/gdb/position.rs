//! Positions between exits, and the checkpoints reverse execution starts
//! from. Pure bookkeeping, no KVM: unit-tested below.
//!
//! The replay names a moment by its exit ordinal (deterministic exits
//! since boot). Inside the interval after exit N the guest runs without
//! exits, and no machine of ours has an instruction counter, so a moment
//! there is named by what the debugger saw since the exit:
//!
//! * `#N+k`: k instructions single-stepped from the end of exit N (the
//!   exit completed, any interrupt injected there still pending);
//! * `#N, arrival j at X, +k`: the j-th time the guest reached address X
//!   (about to execute it) since exit N, then k single steps. This is how
//!   a breakpoint hit is named when the guest ran freely up to it: a
//!   hardware breakpoint at X stops exactly at each arrival, so the count
//!   is exact as long as X was watched (armed, or every instruction
//!   stepped) since the exit.
//!
//! Both are reproducible: the guest between two exits is a function of its
//! state at the first, so running to exit N again (from a checkpoint) and
//! stepping, or counting arrivals, reaches the same instruction with the
//! same registers and memory.

use std::collections::HashMap;
use std::fmt;

/// The j-th arrival at `pc` since the exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Anchor {
    pub pc: u64,
    pub nth: u32,
}

/// A moment of the replay (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pos {
    pub ordinal: u64,
    pub anchor: Option<Anchor>,
    pub steps: u64,
}

impl Pos {
    /// The end of exit `ordinal` (0: boot, before the first instruction).
    pub fn exit(ordinal: u64) -> Pos {
        Pos { ordinal, anchor: None, steps: 0 }
    }

    pub fn is_exit(&self) -> bool {
        self.anchor.is_none() && self.steps == 0
    }
}

impl fmt::Display for Pos {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "exit #{}", self.ordinal)?;
        if let Some(a) = self.anchor {
            write!(f, ", arrival {} at {:#x}", a.nth, a.pc)?;
        }
        if self.steps > 0 || self.anchor.is_some() {
            write!(f, ", +{} instruction{}", self.steps, if self.steps == 1 { "" } else { "s" })?;
        }
        Ok(())
    }
}

/// What the debugger has seen of the guest since the last exit: steps
/// taken, and arrivals at addresses. While every instruction since the
/// exit was single-stepped, every address is counted; once the guest ran
/// freely, only the addresses armed as hardware breakpoints are.
#[derive(Debug, Default)]
pub struct Tracker {
    ordinal: u64,
    /// Steps since the exit, while nothing but steps happened.
    from_exit: Option<u64>,
    /// Arrivals since the exit: count and steps since the last one (None
    /// once the guest ran freely after it).
    arrivals: HashMap<u64, (u32, Option<u64>)>,
    /// Addresses counted exactly while the guest ran freely.
    watched: Vec<u64>,
    /// Arrivals recorded, bounded: a long stepped interval could visit
    /// many addresses (the map is cleared at every exit).
    capped: bool,
}

/// Most distinct addresses one interval's arrivals keep.
const MAX_ARRIVALS: usize = 1 << 16;

impl Tracker {
    pub fn new() -> Tracker {
        Tracker { from_exit: Some(0), ..Default::default() }
    }

    pub fn ordinal(&self) -> u64 {
        self.ordinal
    }

    /// Steps since the exit, if nothing else happened since.
    pub fn from_exit(&self) -> Option<u64> {
        self.from_exit
    }

    /// Exit `ordinal` completed: a new interval.
    pub fn exit(&mut self, ordinal: u64) {
        self.ordinal = ordinal;
        self.from_exit = Some(0);
        self.arrivals.clear();
        self.watched.clear();
        self.capped = false;
    }

    /// Whether arrivals at `pc` since the exit are known exactly.
    pub fn counted(&self, pc: u64) -> bool {
        (self.from_exit.is_some() && !self.capped) || self.watched.contains(&pc)
    }

    /// The guest is about to execute `pc` (a breakpoint there hit, or a
    /// step ended there).
    pub fn arrive(&mut self, pc: u64) {
        if !self.arrivals.contains_key(&pc) && self.arrivals.len() >= MAX_ARRIVALS {
            self.capped = true;
            return;
        }
        let e = self.arrivals.entry(pc).or_insert((0, None));
        e.0 += 1;
        e.1 = Some(0);
    }

    /// One instruction was single-stepped and the guest is now at `pc`.
    pub fn step(&mut self, pc: u64) {
        if let Some(k) = &mut self.from_exit {
            *k += 1;
        }
        for e in self.arrivals.values_mut() {
            if let Some(s) = &mut e.1 {
                *s += 1;
            }
        }
        self.arrive(pc);
    }

    /// The guest runs freely (no single-step) with hardware breakpoints on
    /// `armed`: from here only those are counted, and only those already
    /// counted stay exact.
    pub fn run_free(&mut self, armed: &[u64]) {
        let keep: Vec<u64> = armed.iter().copied().filter(|&a| self.counted(a)).collect();
        self.watched = keep;
        self.from_exit = None;
        for e in self.arrivals.values_mut() {
            e.1 = None;
        }
    }

    /// Arrivals at `pc` since the exit (exact only if [`Tracker::counted`]).
    pub fn count(&self, pc: u64) -> u32 {
        self.arrivals.get(&pc).map_or(0, |e| e.0)
    }

    /// Where the guest is, if it can be named: steps since the exit, or
    /// since the latest counted arrival.
    pub fn pos(&self) -> Option<Pos> {
        if let Some(k) = self.from_exit {
            return Some(Pos { ordinal: self.ordinal, anchor: None, steps: k });
        }
        self.arrivals
            .iter()
            .filter(|(pc, _)| self.counted(**pc))
            .filter_map(|(&pc, &(n, since))| since.map(|s| (s, pc, n)))
            .min()
            .map(|(s, pc, n)| Pos { ordinal: self.ordinal, anchor: Some(Anchor { pc, nth: n }), steps: s })
    }

    /// Whether the guest is exactly at `goal`.
    pub fn at(&self, goal: &Pos) -> bool {
        if goal.ordinal != self.ordinal {
            return false;
        }
        match goal.anchor {
            None => self.from_exit == Some(goal.steps),
            Some(a) => self.counted(a.pc) && self.arrivals.get(&a.pc).is_some_and(|&(n, since)| n == a.nth && since == Some(goal.steps)),
        }
    }

    /// Whether the guest went past `goal` in its interval (the goal will
    /// never be reached: a position from another run, or a bug).
    pub fn past(&self, goal: &Pos) -> bool {
        if goal.ordinal != self.ordinal {
            return self.ordinal > goal.ordinal;
        }
        match goal.anchor {
            None => self.from_exit.is_some_and(|k| k > goal.steps),
            Some(a) => {
                self.counted(a.pc)
                    && self.arrivals.get(&a.pc).is_some_and(|&(n, since)| n > a.nth || (n == a.nth && since.is_some_and(|s| s > goal.steps)))
            }
        }
    }
}

/// Checkpoints of the replay: the VM at the end of some exits, every
/// `interval` exits, at most `max` of them and `max_bytes` in all. When
/// either bound is reached the interval doubles and every other one goes
/// (rr and QEMU thin their checkpoints the same way), so memory stays
/// bounded however long the replay, and the replay needed to reach any
/// moment stays within one (current) interval of a checkpoint.
pub struct Checkpoints<T> {
    list: Vec<(u64, u64, T)>,
    interval: u64,
    max: usize,
    max_bytes: u64,
}

impl<T> Checkpoints<T> {
    pub fn new(interval: u64, max: usize, max_bytes: u64) -> Self {
        Checkpoints { list: Vec::new(), interval: interval.max(1), max: max.max(2), max_bytes }
    }

    pub fn interval(&self) -> u64 {
        self.interval
    }

    pub fn len(&self) -> usize {
        self.list.len()
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    pub fn bytes(&self) -> u64 {
        self.list.iter().map(|c| c.1).sum()
    }

    /// Whether one is due at the end of exit `ordinal` (not yet taken).
    pub fn due(&self, ordinal: u64) -> bool {
        ordinal > 0 && ordinal.is_multiple_of(self.interval) && !self.list.iter().any(|c| c.0 == ordinal)
    }

    /// Adds the checkpoint of exit `ordinal` (`bytes` it costs), then
    /// thins the list if it is over a bound.
    pub fn add(&mut self, ordinal: u64, bytes: u64, cp: T) {
        let at = self.list.partition_point(|c| c.0 < ordinal);
        self.list.insert(at, (ordinal, bytes, cp));
        while self.list.len() > 1 && (self.list.len() > self.max || self.bytes() > self.max_bytes) {
            let before = self.list.len();
            self.interval = self.interval.saturating_mul(2);
            let iv = self.interval;
            self.list.retain(|c| c.0.is_multiple_of(iv));
            if self.list.len() == before {
                // Nothing on the coarser grid to drop: drop the oldest.
                self.list.remove(0);
            }
        }
    }

    /// The latest checkpoint from which `goal` lies ahead: at an exit
    /// before it (`strict`: the goal itself excluded), or None (boot).
    pub fn before(&self, goal: &Pos, strict: bool) -> Option<(u64, &T)> {
        self.list
            .iter()
            .rev()
            .find(|c| c.0 < goal.ordinal || (c.0 == goal.ordinal && !(strict && goal.is_exit())))
            .map(|c| (c.0, &c.2))
    }

    /// Ordinals of the checkpoints held, for `monitor checkpoints`.
    pub fn ordinals(&self) -> Vec<u64> {
        self.list.iter().map(|c| c.0).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_from_an_exit_name_the_position() {
        let mut t = Tracker::new();
        t.exit(7);
        assert_eq!(t.pos(), Some(Pos::exit(7)));
        t.step(0x10);
        t.step(0x14);
        assert_eq!(t.pos(), Some(Pos { ordinal: 7, anchor: None, steps: 2 }));
        assert!(t.at(&Pos { ordinal: 7, anchor: None, steps: 2 }));
        assert!(t.past(&Pos { ordinal: 7, anchor: None, steps: 1 }));
        assert!(!t.past(&Pos { ordinal: 7, anchor: None, steps: 3 }));
        // While stepping every address is counted.
        assert!(t.counted(0x14));
        assert!(t.at(&Pos { ordinal: 7, anchor: Some(Anchor { pc: 0x14, nth: 1 }), steps: 0 }));
        t.exit(8);
        assert!(t.past(&Pos { ordinal: 7, anchor: None, steps: 99 }));
        assert_eq!(t.pos(), Some(Pos::exit(8)));
    }

    #[test]
    fn free_runs_name_breakpoint_hits_by_arrival() {
        let mut t = Tracker::new();
        t.exit(3);
        t.run_free(&[0x100, 0x200]);
        assert_eq!(t.pos(), None, "a free run has no position until something stops it");
        t.arrive(0x100);
        let hit1 = Pos { ordinal: 3, anchor: Some(Anchor { pc: 0x100, nth: 1 }), steps: 0 };
        assert_eq!(t.pos(), Some(hit1));
        // Step over it, run on, hit it again.
        t.step(0x104);
        assert_eq!(t.pos(), Some(Pos { steps: 1, ..hit1 }));
        t.run_free(&[0x100, 0x200]);
        t.arrive(0x100);
        let hit2 = Pos { ordinal: 3, anchor: Some(Anchor { pc: 0x100, nth: 2 }), steps: 0 };
        assert_eq!(t.pos(), Some(hit2));
        assert!(t.past(&hit1) && t.at(&hit2));
        // An address armed only now was not counted since the exit.
        t.run_free(&[0x100, 0x300]);
        assert!(!t.counted(0x300) && !t.counted(0x200) && t.counted(0x100));
        t.arrive(0x300);
        assert_eq!(t.pos(), None, "an arrival at an address not counted since the exit names nothing");
    }

    #[test]
    fn checkpoints_thin_out_and_stay_bounded() {
        let mut c = Checkpoints::new(10, 4, u64::MAX);
        for n in (10..=100).step_by(10) {
            if c.due(n) {
                c.add(n, 1, n);
            }
        }
        assert!(c.len() <= 4);
        assert!(c.interval() >= 20);
        assert!(c.ordinals().iter().all(|o| o % c.interval() == 0));
        // The latest one at or before a goal; strict skips the goal's own exit.
        let last = *c.ordinals().last().unwrap();
        assert_eq!(c.before(&Pos::exit(last), false).map(|x| x.0), Some(last));
        assert!(c.before(&Pos::exit(last), true).is_none_or(|x| x.0 < last));
        assert_eq!(c.before(&Pos { ordinal: last, anchor: None, steps: 3 }, true).map(|x| x.0), Some(last));
        assert!(c.before(&Pos::exit(5), false).is_none(), "before the first: boot");
        // A byte budget bounds them too.
        let mut b = Checkpoints::new(1, 100, 10);
        for n in 1..=50 {
            if b.due(n) {
                b.add(n, 3, ());
            }
        }
        assert!(b.bytes() <= 10, "{} bytes", b.bytes());
    }

    #[test]
    fn positions_print_as_monitor_when_shows_them() {
        assert_eq!(Pos::exit(5).to_string(), "exit #5");
        assert_eq!(Pos { ordinal: 5, anchor: None, steps: 1 }.to_string(), "exit #5, +1 instruction");
        let p = Pos { ordinal: 5, anchor: Some(Anchor { pc: 0x1026e0, nth: 2 }), steps: 0 };
        assert_eq!(p.to_string(), "exit #5, arrival 2 at 0x1026e0, +0 instructions");
    }
}
