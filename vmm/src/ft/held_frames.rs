//! Network frames held by the gate (the output rule, as for console
//! bytes): each tagged with the exit that sent it, written to the tap once
//! the backup has acknowledged that exit. Unlike console bytes, frames are
//! not numbered or kept once released, and a held frame may be dropped
//! when too many are held (the network loses frames anyway; TCP
//! retransmits).
//!
//! A backup holds the frames its replay sends too, because after a
//! takeover it must send exactly those the old primary never did: the
//! primary's every high-water mark says through which exit it had put its
//! frames on the wire (`Progress { frames_out }`), the backup forgets its
//! frames up to there ([`HeldFrames::sent_elsewhere`]) and, once promoted,
//! sends the rest. Frames the old primary sent after its last mark that
//! reached the backup go out twice (at most a round trip's worth; TCP and
//! any receiver of a lossy network discard duplicates); none is lost.

use std::collections::VecDeque;

use crate::net::FrameSink;

/// The most frames held (a backup that stops acknowledging must not grow
/// the primary without bound): older ones are dropped.
const MAX_FRAMES: usize = 4096;
/// The most bytes held (frames are at most 1518 bytes, so this bound is
/// a guard only).
const MAX_BYTES: usize = 8 << 20;

#[derive(Default)]
pub struct HeldFrames {
    q: VecDeque<(u64, Vec<u8>)>,
    bytes: usize,
    /// Where released frames go (the tap); none: they are counted only.
    out: Option<Box<dyn FrameSink>>,
    /// Frames sent through this exit are on the wire: released here, or
    /// by the primary this VMM backs.
    out_through: u64,
    /// Frames sent through this exit were sent by the primary this VMM
    /// backs (its marks say so).
    elsewhere: u64,
    pub released: u64,
    pub dropped: u64,
    /// Frames the previous primary had sent already (not sent again).
    pub sent_before: u64,
}

impl HeldFrames {
    pub fn set_out(&mut self, out: Box<dyn FrameSink>) {
        self.out = Some(out);
    }

    /// A frame the guest sent at exit `ordinal`, held until released.
    pub fn push(&mut self, ordinal: u64, frame: &[u8]) {
        if ordinal <= self.elsewhere {
            // Replayed by a backup: the primary sent it.
            self.sent_before += 1;
            return;
        }
        self.bytes += frame.len();
        self.q.push_back((ordinal, frame.to_vec()));
        while self.q.len() > MAX_FRAMES || self.bytes > MAX_BYTES {
            let (_, f) = self.q.pop_front().expect("over the bound, so not empty");
            self.bytes -= f.len();
            self.dropped += 1;
        }
    }

    /// The primary this VMM backs has sent every frame through exit
    /// `through`: forget those, and any such frame replayed later.
    pub fn sent_elsewhere(&mut self, through: u64) {
        self.elsewhere = self.elsewhere.max(through);
        self.out_through = self.out_through.max(through);
        while self.q.front().is_some_and(|(o, _)| *o <= through) {
            let (_, f) = self.q.pop_front().expect("front exists");
            self.bytes -= f.len();
            self.sent_before += 1;
        }
    }

    /// Sends every frame sent at or before exit `through` (all for `None`).
    pub fn release(&mut self, through: Option<u64>) {
        while let Some((o, _)) = self.q.front() {
            if through.is_some_and(|t| *o > t) {
                break;
            }
            let (o, f) = self.q.pop_front().expect("front exists");
            self.bytes -= f.len();
            self.released += 1;
            self.out_through = self.out_through.max(o);
            if let Some(out) = &mut self.out {
                out.transmit(&f);
            }
        }
    }

    /// Every frame sent through this exit is on the wire (what a mark
    /// tells the backup).
    pub fn out_through(&self) -> u64 {
        self.out_through
    }

    /// The exit of the newest held frame.
    pub fn last_ordinal(&self) -> Option<u64> {
        self.q.back().map(|(o, _)| *o)
    }

    pub fn len(&self) -> usize {
        self.q.len()
    }

    pub fn is_empty(&self) -> bool {
        self.q.is_empty()
    }
}
